"""containerd on layerfs-snapshotter against containerd's overlayfs snapshotter.

    python -m benchmarks.containerd_bench [--size-mb 64] [--repeat 3] [--runs 5] [--json OUT]

A private containerd (its own root, state, sockets; CRI off) with layerfs-snapshotter as proxy
plugins, one image (Debian's static busybox, then a generated rootfs-like tree of SIZE MiB as a
second layer: benchmarks.images_bench.make_tree) as an OCI archive. Per snapshotter:
- unpack: ``ctr image import --snapshotter S`` after ``ctr image rm --sync`` (content stays in
  containerd's store, so this is the unpack plus a content check common to all);
- run: ``ctr run --rm --snapshotter S IMG ID true`` (prepare, mount, runc, unmount, remove).
Snapshotters: ``overlayfs`` (containerd's, kernel overlayfs), ``layerfs`` (unpack through
kernel overlay mounts), ``layerfs-fuse-unpack`` (``--kernel-extract off``: unpack through layerfs
mounts), ``fuse-overlayfs`` (the same service handing out ``fuse3.fuse-overlayfs`` mounts, as
fuse-overlayfs-snapshotter does). Median wall times. Standalone: root, containerd, runc,
busybox-static, fuse-overlayfs (Debian packages).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.images_bench import make_tree

# The tests' OCI layout writer and private containerd set-up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from e2e.oci_image import layer_tar, oci_archive, write_layout
from snapshotter._containerd import RunDir, config_toml

IMAGE = "docker.io/library/layerfs-bench:1"
# name -> layerfs-snapshotter arguments (overlayfs is containerd's own)
PROXIES: dict[str, list[str]] = {
    "layerfs": [],
    "layerfs-fuse-unpack": ["--kernel-extract", "off"],
    "fuse-overlayfs": ["--kernel-extract", "off", "--fuse-program", "fuse-overlayfs"],
}
NAMESPACE = "layerfs-bench"


def build_archive(tmp: Path, size_mb: int) -> Path:
    base = tmp / "base"
    (base / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", base / "bin/busybox")
    for applet in ("sh", "true"):
        (base / "bin" / applet).symlink_to("busybox")
    for d in ("proc", "sys", "dev", "etc"):
        (base / d).mkdir()
    make_tree(tmp / "tree", size_mb)
    layers = [layer_tar([], base), layer_tar([], tmp / "tree")]
    shutil.rmtree(tmp / "tree")
    write_layout(tmp / "layout", layers, "1")
    del layers
    archive = oci_archive(tmp / "layout", tmp / "image.tar", IMAGE)
    shutil.rmtree(tmp / "layout")
    return archive


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.bin = Path(sys.executable).parent
        self.env = dict(os.environ, PATH=f"{self.bin}:/usr/sbin:/usr/bin:/sbin:/bin")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.run_dir = RunDir(NAMESPACE)

    def start(self) -> None:
        socks = {name: self.tmp / f"{name}.sock" for name in PROXIES}
        for name, args in PROXIES.items():
            cmd = [str(self.bin / "layerfs-snapshotter"), "--address", str(socks[name])]
            self._spawn([*cmd, "--root", str(self.tmp / name), *args], socks[name])
        (self.tmp / "config.toml").write_text(config_toml(self.tmp, socks))
        self._spawn(
            ["containerd", "--config", str(self.tmp / "config.toml")], self.tmp / "containerd.sock"
        )
        time.sleep(0.5)

    def _spawn(self, cmd: list[str], sock: Path) -> None:
        log = (self.tmp / "log").open("ab")
        p = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env,
            start_new_session=True,
        )  # fmt: skip
        self.procs.append(p)
        deadline = time.monotonic() + 30
        while not sock.exists():
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not start: see {self.tmp}/log")
            time.sleep(0.05)

    def ctr(self, *args: str) -> None:
        subprocess.run(
            ["ctr", "--address", str(self.tmp / "containerd.sock"), "-n", NAMESPACE, *args],
            check=True, capture_output=True, env=self.env, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=30)
        self.run_dir.clean()


def timed(fn: object, *args: str) -> float:
    t0 = time.perf_counter()
    fn(*args)  # type: ignore[operator]
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.containerd_bench")
    ap.add_argument("--size-mb", type=int, default=64, help="second layer's size (default 64)")
    ap.add_argument("--repeat", type=int, default=3, help="unpacks per snapshotter")
    ap.add_argument("--runs", type=int, default=5, help="'ctr run --rm' per snapshotter")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    for tool in ("containerd", "ctr", "runc", "fuse-overlayfs", "mount.fuse3"):
        if shutil.which(tool) is None:
            print(f"{tool} not installed (scripts/setup.sh)", file=sys.stderr)
            return 2
    snapshotters = ["overlayfs", *PROXIES]
    results: dict[str, dict[str, list[float]]] = {
        s: {"unpack": [], "run": []} for s in snapshotters
    }
    with tempfile.TemporaryDirectory(prefix="layerfs-ctrd-bench-") as tmp_s:
        tmp = Path(tmp_s)
        archive = build_archive(tmp, args.size_mb)
        env = Env(tmp)
        try:
            env.start()
            env.ctr("image", "import", "--no-unpack", str(archive))
            for rep in range(args.repeat):
                for s in snapshotters:
                    imp = ("image", "import", "--snapshotter", s, str(archive))
                    results[s]["unpack"].append(timed(env.ctr, *imp))
                    if rep < args.repeat - 1:
                        env.ctr("image", "rm", "--sync", IMAGE)
                        env.ctr("image", "import", "--no-unpack", str(archive))
            for i in range(args.runs):
                for s in snapshotters:
                    run = ("run", "--rm", "--snapshotter", s, IMAGE, f"b-{s}-{i}", "true")
                    results[s]["run"].append(timed(env.ctr, *run))
            env.ctr("image", "rm", "--sync", IMAGE)
        finally:
            env.stop()
            with open("/proc/self/mountinfo") as f:
                left = sorted((ln.split()[4] for ln in f if tmp_s in ln), reverse=True)
            for target in left:
                subprocess.run(["umount", "-l", target], check=False, capture_output=True)
    ref = {k: statistics.median(v) for k, v in results["overlayfs"].items()}
    print(f"image: busybox + {args.size_mb} MiB tree; median of {args.repeat} unpacks and "
          f"{args.runs} runs")  # fmt: skip
    print(f"{'snapshotter':<22} {'unpack s':>9} {'x ovl':>6} {'run s':>7} {'x ovl':>6}")
    rows = []
    for s in snapshotters:
        u, r = (statistics.median(results[s][k]) for k in ("unpack", "run"))
        print(f"{s:<22} {u:>9.2f} {u / ref['unpack']:>6.2f} {r:>7.2f} {r / ref['run']:>6.2f}")
        rows.append({"snapshotter": s, "unpack_s": u, "run_s": r, "runs": results[s]})
    if args.json:
        meta = {
            "benchmark": "containerd",
            "size_mb": args.size_mb,
            "kernel": platform.release(),
            "cpu_count": os.cpu_count(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Image import, commit and pull throughput: layerfs's layer store against umoci, skopeo and
podman on the same image.

    python -m benchmarks.images_bench [--size-mb 64] [--repeat 3] [--source DIR] [--json OUT]
                                      [--pull | --pull-only] [--layers 4]

One rootfs (generated, or a copy of ``--source``) is packed by ``umoci repack`` into an OCI
layout; then, each repeat:
- import:  ``umoci unpack`` vs ``layerfs image import`` (verify digests, extract, xxh3 manifest)
- commit:  ``umoci repack`` of the whole tree as a new layer vs ``layerfs commit`` of an upper
  holding the same tree (tar + gzip + digests, then ingest the new layer into the store);
  ``layerfs commit (blob only)`` is the tar+gzip part alone, the part umoci repack also does.
- pull (``--pull``): the tree split into ``--layers`` gzip layers, pushed by skopeo to a local
  registry (Debian's docker-registry on 127.0.0.1, as the tests start it); then ``layerfs image
  pull`` into an empty store (download, verify, extract, xxh3 manifest) vs ``skopeo copy
  docker://... oci:DIR`` (download and verify only, no extraction) vs ``podman pull`` into an
  empty private vfs storage (download, verify, extract).
Throughput is the tree's file bytes divided by the wall time (median of the repeats); ratios are
against umoci (import, commit) or skopeo copy (pull). Standalone: needs umoci (Debian package)
and root (owners are preserved); ``--pull`` also docker-registry, skopeo and podman.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from layerfs.store.commit import commit, write_layer_blob
from layerfs.store.store import Store


def make_tree(root: Path, size_mb: int, seed: int = 7) -> int:
    """A rootfs-like tree: many small files in nested dirs plus a few large ones."""
    rng = random.Random(seed)
    target = size_mb << 20
    big = target // 2
    written = 0
    root.mkdir(parents=True)
    for i in range(4):
        d = root / "usr/lib/big"
        d.mkdir(parents=True, exist_ok=True)
        n = big // 4
        (d / f"blob{i}.so").write_bytes(rng.randbytes(n // 2) + bytes(n - n // 2))
        written += n
    i = 0
    while written < target:
        d = root / "usr/share" / f"pkg{i // 40}" / f"sub{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        n = rng.randint(512, 16384)
        # Half random, half text-like: compresses somewhat, as real files do.
        (d / f"file{i}.txt").write_bytes(rng.randbytes(n // 2) + b"layerfs " * (n // 16))
        written += n // 2 + 8 * (n // 16)
        if i % 50 == 0:
            os.symlink(f"file{i}.txt", d / f"link{i}")
        i += 1
    return tree_bytes(root)


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if not os.path.islink(os.path.join(dirpath, f)):
                total += st.st_size
    return total


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e9


def drop(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def bench_pull(
    tmp: Path, tree: Path, layers: int, repeat: int, add: Callable[[str, float], None]
) -> None:
    """Time pulls of a ``layers``-layer image of ``tree`` from a local registry."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from store.ocitools import write_image  # the tests' layout writer and registry runner
    from store.registry_env import local_registry

    from layerfs.store.progress import LayerLines
    from layerfs.store.pull import pull

    # Split the tree's top-level files into `layers` tars (round robin over sorted paths).
    parts: list[list[Path]] = [[] for _ in range(layers)]
    paths = sorted(p for p in tree.rglob("*") if not p.is_dir())
    for i, p in enumerate(paths):
        parts[i % layers].append(p)
    layout = tmp / "pull-src"
    tars = []
    for files in parts:
        tar = tmp / f"layer{len(tars)}.tar"
        listing = tmp / "files.txt"
        listing.write_text("".join(f"{p.relative_to(tree)}\n" for p in files))
        run(["tar", "-C", str(tree), "--numeric-owner", "-cf", str(tar), "-T", str(listing)])
        tars.append(tar.read_bytes())
        tar.unlink()
    write_image(layout, tars, tag="bench", compression="gzip")
    with local_registry(tmp / "registry") as reg:
        reg.skopeo_copy(f"oci:{layout}:bench", "bench/img:1")
        ref = f"{reg.host}/bench/img:1"
        for rep in range(repeat):
            store = Store(str(tmp / f"pull-store{rep}"))
            quiet = LayerLines(open(os.devnull, "w"), tty=False)  # noqa: SIM115
            add("layerfs image pull", timed(partial(pull, store, ref, lines=quiet)))
            drop(Path(store.root))
            out = tmp / f"skopeo{rep}"
            cmd = ["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{out}:x"]
            add("skopeo copy (no extract)", timed(partial(run, cmd)))
            drop(out)
            proot = tmp / f"podman{rep}"
            proot.mkdir()
            conf = proot / "storage.conf"
            conf.write_text(
                f'[storage]\ndriver = "vfs"\ngraphroot = "{proot}/g"\nrunroot = "{proot}/r"\n'
            )
            env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf), "HOME": str(proot)}
            pcmd = ["podman", "pull", "-q", "--tls-verify=false", ref]
            t = timed(partial(subprocess.run, pcmd, check=True, capture_output=True, env=env))
            add("podman pull (vfs)", t)
            subprocess.run(["podman", "rmi", "-a", "-f"], env=env, capture_output=True)
            drop(proot)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.images_bench")
    ap.add_argument("--size-mb", type=int, default=64, help="generated tree size (default 64)")
    ap.add_argument("--source", help="use a copy of this directory as the rootfs instead")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--tmp", help="scratch directory (default: system temp)")
    ap.add_argument("--pull", action="store_true", help="also time pulls from a local registry")
    ap.add_argument("--pull-only", action="store_true", help="time pulls only")
    ap.add_argument("--layers", type=int, default=4, help="layers of the pulled image")
    args = ap.parse_args(argv)
    if shutil.which("umoci") is None:
        print("umoci not installed (apt-get install umoci)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="images-bench-", dir=args.tmp) as tmp_s:
        tmp = Path(tmp_s)
        tree = tmp / "tree"
        if args.source:
            shutil.copytree(args.source, tree, symlinks=True)
            nbytes = tree_bytes(tree)
        else:
            nbytes = make_tree(tree, args.size_mb)
        layout = tmp / "oci"
        run(["umoci", "init", "--layout", str(layout)])
        run(["umoci", "new", "--image", f"{layout}:empty"])

        times: dict[str, list[float]] = {}

        def add(name: str, seconds: float) -> None:
            times.setdefault(name, []).append(seconds)

        if args.pull or args.pull_only:
            bench_pull(tmp, tree, args.layers, args.repeat, add)
        for rep in range(0 if args.pull_only else args.repeat):
            # umoci repack: the tree as one new layer on the empty image.
            bundle = tmp / f"bundle{rep}"
            run(["umoci", "unpack", "--image", f"{layout}:empty", str(bundle)])
            os.rmdir(bundle / "rootfs")
            shutil.copytree(tree, bundle / "rootfs", symlinks=True)
            tag = f"img{rep}"
            umoci_img = f"{layout}:{tag}"
            add(
                "umoci repack",
                timed(partial(run, ["umoci", "repack", "--image", umoci_img, str(bundle)])),
            )
            drop(bundle)

            out = tmp / f"unpacked{rep}"
            add(
                "umoci unpack",
                timed(partial(run, ["umoci", "unpack", "--image", umoci_img, str(out)])),
            )
            drop(out)

            store = Store(str(tmp / f"store{rep}"))
            add("layerfs import", timed(partial(store.import_layout, umoci_img)))

            upper = tmp / f"upper{rep}"
            shutil.copytree(tree, upper, symlinks=True)
            store.import_layout(f"{layout}:empty")
            blob = str(tmp / f"blob{rep}")
            add("layerfs commit (blob only)", timed(partial(write_layer_blob, str(upper), blob)))
            os.unlink(blob)
            add(
                "layerfs commit", timed(partial(commit, store, str(upper), "empty", ("committed",)))
            )
            drop(upper)
            drop(Path(store.root))

    mb = nbytes / (1 << 20)
    rows = []
    kinds = {"umoci unpack": "import", "layerfs import": "import", "umoci repack": "commit"}
    refs = {"import": "umoci unpack", "commit": "umoci repack", "pull": "skopeo copy (no extract)"}

    def kind_of(name: str) -> str:
        return "pull" if "pull" in name or "skopeo" in name else kinds.get(name, "commit")

    base = {k: statistics.median(times[n]) for k, n in refs.items() if n in times}
    for name, ts in times.items():
        med = statistics.median(ts)
        kind = kind_of(name)
        rows.append(
            {
                "name": name,
                "kind": kind,
                "median_s": med,
                "mb_per_s": mb / med,
                "vs_umoci": base[kind] / med,
                "runs": ts,
            }
        )
    print(f"tree: {mb:.1f} MiB of file data, {args.repeat} repeats, median wall time")
    print(f"{'step':<28} {'seconds':>8} {'MiB/s':>8} {'x ref':>8}  (ref: umoci; skopeo for pull)")
    for r in sorted(rows, key=lambda r: (r["kind"], r["name"])):
        print(f"{r['name']:<28} {r['median_s']:>8.2f} {r['mb_per_s']:>8.1f} {r['vs_umoci']:>8.2f}")
    if args.json:
        meta = {
            "benchmark": "images",
            "tree_mib": mb,
            "repeat": args.repeat,
            "kernel": platform.release(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "umoci": subprocess.run(
                ["umoci", "--version"], capture_output=True, text=True
            ).stdout.strip(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

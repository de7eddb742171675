"""A private containerd (1.6, Debian's) with layerfs-snapshotter as a proxy plugin, for the
end-to-end test: its own root, state, sockets and opt dir under one temporary directory, the
CRI plugin off, runc as the runtime. The runc shims still use /run/containerd ({s,fifo,runc}):
teardown() removes what appeared there during the run (RunDir)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from ._service import BIN

NAMESPACE = "layerfs-snap-e2e"
RUN = Path("/run/containerd")

CONFIG = """\
version = 2
root = "{tmp}/root"
state = "{tmp}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{tmp}/containerd.sock"

[ttrpc]
  address = "{tmp}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{tmp}/opt"
"""
PROXY = """
[proxy_plugins.{name}]
  type = "snapshot"
  address = "{sock}"
"""


def config_toml(tmp: Path, proxies: Mapping[str, Path]) -> str:
    """The config of a containerd that keeps everything under TMP, with a proxy snapshotter
    NAME on each socket of PROXIES (also used by benchmarks/containerd_bench.py)."""
    return CONFIG.format(tmp=tmp) + "".join(
        PROXY.format(name=name, sock=sock) for name, sock in proxies.items()
    )


def _listing(path: Path) -> set[Path]:
    return set(path.iterdir()) if path.is_dir() else set()


class RunDir:
    """What the runc shims add to /run/containerd during a run (they use it whatever
    containerd's state directory): noted at the start, removed by clean()."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.before = {d: _listing(RUN / d) for d in ("s", "fifo", "runc")}
        self.existed = RUN.exists()

    def clean(self) -> None:
        for d, before in self.before.items():
            for p in _listing(RUN / d) - before:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        shutil.rmtree(RUN / "runc" / self.namespace, ignore_errors=True)
        if not self.existed:
            shutil.rmtree(RUN, ignore_errors=True)


class Containerd:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.sock = tmp / "containerd.sock"
        self.snap_root = tmp / "snapshotter"
        self.snap_sock = tmp / "snap.sock"
        self.config = tmp / "config.toml"
        self.config.write_text(config_toml(tmp, {"layerfs": self.snap_sock}))
        # mount.layerfs (and mount.fuse3, fusermount3) on the PATH of containerd, its shims
        # and ctr: they all mount rootfs themselves
        self.env = dict(os.environ, PATH=f"{BIN.parent}:/usr/sbin:/usr/bin:/sbin:/bin")
        self.proc: subprocess.Popen[bytes] | None = None
        self.snap: subprocess.Popen[bytes] | None = None
        self.run_dir = RunDir(NAMESPACE)

    # --- processes ---------------------------------------------------------------------
    def start_snapshotter(self, *extra: str) -> None:
        log = (self.tmp / "snapshotter.log").open("ab")
        self.snap = subprocess.Popen(
            [str(BIN), "--address", str(self.snap_sock), "--root", str(self.snap_root), *extra],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        _wait_for(self.snap_sock, self.snap)

    def start_containerd(self) -> None:
        log = (self.tmp / "containerd.log").open("ab")
        self.proc = subprocess.Popen(
            ["containerd", "--config", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=self.env,
            start_new_session=True,
        )
        _wait_for(self.sock, self.proc)
        deadline = time.monotonic() + 30
        while self.ctr("version", check=False).returncode != 0:
            assert time.monotonic() < deadline, "containerd does not answer"
            time.sleep(0.2)

    def stop_containerd(self) -> None:
        _stop(self.proc)
        self.proc = None

    def stop_snapshotter(self) -> int | None:
        code = _stop(self.snap)
        self.snap = None
        return code

    # --- ctr -----------------------------------------------------------------------------
    def ctr(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            ["ctr", "--address", str(self.sock), "--namespace", NAMESPACE, *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"ctr {' '.join(args)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
            )
        return r

    def logs(self) -> str:
        out = []
        for name in ("containerd.log", "snapshotter.log"):
            p = self.tmp / name
            if p.exists():
                out.append(f"--- {name} (end)\n" + p.read_text(errors="replace")[-6000:])
        return "\n".join(out)

    # --- teardown ---------------------------------------------------------------------------
    def teardown(self) -> None:
        """Stop the containers' tasks, containerd and the snapshotter; unmount what is left
        under our directory; remove what the run added to /run/containerd."""
        if self.proc is not None:
            for line in self.ctr("task", "ls", "-q", check=False).stdout.split():
                self.ctr("task", "kill", "-s", "KILL", line, check=False)
                self.ctr("task", "rm", "-f", line, check=False)
        self.stop_containerd()
        self.stop_snapshotter()
        for target in reversed(mounts_under(self.tmp)):
            subprocess.run(["umount", "-l", target], check=False, capture_output=True)
        self.run_dir.clean()


def mounts_under(root: Path) -> list[str]:
    """Mount points under ROOT, in mount order (as mountinfo lists them), with their type."""
    out = []
    prefix = str(root) + "/"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].replace("\\040", " ")
            if target.startswith(prefix):
                out.append(target)
    return out


def fstype_of(target: str) -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                return fields[fields.index("-") + 1]
    return None


def daemons_using(path: Path) -> list[str]:
    """Command lines of live processes that mention PATH (mount daemons of our snapshots)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path("/proc", pid, "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # a daemon forked by mount.layerfs itself, or by the fork server ("layerfs MERGED")
        if str(path) in cmd and ("mount.layerfs" in cmd or cmd.startswith("layerfs ")):
            out.append(f"{pid}: {cmd}")
    return out


def _wait_for(sock: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args!r} exited {proc.returncode}")
        assert time.monotonic() < deadline, f"{sock} did not appear"
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes] | None) -> int | None:
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{proc.args!r} ignored SIGTERM for 30 s") from None

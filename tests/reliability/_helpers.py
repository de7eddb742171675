"""Local helpers of the reliability tests: a layerfs daemon we can kill, stale-mount cleanup,
canary snapshots, and running an operation as another user.

The shared ``support.mounts`` context managers treat a dead daemon as a failure; these tests
kill daemons on purpose, so they keep the process handle themselves. Every mount made here is
unmounted in a ``finally`` (``fusermount3 -u``, then ``-u -z`` when the daemon is gone).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.mounts import is_mounted, layerfs_command
from support.mounts import layerfs_mount_cmd as mount_cmd

MOUNT_TIMEOUT = 30.0
EXIT_TIMEOUT = 20.0

PathLike = str | os.PathLike[str]


@dataclass
class Daemon:
    """A foreground ``layerfs mount -f`` process (its pid is the daemon's) and its log."""

    proc: subprocess.Popen[bytes]
    mnt: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=EXIT_TIMEOUT)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def wait_until(
    pred: Callable[[], bool], timeout: float, what: str, *, interval: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def unmount_any(mnt: PathLike) -> None:
    """Teardown: unmount MNT however it is (live, stale, kernel); lazily when that fails."""
    for _ in range(3):
        if not is_mounted(mnt):
            return
        r = subprocess.run(["fusermount3", "-u", os.fspath(mnt)], capture_output=True, check=False)
        if r.returncode != 0:
            subprocess.run(
                ["fusermount3", "-u", "-z", os.fspath(mnt)], capture_output=True, check=False
            )
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", os.fspath(mnt)], capture_output=True, check=False)


@contextlib.contextmanager
def layerfs_daemon(
    lowers: Sequence[PathLike],
    upper: PathLike | None,
    work: PathLike | None,
    mnt: PathLike,
    *,
    options: Sequence[str] = (),
    log: Path | None = None,
    env: dict[str, str] | None = None,
    flags: Sequence[str] = (),
) -> Iterator[Daemon]:
    """Run ``layerfs mount -f`` and wait for the mount; always unmount and reap it afterwards.

    The caller may kill the daemon, or unmount it, inside the block. ENV: added to the
    daemon's environment; FLAGS: to its command line (``--debug``).
    """
    mnt = Path(mnt)
    log = log or mnt.parent / f"{mnt.name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*mount_cmd(lowers, upper, work, mnt, options=options), *flags],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            env={**os.environ, **env} if env else None,
        )
    d = Daemon(proc, mnt, log)
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(mnt):
            if proc.poll() is not None:
                raise AssertionError(f"layerfs exited with {proc.returncode}:\n{d.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{mnt} not mounted after {MOUNT_TIMEOUT}s")
            time.sleep(0.02)
        # Mounted is not served yet: the daemon opens the layers (and cleans the workdir)
        # after mount(2), and the first request waits for that.
        os.stat(mnt)
        yield d
    finally:
        unmount_any(mnt)
        try:
            proc.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if is_mounted(path):
            r = subprocess.run(["umount", str(path)], capture_output=True, check=False)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def layerfs_umount(mnt: PathLike) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*layerfs_command(), "umount", os.fspath(mnt)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def probe_errno(path: PathLike) -> int:
    """0 when directory PATH can be listed, else the errno (ENOTCONN for a stale FUSE mount).

    A listing, not a stat: the kernel answers stat from its attribute cache without asking
    the (possibly dead) daemon."""
    try:
        os.listdir(path)
    except OSError as e:
        return e.errno or -1
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


def copy_in_progress(pid: int, work: PathLike) -> bool:
    """Whether daemon PID holds a copy-up open in WORK's work directory (an O_TMPFILE shows
    there as ``#INO (deleted)``, a named temporary as ``#lfs.*``)."""
    inside = os.path.join(os.fspath(work), "work") + "/"
    return any(t.startswith(inside) for t in fd_targets(pid))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def pids_naming(path: PathLike) -> list[int]:
    """Pids (not ours) whose command line contains PATH: the detached daemons of a mount."""
    needle = os.fsencode(os.fspath(path))
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if needle in fh.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def tree_state(root: PathLike) -> dict[bytes, tuple[object, ...]]:
    """Everything that a stray write would change below ROOT: type, mode, owner, size, mtime,
    content or target, for ROOT itself and every entry (never following a symlink)."""
    base = os.fsencode(root)
    out: dict[bytes, tuple[object, ...]] = {}

    def visit(rel: bytes) -> None:
        full = base + (b"/" + rel if rel else b"")
        st = os.lstat(full)
        extra: object = None
        if os.path.islink(full):
            extra = os.readlink(full)
        elif os.path.isfile(full) and not os.path.islink(full):
            with open(full, "rb") as fh:
                extra = fh.read()
        out[rel or b"."] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, extra)
        if os.path.isdir(full) and not os.path.islink(full):
            for name in sorted(os.listdir(full)):
                visit(rel + b"/" + name if rel else name)

    visit(b"")
    return out


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


# Every test here mounts tmpfs, chroots, mknods, switches users or reads other daemons' /proc.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

"""Serve a MountConfig: open the layers, mount, detach, and exit when the mount goes away.

The order is fixed by pyfuse3 and by container engines: layer fds are opened and the mount is
made *before* trio or any thread starts (a fork after that is unsafe); the caller returns only
once the mount is live (a readiness pipe carries "ok" or the error), and the detached daemon
holds none of the caller's stdin/stdout/stderr (podman reads stderr to EOF). When the kernel
ends the session (``fusermount3 -u``, ``umount -l``) ``pyfuse3.main`` returns and the daemon
exits; SIGTERM/SIGINT unmount; SIGHUP is ignored.

Must not import: mount_helper.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import logging.handlers
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from layerfs import _sys
from layerfs.config import MountConfig
from layerfs.errors import LayerfsError

if TYPE_CHECKING:  # imported when serving: the CLI starts without them
    from layerfs.ops import Operations
    from layerfs.overlay import Overlay

log = logging.getLogger("layerfs")


def serve(config: MountConfig) -> None:
    """Validate CONFIG and serve it; return once the mount is live (or, in the foreground,
    once it is gone). Raise LayerfsError with a one-line reason when it cannot be mounted."""
    config = config.validate()
    if not os.path.exists("/dev/fuse"):
        raise LayerfsError("/dev/fuse does not exist (is the fuse module loaded?)")
    if config.allow_other and os.geteuid() != 0 and not _user_allow_other():
        raise LayerfsError("allow_other needs root or user_allow_other in /etc/fuse.conf")
    if config.foreground:
        _setup_logging(config, detached=False)
        overlay = _open(config)
        _run(overlay, _mount(overlay))
        return
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # first child: new session, then the daemon proper
        os.close(rfd)
        try:
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            _daemon(config, wfd)
        except BaseException as e:  # report anything to the waiting caller
            with contextlib.suppress(OSError):
                os.write(wfd, b"error: " + str(e).encode(errors="replace"))
        os._exit(1)
    os.close(wfd)
    os.waitpid(pid, 0)
    with os.fdopen(rfd, "rb") as r:
        status = r.read()
    if status != b"ok":
        msg = status.decode(errors="replace").removeprefix("error: ").strip()
        raise LayerfsError(msg or "the daemon died before the mount was live")


def _daemon(config: MountConfig, ready_fd: int) -> None:
    """The detached daemon: mount, signal readiness, let go of the caller's stdio, serve."""
    os.chdir("/")
    try:
        overlay = _open(config)
        ops = _mount(overlay)
    except LayerfsError as e:
        os.write(ready_fd, b"error: " + str(e).encode())
        os._exit(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    _setup_logging(config, detached=True)
    os.write(ready_fd, b"ok")
    os.close(ready_fd)
    code = _run(overlay, ops)
    os._exit(code)


def _open(config: MountConfig) -> Overlay:
    from layerfs.overlay import Overlay

    _lock_workdir(config)
    _raise_fd_limit()
    try:
        return Overlay(config)
    except OSError as e:
        raise LayerfsError(f"cannot open layers: {e.strerror}: {e.filename or ''}") from None


_workdir_lock: int | None = None  # held open, and so locked, for the daemon's life
# How long a mount waits for the lock: a daemon whose mount was just unmounted still holds it
# until it exits (containerd's clients unmount a temporary mount of a rootfs and the shim
# mounts it again at once).
WORKDIR_LOCK_WAIT = 5.0


def _lock_workdir(config: MountConfig) -> None:
    """Take an exclusive flock on the workdir, held until the daemon exits: a second daemon on
    the same upper (two mounts of one container's snapshot) would corrupt it, so its mount fails
    with EBUSY once the holder has not let go for WORKDIR_LOCK_WAIT seconds. Kernel overlayfs
    refuses a workdir in use only with index=on (a warning otherwise); layerfs always
    refuses."""
    global _workdir_lock
    if config.workdir is None:
        return
    fd = os.open(config.workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    deadline = time.monotonic() + WORKDIR_LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise LayerfsError(
                    f"workdir {config.workdir} is in use by another mount (EBUSY)"
                ) from None
            time.sleep(0.02)
    _workdir_lock = fd


def _raise_fd_limit() -> None:
    """Lift the soft limit on open files to the hard one, as a daemon that keeps many fds
    should: the layers cache directory fds (layers.fd_cache_size), and container engines and
    systemd start programs with a soft limit of 1024 (where a tree walk over three layers
    used to fail with EMFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """What C code (libfuse) writes to fd 2 inside the block: the list's lines, after it."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines += tmp.read().decode(errors="replace").splitlines()


def _mount(overlay: Overlay) -> Operations:
    import pyfuse3

    from layerfs.ops import Operations, fuse_options

    ops = Operations(overlay)
    with _stderr_captured() as said:
        try:
            pyfuse3.init(ops, overlay.config.mountpoint, fuse_options(overlay))
        except RuntimeError as e:
            failed: RuntimeError | None = e
        else:
            failed = None
    if failed is not None:
        # one message: libfuse's own line (the reason: "fuse: device not found", ...) in ours
        why = "; ".join(ln for ln in said if ln) or str(failed)
        raise LayerfsError(f"cannot mount {overlay.config.mountpoint}: {why}") from None
    for line in said:
        print(line, file=sys.stderr)
    if os.environ.get("LAYERFS_OPEN_REQUESTS") != "1":  # kept for measuring the difference
        ops.skip_open_requests()
    return ops


def _run(overlay: Overlay, ops: Operations) -> int:
    import pyfuse3
    import trio

    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    unmount = False

    async def main() -> None:
        nonlocal unmount
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                nonlocal unmount
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    async for _ in sigs:
                        unmount = True
                        pyfuse3.terminate()
                        return

            nursery.start_soon(watch_signals)
            ops.answer_init()
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    code = 0
    if crash := os.environ.get("LAYERFS_CRASH_AT"):  # the crash-point tests' fault injection
        work = -1 if os.environ.get("LAYERFS_CRASH_WORK") == "1" else overlay.stack.work_fd
        _sys.crash_at(int(crash), work)
    try:
        trio.run(main)
    except BaseException:
        log.exception("daemon failed")
        code = 1
        unmount = True
    finally:
        try:
            pyfuse3.close(unmount=unmount)
        except Exception:
            log.exception("close failed")
        overlay.close()
    if unmount:
        _lazy_unmount(overlay.config.mountpoint)
    return code


def _lazy_unmount(mountpoint: str) -> None:
    if os.path.ismount(mountpoint):
        subprocess.run(
            ["fusermount3", "-u", "-z", mountpoint],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def _setup_logging(config: MountConfig, *, detached: bool) -> None:
    level = logging.DEBUG if config.debug else logging.WARNING
    handler: logging.Handler
    if config.log_file:
        handler = logging.FileHandler(config.log_file)
    elif not detached:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
    else:
        handler = logging.NullHandler()
    handler.setFormatter(
        logging.Formatter("layerfs[%(process)d] %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if not config.debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def _user_allow_other() -> bool:
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


FSTYPE = "fuse.layerfs"  # the type /proc/self/mountinfo shows (subtype=layerfs)


def mount_fstype(path: str) -> str | None:
    """The filesystem type of the mount on PATH (the topmost), from /proc/self/mountinfo."""
    found = None
    want = os.fsencode(path)
    with open("/proc/self/mountinfo", "rb") as fh:
        for line in fh:
            left, _, right = line.partition(b" - ")
            point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), left.split()[4])
            if point == want:
                found = right.split()[0].decode(errors="replace")
    return found


def umount(mountpoint: str) -> None:
    """Unmount MOUNTPOINT; a stale mount (daemon gone) is detached lazily."""
    path = os.path.abspath(mountpoint)
    try:
        os.stat(path)
        stale = False
    except OSError:
        stale = True
    if not stale and not os.path.ismount(path):
        raise LayerfsError(f"{mountpoint} is not a mount point")
    fstype = mount_fstype(path if stale else os.path.realpath(path))
    if fstype != FSTYPE:
        # never lazily detach somebody else's filesystem
        what = f"a {fstype} mount" if fstype else "not in this mount namespace's table"
        raise LayerfsError(f"{mountpoint} is not a layerfs mount ({what})")
    cmd = ["fusermount3", "-u"] + (["-z"] if stale else []) + [path]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        r2 = subprocess.run(["umount", "-l", path], capture_output=True, text=True, check=False)
        if r2.returncode != 0:
            raise LayerfsError(f"cannot unmount {mountpoint}: {r.stderr.strip()}")

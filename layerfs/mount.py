"""Serve a MountConfig: check, mount, leave a daemon serving it, and return at once.

The caller pays only for what can refuse the mount (layerfs.premount): the config, the
layers, the workdir lock, and mount(2) of a fresh /dev/fuse fd. A live mount is a mounted fd
(the kernel queues requests until someone reads them), so the caller hands the fd to the fork
server of its namespace (layerfs.forkserver), whose child, forked with trio, pyfuse3 and the
engine imported, opens the layers and serves it (libfuse's ``/dev/fd/N`` mount point), and
returns. With no server listening it starts one, which serves this mount through its first
child; with ``LAYERFS_FORKSERVER=0``, or when no server takes the fd, it forks a daemon of
its own, before any thread or trio exists. A daemon lets go of the caller's stdin, stdout
and stderr first (podman reads stderr to EOF). Should it fail after all, it logs why and
detaches the mount. When the kernel ends the session (``fusermount3 -u``, ``umount -l``)
``pyfuse3.main`` returns and the daemon exits; SIGTERM/SIGINT unmount; SIGHUP is ignored.

Must not import: mount_helper. Imported by ``mount.layerfs`` on every mount: logging,
pyfuse3, trio and the engine are imported by the daemon only.
"""

from __future__ import annotations

import os
import sys

from layerfs import forkclient, forkserver, premount
from layerfs.config import MountConfig
from layerfs.errors import LayerfsError

TYPE_CHECKING = False  # not typing's: importing typing costs the caller ~5 ms
if TYPE_CHECKING:  # imported when serving: the CLI starts without them
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any

    from layerfs import share
    from layerfs.forkserver import MountArgv
    from layerfs.ops import Operations
    from layerfs.overlay import Overlay


def serve(config: MountConfig, *, mount_argv: MountArgv | None = None) -> None:
    """Validate CONFIG and mount it; return once the mount is live (or, in the foreground,
    once it is gone). Raise LayerfsError with a one-line reason when it cannot be mounted;
    nothing is mounted then. A fork server started here answers thin requests
    (layerfs.forkclient) with MOUNT_ARGV."""
    config = config.validate()
    fuse_fd, lock_fd = _mount(config)
    if config.foreground:
        _setup_logging(config, detached=False)
        code = _serve_fd(config, fuse_fd)
        if code:
            raise LayerfsError("the daemon failed (see the log above)")
        return
    try:
        if forkclient.enabled() and forkserver.hand_off(
            config, fuse_fd, lock_fd, preload=_preload, serve=_daemon, mount_argv=mount_argv
        ):
            return
        forkserver.detach(lambda: _daemon(config, fuse_fd, lock_fd))
    except OSError as e:
        premount.unmount_lazy(config.mountpoint)
        raise LayerfsError(f"cannot start the daemon: {e.strerror}") from None
    finally:
        os.close(fuse_fd)
        _close(lock_fd)


def serve_here(config: MountConfig, ready: Callable[[], None]) -> int:
    """In a fork server's child (a thin request): check and mount the validated CONFIG as
    serve() does, call READY, then serve the mount in this process until it goes; return the
    exit status. Raise LayerfsError, with nothing mounted, when it cannot be mounted."""
    fuse_fd, lock_fd = _mount(config)  # the lock is held for the daemon's life
    ready()
    return _daemon(config, fuse_fd, lock_fd)


def _mount(config: MountConfig) -> tuple[int, int]:
    """Everything that can refuse the mount, then the mount: its /dev/fuse fd, and the
    workdir lock's fd (-1: no workdir), which the daemon holds (never closed) for its life."""
    if not os.path.exists("/dev/fuse"):
        raise LayerfsError("/dev/fuse does not exist (is the fuse module loaded?)")
    if config.allow_other and os.geteuid() != 0 and not _user_allow_other():
        raise LayerfsError("allow_other needs root or user_allow_other in /etc/fuse.conf")
    opts = premount.options(config)
    premount.check_layers(config)
    lock_fd = premount.lock_workdir(config.workdir) if config.workdir is not None else -1
    try:
        return premount.mount(config, opts), lock_fd
    except BaseException:
        _close(lock_fd)
        raise


def _close(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


def _preload() -> None:
    """What a daemon imports, imported once by the fork server before it forks the daemons
    (layerfs.forkserver): whatever a child imports itself is its own memory, not shared."""
    import importlib
    import logging.handlers
    import resource
    import signal

    from layerfs import compiled, importstub

    compiled.use()  # before the engine's first import (LAYERFS_COMPILED)

    importstub.import_pyfuse3()  # without importlib.metadata, which pyfuse3 wants for its version
    import pyfuse3
    import trio

    import layerfs.ops
    import layerfs.overlay
    from layerfs import fusehooks

    fusehooks.prepare(pyfuse3.__file__)  # the symbol table's walk, once for every child
    try:  # the compiled raw path, where built: imported by a child, 0.3-0.4 MiB of its own
        importlib.import_module("layerfs._craw")  # by name, as fusehooks.craw_module
    except ImportError:
        pass
    del importlib, logging, resource, signal, pyfuse3, layerfs, compiled, importstub, fusehooks

    async def warm() -> None:  # trio's first run fills caches: once here, not in every child
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 0)

    trio.run(warm)
    if os.environ.get("LAYERFS_WARM", "0") != "0":
        from layerfs import warmup

        warmup.warm()


def _daemon(config: MountConfig, fuse_fd: int, lock_fd: int) -> int:
    """The detached daemon: stdio already on /dev/null; leave the caller's cwd, log, serve
    (a share=K mount: through a process serving several, layerfs.share). It holds LOCK_FD,
    the workdir's lock (-1: none), for as long as it serves the mount."""
    os.chdir("/")
    try:
        _setup_logging(config, detached=True)
    except BaseException:
        premount.unmount_lazy(config.mountpoint)
        return 1
    if config.share > 1:
        from layerfs import share

        return share.serve(
            config,
            fuse_fd,
            lock_fd,
            serve_alone=lambda: _serve_fd(config, fuse_fd),
            serve_one=_serve_shared,
        )
    return _serve_fd(config, fuse_fd)


def _serve_shared(config: MountConfig, fuse_fd: int, m: share.Mount) -> None:
    """Serve one mount of a sharing process on this thread, with its own pyfuse3 and ops
    (M); return once the mount has gone. A failure before serving detaches the mount."""
    import logging

    import trio

    overlay = None
    try:
        overlay = _open(config)
        ops = _session(overlay, fuse_fd, m.fuse, m.ops)
    except BaseException:
        logging.getLogger("layerfs").exception("cannot serve %s", config.mountpoint)
        premount.unmount_lazy(config.mountpoint)
        # the process lives on: what this mount holds goes now (the fd: by _session once
        # it was called, here before)
        if overlay is None:
            os.close(fuse_fd)
        else:
            overlay.close()
        return

    async def main() -> None:
        m.token = trio.lowlevel.current_trio_token()
        if m.unmount:  # a SIGTERM while this mount was opening: Mount.terminate had no token
            return
        ops.answer_init()
        m.live.set()
        await m.fuse.main()

    try:
        trio.run(main)
    except BaseException:
        logging.getLogger("layerfs").exception("serving %s failed", config.mountpoint)
        m.unmount = True
    finally:
        m.token = None
        try:
            m.fuse.close(unmount=m.unmount)
        except Exception:
            logging.getLogger("layerfs").exception("close failed")
        overlay.close()
    if m.unmount:
        premount.unmount_lazy(config.mountpoint)


def _serve_fd(config: MountConfig, fuse_fd: int) -> int:
    """Open the layers and serve the mounted FUSE_FD until the mount goes; return the exit
    status. A failure before serving detaches the mount (its requests would hang)."""
    import logging

    try:
        overlay = _open(config)
        ops = _session(overlay, fuse_fd)
    except BaseException:
        logging.getLogger("layerfs").exception("cannot serve %s", config.mountpoint)
        premount.unmount_lazy(config.mountpoint)
        return 1
    return _run(overlay, ops)


def _open(config: MountConfig) -> Overlay:
    import logging

    from layerfs import compiled

    engine = compiled.use()  # before the engine's first import (the fork server's: its preload)
    asked = os.environ.get("LAYERFS_COMPILED", "") not in ("", "0")  # the default says why at info
    level = logging.WARNING if asked and engine != "compiled" else logging.INFO
    logging.getLogger("layerfs").log(level, "engine: %s", engine)
    from layerfs.overlay import Overlay

    if config.merge_pages:
        from layerfs import _sys

        _sys.merge_pages()
    _raise_fd_limit()
    # Every object the daemon makes gets the mode the request asks for, the caller's umask
    # applied by the engine (acl.inherit); ours would only keep new files from being made in
    # one step (Namespace._as_made). Set after the log file and the workdir were made.
    os.umask(0)
    return Overlay(config)


def _raise_fd_limit() -> None:
    """Lift the soft limit on open files to the hard one, as a daemon that keeps many fds
    should: the layers cache directory fds (layers.fd_cache_size), and container engines and
    systemd start programs with a soft limit of 1024 (where a tree walk over three layers
    used to fail with EMFILE)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _session(
    overlay: Overlay, fuse_fd: int, fuse: ModuleType | None = None, ops_module: Any = None
) -> Operations:
    """A libfuse session on the mounted fd (pyfuse3.init with the mount point /dev/fd/N),
    through FUSE and OPS_MODULE (a sharing process's copies, layerfs.share; else pyfuse3's
    and layerfs.ops). On a failure the fd is closed, and FUSE's session too once made."""
    if fuse is None or ops_module is None:
        import pyfuse3

        import layerfs.ops

        fuse, ops_module = pyfuse3, layerfs.ops
    try:
        ops: Operations = ops_module.Operations(overlay)
        fuse.init(ops, f"/dev/fd/{fuse_fd}", premount.options(overlay.config))
    except BaseException:
        os.close(fuse_fd)  # no session took it
        raise
    try:
        overlay.copyup.requests_waiting = _readable(fuse_fd)
        if os.environ.get("LAYERFS_OPEN_REQUESTS") != "1":  # kept for measuring the difference
            ops.skip_open_requests()
    except BaseException:
        # the session holds the fd now: closing it closes the fd, and a sharing process's
        # pyfuse3 copy can take its next mount (init again)
        fuse.close(unmount=False)
        raise
    return ops


def _readable(fd: int) -> Callable[[], bool]:
    """A test of whether FD (the session's /dev/fuse) has a request waiting to be read."""
    import select

    poll = select.poll()  # not select(): the fd can be above 1023
    poll.register(fd, select.POLLIN)
    return lambda: bool(poll.poll(0))


def _run(overlay: Overlay, ops: Operations) -> int:
    import logging
    import signal

    import pyfuse3
    import trio

    log = logging.getLogger("layerfs")
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
        from layerfs import _sys

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
    if unmount:  # the session is closed: the mount, if still there, is a dead one
        premount.unmount_lazy(overlay.config.mountpoint)
    return code


def _setup_logging(config: MountConfig, *, detached: bool) -> None:
    import logging
    import logging.handlers

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
    from layerfs import mountinfo  # typing comes with it: not on the mount path

    want = os.fsencode(path)
    types = [m.fstype for m in mountinfo.mounts() if m.point == want]
    return types[-1].decode(errors="replace") if types else None


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
    import subprocess

    cmd = ["fusermount3", "-u"] + (["-z"] if stale else []) + [path]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        r2 = subprocess.run(["umount", "-l", path], capture_output=True, text=True, check=False)
        if r2.returncode != 0:
            raise LayerfsError(f"cannot unmount {mountpoint}: {r.stderr.strip()}")

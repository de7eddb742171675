"""One process serving several mounts (``-o share=K``): memory for isolation.

A daemon serving one mount holds ~8 MiB of PSS of its own (docs/benchmarks.md, session 13,
multimount); a process serving K mounts shares the interpreter, the engine's code and the
imported modules between them (4.25 MiB a mount at K = 5, 3.6 at K = 20). The price: a crash
of the process (a fatal signal, an OOM kill, a hang holding the GIL) takes its K mounts, and
mounts of one process that are busy at once run one request at a time (the GIL).

pyfuse3 keeps its session in its extension's C globals, one mount per loaded extension: each
further mount of a process gets a private copy of the extension file (a memfd: nothing on disk,
nothing left by a kill), loaded under the name ``pyfuse3`` (a fresh dlopen, fresh globals, a
fresh ``pyfuse3._pyfuse3`` with its own FUSEError), and ``layerfs.ops`` imported afresh against
it (ops names ``pyfuse3`` at module level, and its request counters are then per mount). A
copy is kept for the next mount once its mount has gone. Each mount is served on a thread of
its own, in its own ``trio.run``; the main thread accepts more mounts and takes SIGTERM and
SIGINT (which unmount every mount of the process).

How a mount finds a process: the daemon of a ``share=K`` mount (forked by the fork server,
or detached) offers its mounted fd to the sharing processes of its key at abstract unix
sockets, slot by slot; the first with room takes it (``ready``; the daemon answers ``go`` and
exits, the process serves from ``go`` on: as the fork server's protocol, two processes never
serve one fd, and a mount is never left unserved). When none has room the daemon binds the
first free slot and becomes a sharing process itself; with every slot taken, it serves alone.
The key is what one process must have in common with the mounts it serves: the effective
uid, the user and mount namespaces (checked again on the peer, both ways: forkserver._peer),
the cgroups, the ``LAYERFS_*`` environment variables (read while serving), K, and the
options that change a process (log file, debug, ksm). So one user's process never serves
another user's mount, root never serves a rootless one, and a mount stays in its caller's
cgroup.

The process exits when its last mount has gone, its socket closed first (a daemon that
connected meanwhile reads EOF and takes the next slot, or becomes one).
"""

from __future__ import annotations

import _socket
import fcntl
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import select
import signal
import socket
import sys
import threading
import types
from collections.abc import Callable

import trio

from layerfs import forkclient, forkserver
from layerfs.config import MountConfig

log = logging.getLogger("layerfs")

SLOTS = 16  # sharing processes of one key a mount tries before it is served alone
TITLE = b"layerfs-share"  # the process's command line and comm
OFFER_TIMEOUT = 10.0  # seconds a daemon waits for a sharing process's ready
_MAX_OFFER = 1 << 20


def key(config: MountConfig) -> str:
    """What every mount of one sharing process has in common, hashed."""
    h = hashlib.sha256()
    for ns in ("user", "mnt"):
        h.update(b"%d\0" % os.stat(f"/proc/self/ns/{ns}").st_ino)
    with open("/proc/self/cgroup", "rb") as f:
        h.update(f.read())
    h.update(b"%d\0" % os.geteuid())
    for name, value in sorted(os.environb.items()):  # the variables a daemon reads
        if name.startswith(b"LAYERFS_"):
            h.update(name + b"=" + value + b"\0")
    fields = (config.share, config.log_file, config.debug, config.merge_pages)
    h.update(repr(fields).encode())
    # the code it would run, as the fork server's address: after an upgrade, or from another
    # install, a mount must not be served by a process of the old code
    h.update(b"%08x\0" % forkclient._code_identity())
    return h.hexdigest()[:32]


def _address(k: str, slot: int) -> bytes:
    return b"\0layerfs-share-%s-%d" % (k.encode(), slot)


def serve(
    config: MountConfig,
    fuse_fd: int,
    lock_fd: int,
    *,
    serve_alone: Callable[[], int],
    serve_one: Callable[[MountConfig, int, Mount], None],
) -> int:
    """In the daemon of a share=K mount (logging set up): have a sharing process of its key
    serve the mounted FUSE_FD (with LOCK_FD, -1: none), or become one; else SERVE_ALONE.
    SERVE_ONE serves a mount on the calling thread (layerfs.mount)."""
    k = key(config)
    payload = forkserver._encode(config, {}, 0)
    fds = [fuse_fd] + ([lock_fd] if lock_fd >= 0 else [])
    free: list[int] = []  # slots nobody holds
    for slot in range(SLOTS):  # a process with room first: a new one only when none has
        answer = _offer(_address(k, slot), payload, fds)
        if answer:
            return 0
        if answer is None:
            free.append(slot)
    for slot in free:
        addr = _address(k, slot)
        listener = _bind(addr)
        if listener is not None:
            return Sharer(config.share, listener, serve_one).run(config, fuse_fd, lock_fd)
        if _offer(addr, payload, fds):  # bound meanwhile by another daemon, with room
            return 0
    log.warning(  # one line: what it costs is memory, and who holds the slots is in ss -xlp
        "share: none of the %d slots of this key took %s or was free: served alone",
        SLOTS,
        config.mountpoint,
    )
    return serve_alone()


def _offer(addr: bytes, payload: bytes, fds: list[int]) -> bool | None:
    """Offer the mount at ADDR: True once a sharing process said ready and was told go; False
    when one is there and did not take it (full, refused, not ours); None when nobody is."""
    s = socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        # the timeout before the connect: a blocking one waits for room in the listener's
        # backlog, and anyone of the network namespace may bind our name with a full one
        # (BlockingIOError then: somebody is there, it did not take the mount)
        s.settimeout(OFFER_TIMEOUT)
        try:
            s.connect(addr)
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        if forkserver._peer(s) is None:  # another user's or namespace's socket at our name
            return False
        s.sendmsg([payload], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, _fds_bytes(fds))])
        if not s.recv(64).startswith(b"ready"):
            return False
        s.send(b"go")
        return True
    except OSError:
        return False
    finally:
        s.close()


def _fds_bytes(fds: list[int]) -> bytes:
    from array import array

    return array("i", fds).tobytes()


def _bind(addr: bytes) -> socket.socket | None:
    s = socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        s.bind(addr)
        s.listen(16)
    except OSError:
        s.close()
        return None
    return s


class Mount:
    """One mount of a sharing process: its pyfuse3 and ops modules, and its trio token (set
    by SERVE_ONE once it serves) through which the main thread ends it."""

    def __init__(self, fuse: types.ModuleType, ops: types.ModuleType) -> None:
        self.fuse = fuse
        self.ops = ops
        self.token: trio.lowlevel.TrioToken | None = None
        self.live = threading.Event()  # set once serving, or once it failed to
        self.unmount = False  # terminated by a signal: the thread unmounts when it ends
        self.done: Callable[[], None] = lambda: None

    def terminate(self) -> None:
        self.unmount = True
        if self.token is not None:
            try:
                trio.from_thread.run_sync(self.fuse.terminate, trio_token=self.token)
            except (trio.RunFinishedError, RuntimeError):
                pass


class Sharer:
    """The sharing process: serves its first mount and up to K-1 more, each on a thread."""

    def __init__(
        self,
        k: int,
        listener: socket.socket,
        serve_one: Callable[[MountConfig, int, Mount], None],
    ) -> None:
        self.k = k
        self.listener = listener
        self.serve_one = serve_one
        self.mounts: dict[int, Mount] = {}  # thread ident -> its mount
        self.free: list[Mount] = []  # copies whose mount has gone
        self.copies = 0
        self.lock = threading.Lock()
        self.wake_r, self.wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def run(self, config: MountConfig, fuse_fd: int, lock_fd: int) -> int:
        import pyfuse3

        import layerfs.ops

        stop = False

        def on_signal(signum: int, frame: object) -> None:
            nonlocal stop
            stop = True
            os.write(self.wake_w, b"s")

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        # named after no mount (it outlives its first): a mount's pid is in its statistics
        forkserver._set_title([TITLE], comm=TITLE)
        self._start(Mount(pyfuse3, layerfs.ops), config, fuse_fd, lock_fd)
        poller = select.poll()
        poller.register(self.listener.fileno(), select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        accepting = True
        try:
            while True:
                with self.lock:
                    if not self.mounts:
                        break
                    live = list(self.mounts.values())
                if stop:
                    if accepting:  # offers wait in the backlog: no poll may spin on them
                        poller.unregister(self.listener.fileno())
                        accepting = False
                    for m in live:
                        m.terminate()
                for fd, _ in poller.poll():
                    if fd == self.wake_r:
                        os.read(self.wake_r, 4096)
                    elif not stop:
                        self._accept()
        finally:
            self.listener.close()  # daemons still queued read EOF and go on to the next slot
        return 0

    def _start(self, m: Mount, config: MountConfig, fuse_fd: int, lock_fd: int) -> threading.Thread:
        def thread() -> None:
            try:
                self.serve_one(config, fuse_fd, m)
            finally:
                if lock_fd >= 0:
                    os.close(lock_fd)
                with self.lock:
                    del self.mounts[threading.get_ident()]
                    self.free.append(m)
                m.live.set()
                os.write(self.wake_w, b"x")

        t = threading.Thread(target=thread, name=f"layerfs {config.mountpoint}")
        with self.lock:
            t.start()
            assert t.ident is not None
            self.mounts[t.ident] = m
        return t

    def _accept(self) -> None:
        """Take one offered mount if there is room; serve it once its daemon says go."""
        from array import array

        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        fds: list[int] = []
        try:
            if forkserver._peer(conn) is None:  # before reading: anyone may connect
                raise ValueError("refused")
            conn.settimeout(OFFER_TIMEOUT)
            msg, cmsgs, flags, _ = conn.recvmsg(_MAX_OFFER, 24, 0x40000000)  # MSG_CMSG_CLOEXEC
            for level, kind, data in cmsgs:
                if (level, kind) == (_socket.SOL_SOCKET, _socket.SCM_RIGHTS):
                    got = array("i")
                    got.frombytes(data[: len(data) - len(data) % got.itemsize])
                    fds.extend(got)
            if not fds or len(fds) > 2:
                raise ValueError("refused")
            if flags & (_socket.MSG_TRUNC | _socket.MSG_CTRUNC):
                raise ValueError("truncated")
            config = forkserver._decode(msg)[0]
            if not isinstance(config, MountConfig):
                raise TypeError("not a mount")
            with self.lock:
                room = len(self.mounts) < self.k
                m = self.free.pop() if self.free and room else None
            if not room:
                raise ValueError("full")
            if m is None:
                m = Mount(*_load_copy(self.copies))
                self.copies += 1
            conn.send(b"ready")
            if conn.recv(16) != b"go":
                with self.lock:
                    self.free.append(m)
                raise ValueError("the daemon serves it itself")
        except Exception as e:
            if not isinstance(e, ValueError):
                log.warning("a mount offered was not taken: %r", e)
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        conn.close()
        self._start(m, config, fds[0], fds[1] if len(fds) > 1 else -1)


def _load_copy(n: int) -> tuple[types.ModuleType, types.ModuleType]:
    """A private pyfuse3 (its extension copied into a memfd) and a layerfs.ops bound to it."""
    import pyfuse3

    # kept open (fusehooks reads its symbols), not inherited by what we exec (fusermount3),
    # and sealed once written: the code this process runs is not a writable file
    fd = os.memfd_create(f"layerfs-pyfuse3-{n}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    with open(pyfuse3.__file__, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        done = 0
        while done < size:  # sendfile may copy less than asked
            done += os.sendfile(fd, src.fileno(), done, size - done)
    seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return load_copy(f"/proc/self/fd/{fd}")


def load_copy(path: str) -> tuple[types.ModuleType, types.ModuleType]:
    """pyfuse3 loaded from PATH (a copy of its extension: fresh C globals) and a layerfs.ops
    imported against it; sys.modules left as it was."""
    import pyfuse3

    import layerfs
    from layerfs import importstub

    names = ("pyfuse3", "pyfuse3._pyfuse3", "layerfs.ops", "importlib.metadata")
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    saved_ops = layerfs.__dict__.get("ops")
    try:
        stub = types.ModuleType("importlib.metadata")
        stub.PackageNotFoundError = importstub._PackageNotFoundError  # type: ignore[attr-defined]
        stub.version = importstub._version  # type: ignore[attr-defined]
        sys.modules["importlib.metadata"] = stub
        spec = importlib.util.spec_from_file_location(
            "pyfuse3",
            path,
            loader=importlib.machinery.ExtensionFileLoader("pyfuse3", path),
            submodule_search_locations=[os.path.dirname(pyfuse3.__file__)],
        )
        assert spec is not None and spec.loader is not None
        fuse = importlib.util.module_from_spec(spec)
        sys.modules["pyfuse3"] = fuse
        spec.loader.exec_module(fuse)
        import layerfs.ops as ops

        return fuse, ops
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
        if saved_ops is not None:
            layerfs.ops = saved_ops

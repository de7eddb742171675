"""Let the kernel skip OPEN/RELEASE and OPENDIR/RELEASEDIR: libfuse's "no open support".

A FUSE filesystem that answers OPEN (OPENDIR) with ENOSYS is never sent OPEN, RELEASE and FLUSH
(OPENDIR, RELEASEDIR) again on that mount; the kernel then keeps file pages across opens
(FOPEN_KEEP_CACHE) and directory listings (FOPEN_CACHE_DIR) by itself (fs/fuse/file.c,
fuse_do_open). That is two round trips less for every file a tar, a container start or a tree
walk opens. pyfuse3 3.5 cannot serve it as it is: its read, write, fsync and readdir handlers
pass on the file handle but not the inode, and without OPEN every handle is 0.

So this module puts a shim in front of those entries of the libfuse session's operation table:
when the request's ``fuse_file_info.fh`` is 0 it writes ``NODE_FH | inode`` there and calls
pyfuse3's handler, and the engine serves the request by inode. The write shim also records the
writer's credentials (pyfuse3 passes none to write), for clearing setuid/setgid bits. At INIT
the shim asks for FUSE_CAP_CACHE_SYMLINKS (symlink targets cached by the kernel; pyfuse3 does
not ask) and drops FUSE_CAP_ATOMIC_O_TRUNC (O_TRUNC must reach us as a SETATTR, since no OPEN
carries it); it asks for FUSE_CAP_POSIX_ACL with FUSE_CAP_DONT_MASK, so the kernel enforces
POSIX ACLs and leaves their inheritance (and the umask) to layerfs.acl. ``answer_init`` then
lets libfuse answer INIT and adds the one flag it cannot ask for, FUSE_HANDLE_KILLPRIV_V2:
without it every write is preceded by a GETXATTR of security.capability. ``serve_fallocate``
and ``serve_ioctl`` fill the table's FALLOCATE and IOCTL entries, which pyfuse3 leaves empty.
``serve_loop`` replaces pyfuse3's wait for the next request with one that sleeps in ``poll()``
when trio has nothing else to do (docs/concurrency.md, the poll loop).

Found by symbol, checked by value: the session is pyfuse3's module variable ``session`` (read
from the ELF symbol table of its extension), and the operation table inside the session is
located by comparing it word for word with pyfuse3's own ``fuse_ops``. Anything unexpected
leaves the session untouched, and the adapter then answers OPEN as before.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import importlib
import logging
import mmap
import os
import select
import struct
import types
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any, cast

import trio

from layerfs.attrs import Attr
from layerfs.files import NODE_FH

log = logging.getLogger(__name__)


# struct fuse_lowlevel_ops (libfuse 3.x): entry indexes
_N_OPS = 44
_INIT, _READ, _FSYNC, _FSYNCDIR, _WRITE_BUF, _READDIRPLUS = 0, 15, 19, 23, 36, 41
_FALLOCATE, _IOCTL = 40, 34
_FI_FH = 16  # offsetof(struct fuse_file_info, fh)
_CONN_CAPABLE, _CONN_WANT = 20, 24  # offsetof(struct fuse_conn_info, capable / want)
NOBODY = 0xFFFF_FFFF
CAP_ATOMIC_O_TRUNC = 1 << 3
CAP_DONT_MASK = 1 << 6
CAP_SPLICE_READ = 1 << 9
CAP_POSIX_ACL = 1 << 19
CAP_CACHE_SYMLINKS = 1 << 23

_c_ino = ctypes.c_uint64
_vp = ctypes.c_void_p
_INIT_ARGS = (_vp, _vp)
_READ_ARGS = (_vp, _c_ino, ctypes.c_size_t, ctypes.c_int64, _vp)
_FSYNC_ARGS = (_vp, _c_ino, ctypes.c_int, _vp)
_WRITE_BUF_ARGS = (_vp, _c_ino, _vp, ctypes.c_int64, _vp)
_FALLOCATE_ARGS = (_vp, _c_ino, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, _vp)
_size = ctypes.c_size_t
_IOCTL_ARGS = (_vp, _c_ino, ctypes.c_uint, _vp, _vp, ctypes.c_uint, _vp, _size, _size)


# The ctypes types and library handles the hooks use, made once (prepare: in the fork server,
# whose children then only use them); making them is a class each, ~0.6 ms in every daemon.
_SIGNATURES = (_INIT_ARGS, _READ_ARGS, _FSYNC_ARGS, _WRITE_BUF_ARGS, _FALLOCATE_ARGS, _IOCTL_ARGS)


@functools.cache
def _shim_type(args: tuple[type, ...]) -> type:
    return ctypes.CFUNCTYPE(None, *args)  # called by libfuse


@functools.cache
def _handler_type(args: tuple[type, ...]) -> Any:
    # pyfuse3's handlers run with the GIL held, as libfuse calls them from pyfuse3's loop:
    # call them the same way (PYFUNCTYPE keeps the GIL; it makes a new class at each call)
    return ctypes.PYFUNCTYPE(None, *args)


def _handler(args: tuple[type, ...], address: int) -> Any:
    return _handler_type(args)(address)


@functools.cache
def _libfuse() -> ctypes.CDLL:
    return ctypes.CDLL("libfuse3.so.3")  # the one handle


class _Ctx(ctypes.Structure):
    _fields_ = [
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("pid", ctypes.c_int32),
        ("umask", ctypes.c_uint32),
    ]


@dataclass
class Hooks:
    """Installed hooks; ``writer`` is (uid, gid, pid) of the write request being served."""

    session: int  # struct fuse_session *
    table: int = 0  # its struct fuse_lowlevel_ops
    writer: tuple[int, int, int] = (0, 0, 0)
    raw: bool = False  # requests are read by the raw path (serve_loop): no splice read


_keep: list[object] = []  # the ctypes callbacks must live as long as the session


def _set_handler(table: int, index: int, args: tuple[type, ...], fn: Callable[..., None]) -> None:
    """Put FN, a handler taking ARGS, in slot INDEX of libfuse's operation table (kept alive
    for the session's life)."""
    shim = _shim_type(args)(fn)
    _keep.append(shim)
    ctypes.c_void_p.from_address(table + 8 * index).value = ctypes.cast(shim, _vp).value


def _reply_err() -> Any:
    """libfuse's fuse_reply_err(req, errno)."""
    reply_err = _libfuse().fuse_reply_err
    reply_err.argtypes = [_vp, ctypes.c_int]
    return reply_err


# pyfuse3's module variables the hooks read: its session, its operation table, its loop's state
_SESSION = b"__pyx_v_7pyfuse3_session"
_FUSE_OPS = b"__pyx_v_7pyfuse3_fuse_ops"
_WORKER_DATA = b"__pyx_v_7pyfuse3_worker_data"
# extension path -> its symbols' addresses in this process (None: not all found), see prepare
_found: dict[str, dict[bytes, int] | None] = {}


def prepare(extension: str) -> None:
    """Find the addresses of the pyfuse3 EXTENSION's variables that ``install`` and
    ``serve_loop`` read, now. Walking its symbol table takes ~2 ms of Python; the fork server
    calls this before it forks, and every daemon forked from it (same mappings, same
    addresses) finds them without a walk of its own, on the way to its first answer; with
    them the ctypes types and library handle the hooks are made of."""
    _addresses(extension)
    _libfuse()
    for args in _SIGNATURES:
        _shim_type(args)
        _handler_type(args)


def _addresses(extension: str) -> dict[bytes, int] | None:
    """The addresses of _SESSION, _FUSE_OPS and _WORKER_DATA in the loaded EXTENSION, looked
    up once per process (and inherited by forked children); None when one is missing."""
    if extension not in _found:
        wanted = {_SESSION, _FUSE_OPS, _WORKER_DATA}
        syms = _symbols(extension, wanted)
        base = _load_base(extension)
        if base is None or set(syms) != wanted:
            _found[extension] = None
        else:
            _found[extension] = {name: base + value for name, value in syms.items()}
    return _found[extension]


def _symbols(path: str, wanted: set[bytes]) -> dict[bytes, int]:
    """Values of the symbols WANTED in the .symtab of the ELF64 file PATH.

    The file is mapped, not read: pyfuse3's 4 MiB read into a bytes object was a daemon's
    heap, and freeing it raised glibc's mmap and trim thresholds so that the next read
    stayed there: 3.7 MiB private in every daemon (docs/benchmarks.md, session 10, pss3)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as data:
        return _symtab(data, wanted)


def _symtab(data: mmap.mmap, wanted: set[bytes]) -> dict[bytes, int]:
    if data[:5] != b"\x7fELF\x02" or data[5] != 1:
        return {}
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    header = "<IIQQQQIIQQ"  # Elf64_Shdr
    sections = [struct.unpack_from(header, data, shoff + i * shentsize) for i in range(shnum)]
    found: dict[bytes, int] = {}
    for _name, sh_type, _fl, _addr, off, size, link, _info, _al, entsize in sections:
        if sh_type != 2 or not entsize:  # SHT_SYMTAB
            continue
        stroff = sections[link][4]
        for pos in range(off, off + size, entsize):
            st_name, _info8, _other, _shndx, value, _size = struct.unpack_from("<IBBHQQ", data, pos)
            end = data.find(b"\0", stroff + st_name)
            name = data[stroff + st_name : end]
            if name in wanted:
                found[name] = value
    return found


def _load_base(path: str) -> int | None:
    """Where the extension file PATH is mapped from its start: found by the file's identity
    (device, inode), not its name, so that a copy loaded from a memfd (layerfs.share), whose
    name in the maps is ``/memfd:... (deleted)``, is found too."""
    st = os.stat(path)
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) < 6 or int(parts[2], 16) != 0 or int(parts[4]) != st.st_ino:
                continue
            major, minor = (int(x, 16) for x in parts[3].split(":"))
            if os.makedev(major, minor) == st.st_dev:
                return int(parts[0].split("-")[0], 16)
    return None


def _words(addr: int, n: int) -> tuple[int, ...]:
    return struct.unpack(f"<{n}Q", ctypes.string_at(addr, 8 * n))


def install(extension: str) -> Hooks | None:
    """Hook the live session of the pyfuse3 EXTENSION module file (after ``pyfuse3.init``,
    before ``pyfuse3.main``). Return None, changing nothing, where anything is unexpected."""
    try:
        return _install(extension)
    except Exception as e:  # a layout we do not know: serve without the hooks
        log.info("no-open hooks not installed (%s)", e)
        return None


def _install(extension: str) -> Hooks | None:
    found = _addresses(extension)
    if found is None:
        log.info("no-open hooks: pyfuse3 symbols not found")
        return None
    session = _words(found[_SESSION], 1)[0]
    ops = _words(found[_FUSE_OPS], _N_OPS)
    needed = (_INIT, _READ, _FSYNC, _FSYNCDIR, _WRITE_BUF, _READDIRPLUS)
    if not session or not all(ops[i] for i in needed):
        log.info("no-open hooks: pyfuse3 session or handlers missing")
        return None
    # struct fuse_session starts with a few pointers and ints, then the operation table
    table = next(
        (session + k for k in range(0, 128, 8) if _words(session + k, _N_OPS) == ops), None
    )
    if table is None:
        log.info("no-open hooks: operation table not found in the session")
        return None

    hooks = Hooks(session, table)
    libfuse = _libfuse()
    req_ctx = libfuse.fuse_req_ctx
    req_ctx.restype = ctypes.POINTER(_Ctx)
    req_ctx.argtypes = [_vp]

    def mark(ino: int, fi: int | None) -> None:
        if fi:
            fh = ctypes.c_uint64.from_address(fi + _FI_FH)
            if fh.value == 0:
                fh.value = NODE_FH | ino

    orig_init = _handler(_INIT_ARGS, ops[_INIT])
    orig_write_buf = _handler(_WRITE_BUF_ARGS, ops[_WRITE_BUF])

    def init(userdata: int | None, conn: int) -> None:
        orig_init(userdata, conn)
        capable = ctypes.c_uint32.from_address(conn + _CONN_CAPABLE).value
        want = ctypes.c_uint32.from_address(conn + _CONN_WANT)
        want.value &= ~CAP_ATOMIC_O_TRUNC
        if capable & CAP_CACHE_SYMLINKS:
            want.value |= CAP_CACHE_SYMLINKS
        if hooks.raw:  # libfuse must read through the session's io (RawPath.read)
            want.value &= ~CAP_SPLICE_READ
        if capable & CAP_POSIX_ACL and capable & CAP_DONT_MASK:
            # the kernel enforces ACLs; new objects get their modes unmasked, with the umask
            # beside: inheriting a default ACL (or applying the umask) is ours (layerfs.acl)
            want.value |= CAP_POSIX_ACL | CAP_DONT_MASK

    def write_buf(req: int, ino: int, bufv: int, off: int, fi: int | None) -> None:
        mark(ino, fi)
        ctx = req_ctx(req)  # never NULL for a live request; if it were: an unprivileged writer
        hooks.writer = (ctx[0].uid, ctx[0].gid, ctx[0].pid) if ctx else (NOBODY, NOBODY, 0)
        orig_write_buf(req, ino, bufv, off, fi)

    def marking(orig: Any) -> Any:
        """A shim for a handler taking (req, ino, ..., fi): mark the handle, then call it."""

        def shim(req: int, ino: int, *rest: Any) -> None:
            mark(ino, rest[-1])
            orig(req, ino, *rest)

        return shim

    marked = {
        _READ: _READ_ARGS,
        _FSYNC: _FSYNC_ARGS,
        _FSYNCDIR: _FSYNC_ARGS,
        _READDIRPLUS: _READ_ARGS,
    }
    handlers = [(i, args, marking(_handler(args, ops[i]))) for i, args in marked.items()]
    handlers += [(_INIT, _INIT_ARGS, init), (_WRITE_BUF, _WRITE_BUF_ARGS, write_buf)]
    for index, args, fn in handlers:  # each shim holds the handler it calls
        _set_handler(table, index, args, fn)
    return hooks


def serve_fallocate(
    hooks: Hooks,
    fallocate: Callable[[int, int, int, int, int, int, int], Awaitable[None]],
    spawn: Callable[..., object],
) -> None:
    """Serve FALLOCATE, which pyfuse3 leaves out of its operation table (libfuse then answers
    ENOSYS, and the kernel EOPNOTSUPP for good): await FALLOCATE(fh, mode, offset, length,
    uid, gid, pid) (the caller, for clearing setuid/setgid as a write does) in a task started
    by SPAWN(async_fn, *args) (trio.lowlevel.spawn_system_task: the handler runs inside
    pyfuse3's loop, on the trio thread) and answer with the errno it raised (an ``errno``
    attribute: OSError, pyfuse3.FUSEError), 0 when it returned. FH is the request's handle,
    or ``NODE_FH | inode`` without one."""
    reply_err = _reply_err()
    req_ctx = _libfuse().fuse_req_ctx
    req_ctx.restype = ctypes.POINTER(_Ctx)
    req_ctx.argtypes = [_vp]

    async def run(req: int, fh: int, mode: int, offset: int, length: int, who: Any) -> None:
        err = 0
        try:
            await fallocate(fh, mode, offset, length, *who)
        except Exception as e:  # every request gets its answer, whatever happened
            err = getattr(e, "errno", None) or errno.EIO
        reply_err(req, err)

    def shim(req: int, ino: int, mode: int, offset: int, length: int, fi: int | None) -> None:
        fh = ctypes.c_uint64.from_address(fi + _FI_FH).value if fi else 0
        ctx = req_ctx(req)  # as write_buf's: never NULL for a live request
        who = (ctx[0].uid, ctx[0].gid, ctx[0].pid) if ctx else (NOBODY, NOBODY, 0)
        try:
            spawn(run, req, fh or NODE_FH | ino, mode, offset, length, who)
        except Exception:
            log.exception("cannot serve FALLOCATE")
            reply_err(req, errno.EIO)

    _set_handler(hooks.table, _FALLOCATE, _FALLOCATE_ARGS, shim)


def serve_ioctl(
    hooks: Hooks,
    ioctl: Callable[[int, int, bytes, int], Awaitable[bytes]],
    spawn: Callable[..., object],
) -> None:
    """Serve FUSE_IOCTL, which pyfuse3 does not forward: await IOCTL(inode, cmd, in_data,
    out_size) in a task started by SPAWN and answer with the bytes it returned (result 0),
    or with the errno it raised, as serve_fallocate. The kernel sends a FUSE filesystem only
    restricted ioctls (fixed-size data, copied in and out by the kernel): for the inode flag
    ioctls, from fuse_fileattr_get/set."""
    reply_err = _reply_err()
    reply_ioctl = _libfuse().fuse_reply_ioctl
    reply_ioctl.argtypes = [_vp, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]

    async def run(req: int, ino: int, cmd: int, data: bytes, out_size: int) -> None:
        try:
            out = await ioctl(ino, cmd, data, out_size)
        except Exception as e:  # every request gets its answer, whatever happened
            reply_err(req, getattr(e, "errno", None) or errno.EIO)
            return
        reply_ioctl(req, 0, out, len(out))

    def shim(
        req: int,
        ino: int,
        cmd: int,
        _arg: int | None,
        _fi: int | None,
        _flags: int,
        in_buf: int | None,
        in_size: int,
        out_size: int,
    ) -> None:
        data = ctypes.string_at(in_buf, in_size) if in_buf and in_size else b""
        try:
            spawn(run, req, ino, cmd, data, out_size)
        except Exception:
            log.exception("cannot serve IOCTL")
            reply_err(req, errno.EIO)

    _set_handler(hooks.table, _IOCTL, _IOCTL_ARGS, shim)


_WD_COUNTS, _WD_LOCK, _WD_ACTIVE = 24, 32, 40  # _WorkerData: task_count, read_lock, active_readers
_MAX_POLL_MS = 86_400_000  # trio's own longest sleep, a day


def serve_loop(
    hooks: Hooks,
    extension: str,
    module: Any,
    counts: dict[str, int],
    raw: RawOps | CRawOps | None = None,
) -> bool:
    """Replace pyfuse3's ``_wait_fuse_readable`` (its loop looks it up in MODULE's dictionary
    at each request) with ``_PollLoop.wait``, which blocks in ``poll()`` on /dev/fuse and
    trio's epoll fd when trio has nothing else to do, instead of a pass through trio's
    scheduler between every two requests. COUNTS gets ``loop_poll`` (requests found by the
    poll) and ``loop_trio`` (waits through trio). With RAW, the wait reads each request
    itself and answers the hottest ones through RAW (``_RawPath``; COUNTS' ``loop_raw``),
    compiled (``layerfs._craw``) when RAW is a CRawOps; call before INIT is answered.
    False, changing nothing, where pyfuse3's layout is not the one known (the pyfuse3 loop
    then serves as before)."""
    found = _addresses(extension)
    if found is None:
        return False
    wd = _words(found[_WORKER_DATA], 1)[0]
    if not wd or type(ctypes.cast(wd, ctypes.py_object).value).__name__ != "_WorkerData":
        return False
    if _words(wd + _WD_COUNTS, 1)[0] != 0 or _words(wd + _WD_LOCK, 1)[0] != id(None):
        return False  # not the fresh worker data of pyfuse3.init we know
    active = ctypes.c_int.from_address(wd + _WD_ACTIVE)
    if active.value != 0 or not callable(getattr(module, "_wait_fuse_readable", None)):
        return False
    loop = _PollLoop(hooks.session, active, module, counts)
    if isinstance(raw, CRawOps):
        loop.raw = _install_craw(hooks, loop.fd, raw, counts)
        loop.compiled = loop.raw is not None
    elif raw is not None and _RAW_LAYOUT:  # the structs as the kernel lays them out
        loop.raw = _RawPath.install(hooks, loop.fd, raw, counts)
    module._wait_fuse_readable = loop.wait
    return True


class _PollLoop(trio.abc.Instrument):
    """pyfuse3's wait for the next request, without trio's scheduler when nothing else is due.

    pyfuse3's invariants are kept: one task at a time waits for /dev/fuse (the read duty,
    ``owner``; others park in ``spares``), nothing is awaited between the fd found readable
    and pyfuse3's read of it, and pyfuse3's ``active_readers`` counts the tasks inside
    ``wait`` (pyfuse3 starts another reader when none is left). The blocking ``poll()`` is
    taken only when trio could not run anything meanwhile: no task runnable (``runnable``
    counts trio's run queue and the rest of the batch being run, which is off the queue: the
    hang of session 9's prototype, docs/benchmarks.md session 10), no timer due before it
    ends (it is bounded by trio's next deadline), and trio's epoll fd quiet (ready I/O,
    thread completions and signals all come through it: trio's wake-up socket); anything of
    trio's ready ends it, and the request is then waited for through trio. A trio instrument
    keeps the count; it also hands the read duty to a spare only when the task that gave it
    up parks (in a handler that awaits): a reader whose handler answered at once takes it
    back without a pass through trio."""

    def __init__(self, session: int, active: ctypes.c_int, module: Any, counts: Any) -> None:
        libfuse = _libfuse()
        libfuse.fuse_session_fd.argtypes = [_vp]
        libfuse.fuse_session_exited.argtypes = [_vp]
        self.exited = libfuse.fuse_session_exited
        self.session = session
        self.fd: int = libfuse.fuse_session_fd(session)
        self.active = active
        self.module = module
        self.original = module._wait_fuse_readable
        self.counts = counts
        self.owner = False  # a task holds the read duty (waits for the fd in an await)
        self.spares = trio.lowlevel.ParkingLot()  # the other readers
        self.runner: Any = None
        self.runnable = 0  # tasks trio would run before its next I/O wait
        self.counting = False  # runnable is exact (from the first I/O wait on)
        self.poller = select.poll()
        self.raw: _RawPath | Any = None  # Any: a layerfs._craw.RawPath
        self.compiled = False  # raw is layerfs._craw's
        self.epoll = -1  # trio's epoll fd
        # the C wait (layerfs._craw's serve) bounds its poll by trio's timers itself: its
        # clock is trio's system clock (CLOCK_MONOTONIC); with another, it leaves a wait
        # with a timer set to _poll
        self.timers = False

    def _attach(self) -> bool:
        """Find trio's runner and hook in; False if its internals are not the ones known."""
        try:
            runner: Any = trio._core._run.GLOBAL_RUN_CONTEXT.runner
            epoll_fd = runner.io_manager._epoll.fileno()
            names = ["runq", "waiting_for_idle", "deadlines._heap", "deadlines.next_deadline"]
            names.append("clock.current_time")
            for used in names:
                obj = runner
                for name in used.split("."):
                    obj = getattr(obj, name)  # raises where trio is not the one known
        except AttributeError as e:
            log.info("poll loop not used: trio's runner is not the one known (%s)", e)
            return False
        self.runner = runner
        self.epoll = epoll_fd
        self.timers = type(runner.clock) is trio._core._run.SystemClock
        self.poller.register(self.fd, select.POLLIN)
        self.poller.register(epoll_fd, select.POLLIN)
        trio.lowlevel.add_instrument(self)
        return True

    # trio.abc.Instrument: each is called on the trio thread, by its run loop
    def after_io_wait(self, timeout: float) -> None:
        self.runnable = len(self.runner.runq)  # the next batch, before any task of it runs
        self.counting = True

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        self.runnable += 1

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.runnable -= 1

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if not self.owner and self.spares:
            self.spares.unpark()  # the duty is free and its last holder parked: pass it on

    async def wait(self) -> bool:
        """True when /dev/fuse has a request to read, False when the loop should end. With
        the raw path, the request has been read: the hottest are answered here, one after
        the other, and the wait returns with the first one that is not, for pyfuse3's loop
        to read from the raw path's buffer and hand to libfuse as usual."""
        if self.runner is None and not self._attach():
            self.module._wait_fuse_readable = self.original
            return bool(await self.original())
        raw = self.raw
        if self.compiled:
            return await self._wait_compiled(raw)
        while True:
            # Found by the poll with nothing awaited: no other task ran meanwhile, so the read
            # duty and pyfuse3's active_readers (which pyfuse3 reads between awaits only) need
            # not be taken for it, and the session's exit flag is the one pyfuse3's loop just
            # checked (or that nothing since could set: a raw answer awaits nothing)
            polled = not self.owner
            if polled and self._poll():
                self.counts["loop_poll"] += 1
            elif not await self._wait_trio(polled):
                return False
            if raw is None or not raw.take():
                return True

    async def _wait_compiled(self, craw: Any) -> bool:
        """``wait`` with the compiled raw path (layerfs._craw): the same steps, the poll
        and the answers in C (``serve``) while trio has nothing to do before its next
        timer.
        A SETATTR or MKNOD whose core awaits (not met: the cores are asked only where no
        copy-up is due) is awaited here, in this task, where its first step ran."""
        while True:
            polled = not self.owner  # as in wait
            got = craw.serve(self, self.runner, self.epoll) if polled else _C_NOPOLL
            if got == _C_NOPOLL:
                if polled and self._poll():
                    self.counts["loop_poll"] += 1
                elif not await self._wait_trio(polled):
                    return False
                got = craw.take()
            elif got == _C_TRIO:  # polled: trio has something ready
                if not await self._wait_trio(True):
                    return False
                got = craw.take()
            if got == _C_PARKED:
                coro, yielded = craw.parked
                try:
                    result = await _resume(coro, yielded)
                except BaseException as e:
                    craw.finish(None, e if isinstance(e, Exception) else OSError(errno.EIO))
                    if not isinstance(e, Exception):
                        raise
                else:
                    craw.finish(result, None)
            elif got == _C_PENDING:
                return True

    async def _wait_trio(self, polled: bool) -> bool:
        """Wait for /dev/fuse through trio, holding the read duty; POLLED: polled since the
        last task ran. False when the loop should end."""
        self.active.value += 1
        try:
            while self.owner:
                polled = False
                await self.spares.park()
            self.owner = True
            try:
                if self.exited(self.session):
                    return False
                if not polled and self._poll():  # not polled since the last task ran
                    self.counts["loop_poll"] += 1
                    return True
                self.counts["loop_trio"] += 1
                await trio.lowlevel.wait_readable(self.fd)
            finally:
                self.owner = False
        except trio.ClosedResourceError:  # pyfuse3.terminate
            return False
        finally:
            self.active.value -= 1
        return True

    def _poll(self) -> bool:
        """Block until /dev/fuse or anything of trio's is ready, if trio has nothing to do
        meanwhile; True if /dev/fuse alone is: the request can be read without trio."""
        runner = self.runner
        if not self.counting or self.runnable or runner.waiting_for_idle:
            return False
        ms = -1
        if runner.deadlines._heap:  # a timer is set (else no deadline: no clock to read)
            sleep = runner.deadlines.next_deadline() - runner.clock.current_time()
            if sleep <= 0:
                return False
            if sleep != float("inf"):
                ms = min(_MAX_POLL_MS, int(sleep * 1000) + 1)
        ready = self.poller.poll(ms)
        return len(ready) == 1 and ready[0][0] == self.fd


# layerfs._craw's answers to the wait (its NOPOLL, PENDING, TRIO, PARKED)
_C_CODES = _C_NOPOLL, _C_PENDING, _C_TRIO, _C_PARKED = 0, 1, 2, 3


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Attr], yielded: Any) -> Generator[Any, Any, Attr]:
    """The rest of CORO, whose first step (run from C in this task) yielded YIELDED to trio:
    what ``await`` does after a first step, done by hand."""
    while True:
        try:
            sent = yield yielded
        except BaseException as e:
            try:
                yielded = coro.throw(e)
            except StopIteration as stop:
                return cast(Attr, stop.value)
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return cast(Attr, stop.value)


@dataclass
class RawOps:
    """What the raw path answers with: the adapter's synchronous cores (layerfs.ops), each
    counted and its errors mapped by the adapter. ``lookup(parent, name)``: the attributes
    (one lookup counted on the node), None for a negative entry, or an errno;
    ``getattr(node)``: the attributes or an errno; ``getxattr(node, name)``: the value or an
    errno; ``forget([(node, n), ...])``. LISTINGS: the copy-up's directories whose cached
    listings the kernel must drop before the next reply (a core's ``Overlay.fix_origin``,
    or a READDIR before), INVALIDATE(ids) drops them (see ``_Replies``). TIMEOUT: seconds
    the kernel may keep entries and attributes."""

    lookup: Callable[[int, bytes], Attr | int | None]
    getattr: Callable[[int], Attr | int]
    getxattr: Callable[[int, bytes], bytes | int]
    forget: Callable[[list[tuple[int, int]]], None]
    listings: list[int]
    invalidate: Callable[[list[int]], Awaitable[None]]
    timeout: float


class _Replies:
    """How both raw paths write a reply (the compiled one calls ``defer`` only).

    A reply the kernel refuses (ENOENT: the request was aborted) carries no reference: the
    lookup counted for its node (NODE, 0 for a reply without one) is given back. A reply
    written while the copy-up has listings to invalidate (LISTINGS not empty) waits for
    them: a handler awaits ``ops._invalidate_listings`` before it answers (its thread may
    wait for page locks a READDIR in flight holds), so that the listing read after the
    answer is the new one (``Overlay.fix_origin`` in a LOOKUP changes a d_ino). So the
    reply is copied, with the listings taken now (a later request's are its own), into a
    task that awaits their invalidation and then writes it; the read duty is free
    meanwhile, as with any handler that awaits. The lookup it counted holds its node
    meanwhile: the kernel cannot forget a reference it has not been sent, and another
    LOOKUP of the name answered meanwhile is one reference more, counted by its own
    find (docs/concurrency.md, the raw path)."""

    def __init__(self, fd: int, ops: RawOps | CRawOps, counts: dict[str, int]) -> None:
        self.fd = fd
        self.listings = ops.listings
        self.invalidate = ops.invalidate
        self.forget = ops.forget
        self.counts = counts

    def write(self, reply: bytes | bytearray, node: int = 0, now: bool = False) -> None:
        """Write REPLY now (NOW: whatever is queued), or once the listings are dropped."""
        if self.listings and not now:
            self.defer(bytes(reply), node)
            return
        try:
            os.write(self.fd, reply)
        except OSError as e:  # ENOENT: the request was aborted meanwhile
            if e.errno != errno.ENOENT:
                log.error("raw path: reply failed: %s", e)
            if node:  # the kernel took no reference: give back ours
                self.forget([(node, 1)])

    def defer(self, reply: bytes, node: int) -> None:
        """Write REPLY once the listings queued now are dropped, from a task of its own."""
        ids = self.listings[:]
        self.listings.clear()
        self.counts["loop_deferred"] += 1
        trio.lowlevel.spawn_system_task(self._after, ids, reply, node)

    async def _after(self, ids: list[int], reply: bytes, node: int) -> None:
        try:
            await self.invalidate(ids)
        except Exception:  # not met (each invalidation's errors are ignored): answer anyway
            log.exception("raw path: listing invalidation failed")
        self.write(reply, node, now=True)  # listings queued meanwhile: a later request's


# The protocol (include/uapi/linux/fuse.h, 7.9 and later: the kernel's minor here is 38)
_OP_LOOKUP, _OP_FORGET, _OP_GETATTR, _OP_GETXATTR, _OP_BATCH_FORGET = 1, 2, 3, 22, 42
# Native order and alignment ("@"), the kernel's: its fields are naturally aligned, and
# native packing converts each int in a call where "<" goes through _PyLong_AsByteArray
_IN = struct.Struct("@4xIQQ")  # fuse_in_header: opcode, unique, nodeid
_U64 = struct.Struct("@Q")
_U32 = struct.Struct("@I")
_FORGET_ONE = struct.Struct("@QQ")  # fuse_forget_one: nodeid, nlookup
_ATTR = "QQQqqqIIIIIIIIII"  # fuse_attr: ino size blocks a/m/ctime, their nsec, mode ... flags
_REPLY_ERR = struct.Struct("@IiQ")  # fuse_out_header: len, error, unique
_REPLY_XATTR_SIZE = struct.Struct("@IiQI4x")  # + fuse_getxattr_out: the value's size
_REPLY_ENTRY = struct.Struct("@IiQ" + "QQQQII" + _ATTR)  # + fuse_entry_out
_REPLY_ATTR = struct.Struct("@IiQ" + "QII" + _ATTR)  # + fuse_attr_out
_RAW_LAYOUT = (_IN.size, _REPLY_ERR.size, _REPLY_ENTRY.size, _REPLY_ATTR.size) == (24, 16, 144, 120)
_RAW_LAYOUT &= _REPLY_XATTR_SIZE.size == 24
_BUFSIZE = 256 * mmap.PAGESIZE + 4096  # libfuse 3's se->bufsize: FUSE_MAX_MAX_PAGES pages


class _CustomIo(ctypes.Structure):  # struct fuse_custom_io (libfuse 3.14)
    _fields_ = [("writev", _vp), ("read", _vp), ("splice_receive", _vp), ("splice_send", _vp)]


_READ_CB = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_int, _vp, ctypes.c_size_t, _vp)


class _RawPath:
    """The wait reads each request from /dev/fuse itself and answers LOOKUP, GETATTR,
    GETXATTR, FORGET and BATCH_FORGET at once, in Python (RawOps); everything else is left in the
    buffer for pyfuse3's loop, whose ``fuse_session_receive_buf`` reads it from there
    through the session's custom io (``read``), so that libfuse and pyfuse3 serve it as
    before: interrupts, notify replies, DESTROY, every handler that awaits, and pyfuse3's
    rule for starting readers. libfuse writes its replies with plain ``writev`` (the io's
    other entry). A raw answer awaits nothing, so the read duty never waits on one."""

    def __init__(self, session: int, fd: int, ops: RawOps, counts: dict[str, int]) -> None:
        self.fd = fd
        self.ops = ops
        self.counts = counts
        # the request buffer: an anonymous mapping, whose pages cost only once written
        self.buf = mmap.mmap(-1, _BUFSIZE)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        self.vec = [self.buf]
        self.mem = memoryview(self.buf)
        self.views: dict[int, memoryview] = {}  # libfuse's buffers, by address
        self.pending: int | None = None  # length of the request left for libfuse
        self.failed = False  # the device could not be read: the session ends
        self.session = session
        self.session_exit = _libfuse().fuse_session_exit
        self.session_exit.argtypes = [_vp]
        libc = ctypes.CDLL(None)
        self.libc_read = libc.read
        self.libc_read.argtypes = [ctypes.c_int, _vp, ctypes.c_size_t]
        self.libc_read.restype = ctypes.c_ssize_t
        self.writev = ctypes.cast(libc.writev, _vp).value
        self.reply = _Replies(fd, ops, counts).write
        whole = ops.timeout
        self.secs, self.nsecs = int(whole), int((whole - int(whole)) * 1e9)
        # a negative entry's reply: the same bytes but the request's id (at 8)
        self.negative = bytearray(
            _REPLY_ENTRY.pack(_REPLY_ENTRY.size, 0, 0, 0, 0, self.secs, 0, self.nsecs, 0, *_NO_ATTR)
        )
        self.hot: dict[int, Callable[[int, int, int], None]] = {
            _OP_LOOKUP: self._lookup,
            _OP_GETATTR: self._getattr,
            _OP_GETXATTR: self._getxattr,
            _OP_FORGET: self._forget,
            _OP_BATCH_FORGET: self._batch_forget,
        }

    @classmethod
    def install(cls, hooks: Hooks, fd: int, ops: RawOps, counts: dict[str, int]) -> _RawPath | None:
        """Point the session's io at a new raw path; None (nothing changed) if libfuse
        refuses."""
        raw = cls(hooks.session, fd, ops, counts)
        read = _READ_CB(raw.read)
        _keep.append(read)
        io = _CustomIo(raw.writev, ctypes.cast(read, _vp).value, None, None)
        custom_io = _libfuse().fuse_session_custom_io
        custom_io.argtypes = [_vp, ctypes.POINTER(_CustomIo), ctypes.c_int]
        if custom_io(hooks.session, ctypes.byref(io), fd) != 0:  # libfuse copies IO
            log.info("raw path not used: fuse_session_custom_io refused")
            return None
        hooks.raw = True
        return raw

    def read(self, fd: int, buf: int, size: int, _userdata: int | None) -> int:
        """The session io's read (libfuse's ``fuse_session_receive_buf``): the request the
        wait left, copied into libfuse's buffer BUF through a view of it kept by address
        (pyfuse3's readers keep theirs for their life: a ctypes call a request was a third
        of this callback's cost); a read of the device where the wait read nothing (INIT,
        answered before the loop starts)."""
        n = self.pending
        if n is not None and n > size:  # not met: libfuse's buffer is as large as ours
            log.error("raw path: a request of %d bytes for a buffer of %d", n, size)
            self.failed, n = True, None
        if n is not None:
            self.pending = None
            view = self.views.get(buf)
            if view is None or len(view) != size:
                if len(self.views) > 64:  # readers come and go: forget the old buffers
                    self.views.clear()
                view = memoryview((ctypes.c_char * size).from_address(buf)).cast("B")
                self.views[buf] = view
            view[:n] = self.mem[:n]
            return n
        if self.failed:  # the device is gone: end the session (libfuse checks after a read)
            self.session_exit(self.session)
            return -1
        return int(self.libc_read(fd, buf, size))

    def take(self) -> bool:
        """Read the request /dev/fuse has (the fd is blocking: call only when it is
        readable). True if it was answered here; False if it is left for libfuse."""
        try:
            n = os.readv(self.fd, self.vec)
        except OSError as e:  # ENODEV once unmounted; anything else would end pyfuse3's loop
            if e.errno != errno.ENODEV:
                log.error("raw path: reading the device failed: %s", e)
            self.failed = True
            return False
        opcode, unique, nodeid = _IN.unpack_from(self.buf)
        serve = self.hot.get(opcode)
        if serve is None or n < _IN_HEADER:
            self.pending = n
            return False
        self.counts["loop_raw"] += 1
        serve(unique, nodeid, n)
        return True

    def _error(self, unique: int, err: int) -> None:
        self.reply(_REPLY_ERR.pack(_OUT_HEADER, -err, unique))

    def _lookup(self, unique: int, parent: int, n: int) -> None:
        a = self.ops.lookup(parent, self.buf[_IN_HEADER : n - 1])  # the name, without its NUL
        if a is None:  # a negative entry, cached by the kernel for the entry timeout
            _U64.pack_into(self.negative, 8, unique)
            self.reply(self.negative)
        elif a.__class__ is int:
            self._error(unique, a)
        else:
            a = cast(Attr, a)
            at, atn = divmod(a.atime_ns, 1_000_000_000)
            mt, mtn = divmod(a.mtime_ns, 1_000_000_000)
            ct, ctn = divmod(a.ctime_ns, 1_000_000_000)
            secs, nsecs = self.secs, self.nsecs
            reply = _REPLY_ENTRY.pack(
                _REPLY_ENTRY.size, 0, unique, a.id, 0, secs, secs, nsecs, nsecs,
                a.ino, a.size, a.blocks, at, mt, ct, atn, mtn, ctn,
                a.mode, a.nlink, a.uid, a.gid, a.rdev & 0xFFFF_FFFF, a.blksize, 0,
            )  # fmt: skip
            self.reply(reply, a.id)  # a refused reply gives its reference back

    def _getattr(self, unique: int, node: int, _n: int) -> None:
        a = self.ops.getattr(node)
        if a.__class__ is int:
            self._error(unique, a)
            return
        a = cast(Attr, a)
        at, atn = divmod(a.atime_ns, 1_000_000_000)
        mt, mtn = divmod(a.mtime_ns, 1_000_000_000)
        ct, ctn = divmod(a.ctime_ns, 1_000_000_000)
        self.reply(
            _REPLY_ATTR.pack(
                _REPLY_ATTR.size, 0, unique, self.secs, self.nsecs, 0,
                a.ino, a.size, a.blocks, at, mt, ct, atn, mtn, ctn,
                a.mode, a.nlink, a.uid, a.gid, a.rdev & 0xFFFF_FFFF, a.blksize, 0,
            )
        )  # fmt: skip

    def _getxattr(self, unique: int, node: int, n: int) -> None:
        (size,) = _U32.unpack_from(self.buf, _IN_HEADER)  # fuse_getxattr_in, then the name
        value = self.ops.getxattr(node, self.buf[_IN_HEADER + 8 : n - 1])
        if value.__class__ is int:
            self._error(unique, value)
            return
        value = cast(bytes, value)
        if size == 0:  # the size is asked
            self.reply(_REPLY_XATTR_SIZE.pack(_REPLY_XATTR_SIZE.size, 0, unique, len(value)))
        elif len(value) > size:
            self._error(unique, errno.ERANGE)
        else:
            self.reply(_REPLY_ERR.pack(_OUT_HEADER + len(value), 0, unique) + value)

    def _forget(self, _unique: int, node: int, _n: int) -> None:  # no reply
        self.ops.forget([(node, _U64.unpack_from(self.buf, _IN_HEADER)[0])])

    def _batch_forget(self, _unique: int, _node: int, n: int) -> None:  # no reply
        (count,) = _U32.unpack_from(self.buf, _IN_HEADER)
        start = _IN_HEADER + 8  # after fuse_batch_forget_in
        end = min(n, start + count * _FORGET_ONE.size)
        self.ops.forget(list(_FORGET_ONE.iter_unpack(self.buf[start:end])))


_NO_ATTR = (0,) * 16


@dataclass
class CRawOps:
    """What the compiled raw path (``layerfs._craw``, LAYERFS_LOOP=craw) answers with: the
    adapter's synchronous cores, called from C with the arguments unpacked, each of which
    may raise. ``find(parent, name)``: the attributes (one lookup counted) or None, a
    negative entry; ``getattr(node)``; ``find_xattr(node, name)``: the value or None
    (ENODATA); ``stats_xattr(node, name)``: the adapter's getxattr core, asked for
    ``stats_name`` on the root only; ``forget([(node, n), ...])``; ``errno_of(handler,
    args, exception)``: the errno answered for what a core raised. ``requests`` counts each
    request by handler name, as the handlers do; ``changed`` are the copy-up's nodes whose
    attributes to invalidate, ``after()`` invalidates them (called when it is not empty);
    ``listings`` and ``invalidate`` as RawOps': a reply waits for them (``_Replies.defer``).
    ``trace(handler, args)``, where set (``--debug``), logs each request as it comes.
    TIMEOUT: seconds the kernel may keep entries and attributes."""

    find: Callable[[int, bytes], Attr | None]
    getattr: Callable[[int], Attr]
    find_xattr: Callable[[int, bytes], bytes | None]
    stats_xattr: Callable[[int, bytes], bytes]
    stats_name: bytes
    forget: Callable[[list[tuple[int, int]]], None]
    errno_of: Callable[[str, tuple[Any, ...], Exception], int]
    requests: dict[str, int]
    changed: list[int]
    listings: list[int]
    after: Callable[[], None]
    invalidate: Callable[[list[int]], Awaitable[None]]
    timeout: float
    # SETATTR's and MKNOD's cores: the engine's coroutine (stepped from C; awaited by the
    # wait should it park), or None: the request goes to pyfuse3
    setattr: Callable[..., Coroutine[Any, Any, Attr] | Generator[Any, Any, Attr] | None] | None = (
        None
    )
    mknod: Callable[..., Coroutine[Any, Any, Attr] | None] | None = None
    trace: Callable[[str, tuple[Any, ...]], None] | None = None
    # WRITE's: write(fh, offset, data, uid, gid, pid), DATA a view of the request in C's
    # buffer (released after the call): the bytes written, or None: pyfuse3 serves it
    write: Callable[[int, int, memoryview, int, int, int], int | None] | None = None
    # SETATTR's first try, without a coroutine: setattr_fd(node, mode, uid, gid, atime_ns,
    # mtime_ns) for a SETATTR without a size, the Attr or None: ``setattr`` serves it
    setattr_fd: Callable[..., Attr | None] | None = None


def craw_module(asked: bool = True) -> Any:
    """The compiled raw path's extension (built by scripts/setup.sh), or None where it is not
    built, not built from the _craw.pyx beside it, or not the one the kernel's structs need:
    why, in a warning where ASKED for (LAYERFS_LOOP=craw: the Python raw path serves), else
    in an info line (the default: the poll loop serves, ops.DEFAULT_LOOP)."""
    module, why = _craw_found()
    if module is None:
        if asked:
            log.warning("LAYERFS_LOOP=craw: %s: raw path in Python", why)
        else:
            log.info("compiled raw path not used: %s", why)
    return module


@functools.cache
def _craw_found() -> tuple[Any, str]:
    try:
        module = importlib.import_module("layerfs._craw")  # by name: no source to lint
    except ImportError as e:
        return None, f"layerfs._craw is not built ({e})"
    codes = (module.NOPOLL, module.PENDING, module.TRIO, module.PARKED)
    if tuple(module.LAYOUT) != (_IN_HEADER, _OUT_HEADER, 144, 120, 24) or codes != _C_CODES:
        return None, "layerfs._craw's structs are not the kernel's"
    # built from the source beside it (its CRC-32, given by scripts/setup.sh): old C with new
    # Python left a request unanswered (session 14)
    source = os.path.join(os.path.dirname(module.__file__ or __file__), "_craw.pyx")
    try:
        with open(source, "rb") as f:
            crc = f"{zlib.crc32(f.read()):08x}"
    except OSError:
        crc = "no source"
    if getattr(module, "SOURCE", None) != crc:
        return None, "layerfs._craw was built from another _craw.pyx (rerun scripts/setup.sh)"
    return module, ""


def _install_craw(hooks: Hooks, fd: int, ops: CRawOps, counts: dict[str, int]) -> Any:
    """Point the session's io at a new compiled raw path (``layerfs._craw.RawPath``); None
    (nothing changed) where it is not built or libfuse refuses."""
    module = craw_module()
    if module is None:
        return None
    raw = module.RawPath(
        fd, ops.find, ops.getattr, ops.find_xattr, ops.stats_xattr, ops.stats_name,
        ops.forget, ops.errno_of, ops.requests, counts, ops.changed, ops.listings,
        ops.after, ops.timeout, False, ops.setattr, ops.mknod,
        defer=_Replies(fd, ops, counts).defer, trace=ops.trace,
    )  # fmt: skip
    raw.serve_write(ops.write)
    raw.serve_setattr_fd(ops.setattr_fd)
    if not raw.install(hooks.session):
        log.info("compiled raw path not used: fuse_session_custom_io refused")
        return None
    hooks.raw = True
    return raw


# The INIT exchange (include/uapi/linux/fuse.h)
_OP_INIT = 26
_IN_HEADER, _OUT_HEADER = 40, 16  # sizeof(struct fuse_in_header / fuse_out_header)
_INIT_FLAGS = 12  # offsetof(struct fuse_init_in / fuse_init_out, flags)
HANDLE_KILLPRIV_V2 = 1 << 28


class _Buf(ctypes.Structure):  # struct fuse_buf
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("flags", ctypes.c_int),
        ("mem", _vp),
        ("fd", ctypes.c_int),
        ("pos", ctypes.c_int64),
    ]


def answer_init(hooks: Hooks) -> int:
    """Answer the kernel's INIT request now, through libfuse, adding the flags the kernel
    offers that libfuse 3.14 cannot ask for (HANDLE_KILLPRIV_V2); return the flags added.

    libfuse builds the reply from the capabilities it knows. FUSE_HANDLE_KILLPRIV_V2 is not
    one of them, and it is what lets the kernel mark an inode S_NOSEC (SB_NOSEC), after which a
    write no longer costs a GETXATTR of security.capability first. So the reply libfuse writes
    is caught in a pipe (the session's fd number is pointed at the pipe for that one write),
    given the flag, and sent on. Call inside trio, before pyfuse3.main (the init handler
    starts a task); the INIT is queued from the moment of the mount.
    """
    libfuse = _libfuse()
    libc = ctypes.CDLL(None)
    se = _vp(hooks.session)
    fd = libfuse.fuse_session_fd(se)
    poll = select.poll()  # not select(): with many layers open the fd can be above 1023
    poll.register(fd, select.POLLIN)
    if not poll.poll(10_000):
        return 0  # nothing read: pyfuse3's loop answers INIT as usual
    buf = _Buf()
    n = libfuse.fuse_session_receive_buf(se, ctypes.byref(buf))
    if n == 0:  # ENODEV (libfuse marks the session exited): unmounted before its INIT was
        return 0  # read. The loop ends at once, as after any unmount: nothing to detach
    if n < 0:
        raise OSError(-n, "cannot read the INIT request")
    try:
        request = ctypes.string_at(buf.mem, n)
        (opcode,) = struct.unpack_from("<I", request, 4)
        offered = struct.unpack_from("<I", request, _IN_HEADER + _INIT_FLAGS)[0]
        offered &= HANDLE_KILLPRIV_V2
        if opcode != _OP_INIT or not offered:
            libfuse.fuse_session_process_buf(se, ctypes.byref(buf))
            return 0
        reply = _caught_reply(fd, lambda: libfuse.fuse_session_process_buf(se, ctypes.byref(buf)))
    finally:
        libc.free(_vp(buf.mem))
    if len(reply) < _OUT_HEADER:
        raise OSError(errno.EIO, "libfuse wrote no INIT reply")
    (length, error) = struct.unpack_from("<Ii", reply, 0)
    added = 0
    if error == 0 and length == len(reply) >= _OUT_HEADER + _INIT_FLAGS + 4:
        pos = _OUT_HEADER + _INIT_FLAGS
        patched = bytearray(reply)
        (flags,) = struct.unpack_from("<I", patched, pos)
        struct.pack_into("<I", patched, pos, flags | offered)
        reply, added = bytes(patched), offered
    try:
        os.write(fd, reply)
    except OSError as e:  # unmounted meanwhile: INIT aborted (ENOENT), the session gone
        if e.errno not in (errno.ENOENT, errno.ENODEV):
            raise
        return 0  # the loop's first read ends it, as after any unmount
    return added


def _caught_reply(fd: int, answer: Any) -> bytes:
    """What ANSWER writes to FD, written into a pipe instead."""
    rd, wr = os.pipe()
    saved = os.dup(fd)
    try:
        os.dup2(wr, fd, inheritable=False)
        try:
            answer()
        finally:
            os.dup2(saved, fd, inheritable=False)
        os.set_blocking(rd, False)
        try:
            return os.read(rd, 1 << 16)
        except BlockingIOError:
            return b""
    finally:
        for f in (rd, wr, saved):
            os.close(f)

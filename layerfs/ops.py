"""The pyfuse3 adapter: translate each request, call the Overlay, translate the answer.

Thin on purpose: a routing table. OSError becomes FUSEError with its errno; anything else is a
bug, logged with its traceback and answered with EIO; the daemon never dies on a request.

Kernel caching (DESIGN.md, performance levers): lowers are immutable and every change goes
through us, so entries, attributes and negative lookups are cached for a long time. OPEN and
OPENDIR are answered ENOSYS where layerfs.fusehooks could be installed: the kernel then sends
neither again, keeps file pages across opens and caches listings itself; elsewhere every open
says keep_cache. CREATE too: new files come as MKNOD, opened by the kernel alone.
Once INIT is answered, the mount's readahead is widened to the largest READ (READAHEAD_KB).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import functools
import json
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from typing import Any, TypeVar, cast

import pyfuse3
import trio

from layerfs import _sys, fusehooks, mountinfo
from layerfs.attrs import Attr, Caller, SetAttr
from layerfs.copyup import WouldWait
from layerfs.files import NODE_FH
from layerfs.overlay import Overlay

log = logging.getLogger(__name__)

TIMEOUT = 3600.0  # seconds the kernel may trust an entry or an attribute
# The mount's readahead window, in KiB: the largest READ the kernel sends (max_pages 256), so
# a sequential read costs a round trip per MiB, not per 128 KiB, the kernel's default.
READAHEAD_KB = 1024
# How the daemon waits for and serves requests where LAYERFS_LOOP is unset (docs/concurrency.md):
# "poll" (fusehooks._PollLoop), or "craw" (the compiled raw path, the poll loop where
# scripts/setup.sh could not build it); "raw" and "trio" are for measuring
DEFAULT_LOOP = "craw"

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


STATS_XATTR = b"trusted.layerfs.statistics"  # on the root: the daemon's counters, as JSON
# defaultdicts, not Counters: Counter's __delitem__, in Python, makes each of its item
# assignments a call through a slot (0.2-0.3 us more an increment)
REQUESTS: collections.defaultdict[str, int] = collections.defaultdict(int)
# How the serving loop found each request (fusehooks.serve_loop): not requests, kept apart so
# that the sum of the req_ counters stays the number of requests (benchmarks' CPU per request)
LOOP: collections.defaultdict[str, int] = collections.defaultdict(int)


def _errno_of(name: str, args: tuple[Any, ...], e: Exception) -> int:
    """The errno the request NAME(ARGS) is answered with for E: an OSError's (a FUSEError's)
    errno; anything else is a bug, logged with its traceback, and EIO. Shared by the
    handlers (``_errors``) and the raw path (``_raw``)."""
    if isinstance(e, pyfuse3.FUSEError):
        return e.errno
    if isinstance(e, OSError):
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s%r -> %s", name, args, errno.errorcode.get(e.errno or 0, e))
        return e.errno or errno.EIO
    log.error("unexpected error in %s", name, exc_info=e)
    return errno.EIO


def _errors(fn: F) -> F:
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        REQUESTS[name] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s%r", name, args[1:])
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise pyfuse3.FUSEError(_errno_of(name, args[1:], e)) from None
        finally:
            copyup = args[0].fs.copyup
            if copyup.changed:
                _invalidate_attrs(copyup.changed)
            if copyup.listing_changed and name != "readdir":
                # not at the end of a READDIR: the kernel caches its reply after we answer,
                # so dropping the listing it changed (Overlay.fix_origin) waits for the next
                # request, which comes once that reply is cached
                await _invalidate_listings(copyup.listing_changed)

    return cast(F, wrapper)


R = TypeVar("R")


def _trace(name: str, args: tuple[Any, ...]) -> None:
    """A request, as ``--debug`` logs it on the raw paths (the handlers: ``_errors``)."""
    log.debug("%s%r", name, args)


def _raw(name: str, fn: Callable[..., R], copyup: Any) -> Callable[..., R | int]:
    """FN, the synchronous core of the handler NAME, for the raw path (fusehooks.RawOps):
    counted in REQUESTS as the handler is, its exceptions mapped as the handler's are
    (``_errno_of``), returned as an errno (an int) instead of raised. The attributes it
    changed are invalidated at once; the listings it queued (``Overlay.fix_origin``) before
    its reply is written (fusehooks._Replies)."""
    debug = log.isEnabledFor(logging.DEBUG)  # the daemon's level is set once, at its start
    changed = copyup.changed  # changed in place only

    def wrapper(*args: Any) -> R | int:
        REQUESTS[name] += 1
        if debug:
            _trace(name, args)
        try:
            return fn(*args)
        except Exception as e:
            return _errno_of(name, args, e)
        finally:
            if changed:
                _invalidate_attrs(changed)

    return wrapper


def _probe_st_ino_offset() -> int | None:
    """Find where EntryAttributes keeps stat's st_ino apart from the node id, or None.

    The FUSE protocol carries a node id and the st_ino users see as two fields; pyfuse3's
    ``st_ino`` setter writes both. Overlayfs semantics need them apart (names of a lower hard
    link are separate nodes that show one st_ino), so we write the stat field ourselves, at an
    offset found and verified here; when the layout is not the expected one, st_ino is simply
    the node id.
    """
    e = pyfuse3.EntryAttributes()
    magic, nlink = 0x5A17_1A7E_0BAD_F00D, 0x3C
    e.st_ino = pyfuse3.InodeT(magic)
    e.st_nlink = nlink
    base = id(e)
    for off in range(16, 64, 8):
        if (
            ctypes.c_uint64.from_address(base + off).value == magic
            and ctypes.c_uint64.from_address(base + off + 8).value == nlink
        ):
            return off
    return None


_ST_INO_OFFSET = _probe_st_ino_offset()
if _ST_INO_OFFSET is None:
    log.warning("pyfuse3 layout not recognised: st_ino will be the FUSE node id")


TRIM_AFTER = 50_000  # nodes dropped between two malloc_trim calls


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim with


def _invalidate_attrs(node_ids: list[int]) -> None:
    """Tell the kernel to re-read the attributes of NODE_IDS (attribute-only notification:
    it takes no page or inode lock, so it is safe while a request is being served)."""
    ids = list(node_ids)
    node_ids.clear()
    for node_id in ids:
        try:
            pyfuse3.invalidate_inode(pyfuse3.InodeT(node_id), attr_only=True)
        except OSError:
            pass  # the kernel does not hold this node (ENOENT): nothing cached to drop


async def _invalidate_listings(node_ids: list[int]) -> None:
    """Drop the kernel's cached listings of NODE_IDS before the request that changed them
    returns (a readdir right after must see the new d_ino). On a worker thread: a data
    invalidation waits for the directory's page locks, which a readdir in flight may hold
    while it waits for its reply; the loop stays free to send it."""
    ids = list(node_ids)
    node_ids.clear()

    def drop() -> None:
        for node_id in ids:
            try:
                pyfuse3.invalidate_inode(pyfuse3.InodeT(node_id), attr_only=False)
            except OSError:
                pass

    await trio.to_thread.run_sync(drop)


def _returning(value: Attr) -> Generator[Any, Any, Attr]:
    """A core that returns VALUE at its first step (a result made in ``_setattr_now``)."""
    yield from ()  # a generator that never yields
    return value


def _entry(a: Attr) -> pyfuse3.EntryAttributes:
    """The reply's attributes (generation 0: pyfuse3's default). Every reply that carries
    attributes builds one, a readdirplus one per entry: one unpacking of the Attr into the
    fields, in its order, and the ctypes store of st_ino only where it is not the node id
    (most nodes' id is their identity, the st_ino they show; see inodes.py)."""
    e = pyfuse3.EntryAttributes()
    (
        node_id,
        ino,
        e.st_mode,
        e.st_nlink,
        e.st_uid,
        e.st_gid,
        e.st_rdev,
        e.st_size,
        e.st_blksize,
        e.st_blocks,
        e.st_atime_ns,
        e.st_mtime_ns,
        e.st_ctime_ns,
    ) = a
    e.st_ino = node_id  # the node id, and stat's st_ino with it
    if ino != node_id and _ST_INO_OFFSET is not None:
        ctypes.c_uint64.from_address(id(e) + _ST_INO_OFFSET).value = ino
    e.entry_timeout = TIMEOUT
    e.attr_timeout = TIMEOUT
    return e


def _caller(ctx: pyfuse3.RequestContext, *, groups: bool = False) -> Caller:
    """The request's credentials; GROUPS: with the supplementary groups read now (an OPEN's
    opener, whose writes come later), else read if a setgid check needs them (Caller)."""
    caller = Caller(ctx.uid, ctx.gid, ctx.umask, ctx.pid)
    return _caller_groups(caller) if groups and ctx.uid != 0 else caller


def _may_list_trusted(ctx: pyfuse3.RequestContext) -> bool:
    """Whether the caller may see ``trusted.*`` names: CAP_SYS_ADMIN, as the kernel asks
    (root when its process is gone)."""
    cap = _sys.has_cap_sys_admin(ctx.pid)
    return ctx.uid == 0 if cap is None else cap


def _caller_groups(caller: Caller) -> Caller:
    """CALLER with its supplementary groups (a /proc read; none when the caller is gone: the
    group check errs on clearing)."""
    return caller._replace(groups=_sys.sup_groups(caller.pid))


class Operations(pyfuse3.Operations):
    """pyfuse3 request handlers over one Overlay."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, overlay: Overlay) -> None:
        super().__init__()
        self.fs = overlay
        overlay.plain_listings = _ST_INO_OFFSET is not None
        self.hooks: fusehooks.Hooks | None = None
        self._forgotten = 0

    def init(self) -> None:
        """INIT is being answered (the kernel sets the mount's readahead from the reply):
        widen it right after."""
        mountpoint = self.fs.config.mountpoint

        async def widen() -> None:  # procfs and sysfs: never blocks
            _widen_readahead(mountpoint, READAHEAD_KB)

        trio.lowlevel.spawn_system_task(widen)

    def skip_open_requests(self) -> None:
        """Answer OPEN and OPENDIR with ENOSYS from now on, if the hooks that serve requests
        without them can be installed (layerfs.fusehooks); call after pyfuse3.init."""
        self.hooks = fusehooks.install(pyfuse3.__file__)
        if self.hooks is not None:
            self.fs.files.no_open = True
            spawn = trio.lowlevel.spawn_system_task
            fusehooks.serve_fallocate(self.hooks, self.fallocate, spawn)
            fusehooks.serve_ioctl(self.hooks, self.ioctl, spawn)
            asked = os.environ.get("LAYERFS_LOOP")
            loop = asked or DEFAULT_LOOP
            if loop != "trio":  # trio: pyfuse3's own wait
                # raw: the hottest requests answered by the wait itself (fusehooks.RawOps);
                # it writes stat's st_ino apart from the node id, as _entry needs the probe for
                # craw: the same, compiled (layerfs._craw, where scripts/setup.sh built it);
                # not built: the Python raw path where asked for, else the poll loop
                raw: fusehooks.RawOps | fusehooks.CRawOps | None = None
                if loop == "craw" and fusehooks.craw_module(asked == "craw") is not None:
                    raw = self._craw_ops()
                elif (loop == "raw" or asked == "craw") and _ST_INO_OFFSET is not None:
                    raw = self._raw_ops()
                fusehooks.serve_loop(self.hooks, pyfuse3.__file__, pyfuse3, LOOP, raw)

    def _raw_ops(self) -> fusehooks.RawOps:
        """The handlers' synchronous cores, for the raw path."""
        copyup = self.fs.copyup
        return fusehooks.RawOps(
            lookup=_raw("lookup", self._find, copyup),
            getattr=_raw("getattr", self.fs.getattr, copyup),
            getxattr=_raw("getxattr", self._getxattr, copyup),
            forget=self._forget,
            listings=copyup.listing_changed,
            invalidate=_invalidate_listings,
            timeout=TIMEOUT,
        )

    def _craw_ops(self) -> fusehooks.CRawOps:
        """The handlers' synchronous cores, for the compiled raw path: called from C, which
        counts them and maps what they raise as ``_raw`` does."""
        copyup = self.fs.copyup
        return fusehooks.CRawOps(
            find=self.fs.find,  # _find's core: C maps FileNotFoundError as _find does
            getattr=self.fs.getattr,
            find_xattr=self.fs.find_xattr,
            stats_xattr=self._getxattr,
            stats_name=STATS_XATTR,
            forget=self._forget,
            errno_of=_errno_of,
            requests=REQUESTS,
            changed=copyup.changed,
            listings=copyup.listing_changed,
            after=functools.partial(_invalidate_attrs, copyup.changed),  # as _raw's finally
            invalidate=_invalidate_listings,
            timeout=TIMEOUT,
            setattr=self._setattr_now,
            mknod=self._mknod_now,
            trace=_trace if log.isEnabledFor(logging.DEBUG) else None,  # set once, at start
            write=self._write_now,
            setattr_fd=self.fs.setattr_fd,
        )

    def _setattr_now(
        self,
        inode: int,
        mode: int | None,
        uid: int | None,
        gid: int | None,
        size: int | None,
        atime_ns: int | None,
        mtime_ns: int | None,
        fh: int | None,
        caller_uid: int,
        caller_gid: int,
        caller_pid: int,
    ) -> Coroutine[Any, Any, Attr] | Generator[Any, Any, Attr] | None:
        """SETATTR's core for the compiled raw path: the engine's coroutine, with the
        arguments ``setattr`` builds (the fields libfuse and pyfuse3 would set, no umask:
        a SETATTR carries none); None where it would copy the node up (overlay.setattr's
        test) and it may wait (a big file, an fsync a thread must make: CopyUp.begin_at_once):
        such a request goes to pyfuse3, whose loop starts another reader while it waits. A
        copy-up that needs no wait (a lone chmod of a small file) is made here, at once."""
        node = self.fs.table.get(inode)
        ch = SetAttr(mode, uid, gid, size, atime_ns, mtime_ns)
        caller = Caller(caller_uid, caller_gid, 0, caller_pid)
        if node.upper and (size is None or not node.metacopy):
            return self.fs.setattr(inode, ch, fh, caller)
        copyup = self.fs.copyup
        if not copyup.begin_at_once():
            return None
        core = self.fs.setattr(inode, ch, fh, caller)
        try:
            yielded = core.send(None)
        except StopIteration as done:
            return _returning(cast(Attr, done.value))
        except WouldWait:
            return None
        finally:
            copyup.at_once = False
        return fusehooks._resume(core, yielded)  # not met: each wait of at_once raises

    def _mknod_now(
        self,
        parent: int,
        name: bytes,
        mode: int,
        rdev: int,
        caller_uid: int,
        caller_gid: int,
        umask: int,
        caller_pid: int,
    ) -> Coroutine[Any, Any, Attr] | None:
        """MKNOD's core for the compiled raw path, as ``_setattr_now``: None where the
        parent directory needs a copy-up first."""
        if not self.fs.table.get(parent).upper:
            return None
        caller = Caller(caller_uid, caller_gid, umask, caller_pid)
        return self.fs.mknod(parent, name, mode, rdev, caller)

    def _write_now(
        self, fh: int, off: int, data: memoryview, uid: int, gid: int, pid: int
    ) -> int | None:
        """WRITE's core for the compiled raw path (FH a node handle, DATA a view of its
        request buffer):
        ``write`` without an await (``Files.write_now``), or None where it would await (a
        copy-up, a write the page cache might throttle: a worker thread's): such a request
        goes to pyfuse3."""
        return self.fs.files.write_now(fh, off, data, self._writer(fh, uid, gid, pid))

    def _writer(self, fh: int, uid: int, gid: int, pid: int) -> Caller | None:
        """Who writes through FH, for clearing setuid/setgid: the request's caller for a node
        handle (no OPEN recorded one), None for root, who keeps them."""
        if not fh & NODE_FH or uid == 0:  # groups read if a setgid check needs them
            return None
        writer = Caller(uid, gid, 0, pid)
        return self.fs.ids.caller(writer) if self.fs.ids_active else writer  # stored gids

    def answer_init(self) -> None:
        """Answer INIT before pyfuse3's loop starts, with the flags libfuse cannot ask for
        (layerfs.fusehooks.answer_init); where the hooks are not in, pyfuse3 answers it."""
        if self.hooks is not None:
            added = fusehooks.answer_init(self.hooks)
            log.debug("INIT answered with extra flags %#x", added)

    @_errors
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attr = self._find(parent_inode, name)
        if attr is None:
            neg = pyfuse3.EntryAttributes()  # st_ino 0: the kernel caches the negative entry
            neg.entry_timeout = TIMEOUT
            return neg
        return _entry(attr)

    def _find(self, parent_inode: int, name: bytes) -> Attr | None:
        """LOOKUP's core (the handler's and the raw path's): NAME's attributes, its lookup
        counted, or None: a negative entry. (The compiled raw path, layerfs._craw, calls
        ``fs.find`` and does the same in C.)"""
        try:
            return self.fs.find(parent_inode, name)
        except FileNotFoundError:  # met on the way (a layer's file gone): negative too
            return None

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        self._forget([(int(i), n) for i, n in inode_list])

    def _forget(self, items: list[tuple[int, int]]) -> None:
        """FORGET's and BATCH_FORGET's core (the handler's and the raw path's)."""
        try:
            before = len(self.fs.table.nodes)
            self.fs.forget(items)
            self._forgotten += before - len(self.fs.table.nodes)
            if self._forgotten > TRIM_AFTER:
                # The kernel let go of many nodes (memory pressure, drop_caches): hand the
                # freed heap back to the system instead of keeping the high-water mark.
                self._forgotten = 0
                self.fs.shrink()
                _malloc_trim()
        except Exception:
            log.exception("forget failed")

    @_errors
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return _entry(self.fs.getattr(inode))

    @_errors
    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        ch = SetAttr(  # positional: SetAttr's order
            attr.st_mode if fields.update_mode else None,
            attr.st_uid if fields.update_uid else None,
            attr.st_gid if fields.update_gid else None,
            attr.st_size if fields.update_size else None,
            attr.st_atime_ns if fields.update_atime else None,
            attr.st_mtime_ns if fields.update_mtime else None,
        )
        return _entry(await self.fs.setattr(inode, ch, fh, _caller(ctx)))

    @_errors
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.readlink(inode)

    @_errors
    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: pyfuse3.ModeT,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return _entry(await self.fs.mknod(parent_inode, name, mode, rdev, _caller(ctx)))

    @_errors
    async def mkdir(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: pyfuse3.ModeT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return _entry(await self.fs.mkdir(parent_inode, name, mode, _caller(ctx)))

    @_errors
    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self.fs.unlink(parent_inode, name)

    @_errors
    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self.fs.rmdir(parent_inode, name)

    @_errors
    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        target: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return _entry(await self.fs.symlink(parent_inode, name, target, _caller(ctx)))

    @_errors
    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: bytes,
        parent_inode_new: pyfuse3.InodeT,
        name_new: bytes,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_errors
    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return _entry(await self.fs.link(inode, new_parent_inode, new_name))

    @_errors
    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        if self.hooks is not None:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # no OPEN, RELEASE, FLUSH from now on
        fh = await self.fs.open(inode, flags, _caller(ctx, groups=True))
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=True)

    @_errors
    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: pyfuse3.ModeT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if self.hooks is not None:
            # no CREATE either: the kernel falls back to MKNOD and opens the new file without
            # us (fs/fuse/dir.c, fuse_atomic_open), so no RELEASE follows: a request less per
            # created file
            raise pyfuse3.FUSEError(errno.ENOSYS)
        fh, attr = await self.fs.create(parent_inode, name, mode, flags, _caller(ctx, groups=True))
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=True), _entry(attr)

    @_errors
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        return await self.fs.files.read(fh, off, size)

    @_errors
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        writer = None
        if self.hooks is not None:  # the write shim recorded who writes
            writer = self._writer(fh, *self.hooks.writer)
        return await self.fs.files.write(fh, off, buf, writer)

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        # Nothing is buffered here (writes go straight to the real file, fsync is its own
        # request): ENOSYS makes the kernel stop sending FLUSH, one request less per close.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_errors
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        self.fs.release(fh)

    @_errors
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        await self.fs.files.fsync(fh, datasync)

    @_errors
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        if self.hooks is not None:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # no OPENDIR, RELEASEDIR from now on
        return pyfuse3.FileHandleT(self.fs.opendir(inode))

    @_errors
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        for name, node, attr, nxt in self.fs.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, _entry(attr), nxt):
                if node is not None:
                    self.fs.table.release(node)  # not sent: drop it unless the kernel holds it
                break
            if node is not None and name not in (b".", b".."):
                node.nlookup += 1  # readdirplus: the kernel now holds a reference

    @_errors
    async def fallocate(
        self, fh: int, mode: int, offset: int, length: int, uid: int, gid: int, pid: int
    ) -> None:
        """FALLOCATE, served through layerfs.fusehooks (pyfuse3 does not forward it), by the
        caller UID, GID, PID (setuid/setgid cleared for a user, as by a write)."""
        writer = self._writer(fh, uid, gid, pid)
        await self.fs.files.fallocate(fh, mode, offset, length, writer)

    @_errors
    async def ioctl(self, inode: int, cmd: int, data: bytes, out_size: int) -> bytes:
        """IOCTL, served through layerfs.fusehooks: the inode flag getters (lsattr)."""
        return self.fs.get_inode_flags(inode, cmd, out_size)

    @_errors
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self.fs.releasedir(fh)

    @_errors
    async def fsyncdir(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        await self.fs.fsyncdir(fh)

    @_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        v = self.fs.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize, s.f_frsize = v.f_bsize, v.f_frsize
        s.f_blocks, s.f_bfree, s.f_bavail = v.f_blocks, v.f_bfree, v.f_bavail
        s.f_files, s.f_ffree, s.f_favail = v.f_files, v.f_ffree, v.f_favail
        s.f_namemax = v.f_namemax
        return s

    @_errors
    async def getxattr(
        self, inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> bytes:
        return self._getxattr(inode, name)

    def _getxattr(self, inode: int, name: bytes) -> bytes:
        """GETXATTR's core (the handler's and the raw path's)."""
        if name == STATS_XATTR and inode == pyfuse3.ROOT_INODE:
            stats = {
                **self.fs.statistics(),
                **{f"req_{k}": v for k, v in REQUESTS.items()},
                **LOOP,
                "pid": os.getpid(),  # the serving process (layerfs.share: of several mounts)
            }
            return json.dumps(stats, sort_keys=True).encode()
        value = self.fs.find_xattr(inode, name)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)  # directly: the usual answer
        return value

    @_errors
    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[bytes]:
        return self.fs.listxattr(inode, trusted=_may_list_trusted(ctx))

    @_errors
    async def setxattr(
        self, inode: pyfuse3.InodeT, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self.fs.setxattr(inode, name, value, _caller(ctx))

    @_errors
    async def removexattr(
        self, inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self.fs.removexattr(inode, name)


def _widen_readahead(mountpoint: str, kib: int) -> None:
    """Set the readahead of the FUSE mount at MOUNTPOINT (a resolved path) in sysfs, found by
    its device number in mountinfo. Nothing may touch the mount itself (not even realpath):
    this thread serves it. Best effort: without root, sysfs is read-only."""
    path = os.fsencode(mountpoint)
    try:
        # the last one: a mount on top of others
        devs = [
            m.dev for m in mountinfo.mounts() if m.point == path and m.fstype.startswith(b"fuse")
        ]
        if not devs:
            raise OSError(errno.ENOENT, "not in mountinfo", mountpoint)
        dev = devs[-1].decode()
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(str(kib))
    except (OSError, ValueError) as e:
        log.info("readahead left at the kernel's default: %s", e)

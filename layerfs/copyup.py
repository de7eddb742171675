"""Copy-up: give a lower object a copy in the upper before its first change.

Parents go first (directories: metadata only, never their contents). Every copy is built in
WORKDIR/work, completed (data, owner, mode, xattrs, times, fsync) and only then put into place:
a regular file as an O_TMPFILE linked in, anything else under a temporary name renamed in. So a
crash leaves either the lower view or the whole copy, never a partial file in the upper. Data
moves inside the kernel (reflink, else copy_file_range around holes) on a worker thread, so
other requests keep being served. A per-node lock with a double-checked "already copied up"
test makes racing opens copy once.

With metacopy on, a change of metadata only (chmod, chown, utimes, xattrs, rename) copies a
regular file up without its data: a sparse file of the same size marked ``overlay.metacopy``
(``trusted.``, or ``user.`` with userxattr), whose data is read from the lower until the first
write fills it in place (the marker goes last, so a crash mid-fill still reads the lower), as
kernel overlayfs with ``metacopy=on`` does (ovl_copy_up_meta_inode_data).

Kernel analogue: fs/overlayfs/copy_up.c (ovl_copy_up_one, ovl_copy_up_file, ovl_set_attr).
Must not import: pyfuse3.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
from collections.abc import Callable

import trio

from layerfs import _sys, xattrs
from layerfs.attrs import SetAttr
from layerfs.inodes import InodeTable, Node
from layerfs.layers import Layer, LayerStack, Path
from layerfs.locks import KeyedLock

log = logging.getLogger(__name__)

THREAD_THRESHOLD = 1 << 20  # below this a copy is faster inline than a thread round trip


class WouldWait(Exception):
    """A copy-up made at once (CopyUp.at_once) came to a wait before its copy was linked in:
    it left its parents' complete copies and impure mark, nothing of its own, and is to be
    made again where it may wait."""


class CopyUp:
    """The copy-up engine of one mount."""

    def __init__(
        self,
        stack: LayerStack,
        table: InodeTable,
        *,
        fsync: str = "auto",
        metacopy: bool = False,
        names: xattrs.Names = xattrs.TRUSTED,
    ) -> None:
        self.stack = stack
        self.names = names  # the overlay xattrs this mount writes
        self.table = table
        # fsync= (config.fsync_mode), as the kernel's ovl_should_sync(_metadata): "auto" syncs
        # copied data before it is put in place, "strict" also metadata-only copies and
        # directories, "volatile" nothing
        self.fsync = fsync != "volatile"
        self.sync_metadata = fsync == "strict"
        self.metacopy = metacopy
        self.locks = KeyedLock()
        self.limiter = trio.CapacityLimiter(2)
        # whether requests are waiting to be read (the adapter sets it: a poll of /dev/fuse);
        # None: unknown, so every fsync goes to a thread (the engine without FUSE)
        self.requests_waiting: Callable[[], bool] | None = None
        # whether N more bytes can be written to the upper without dirty-page throttling
        # (layerfs.dirty, set by Files); None: not known, small copies inline as before
        self.room: Callable[[int], bool] | None = None
        self.active = 0  # copy-ups in progress (each may be waiting for a thread)
        # set by begin_at_once, for one copy-up that must complete without a wait
        self.at_once = False
        self._names = itertools.count()
        self._pid = os.getpid()  # in temporary names; read once (a getpid a create otherwise)
        self.tmpfile = True  # build regular files as O_TMPFILEs until the upper refuses one
        # (uid, gid) a file made in the workdir gets (our fsuid and fsgid, or the workdir's
        # group): a copy of a lower file owned so needs no fchown. Learnt from the first copy.
        self.new_owner: tuple[int, int] | None = None
        # FICLONE until the upper's filesystem refuses it (ext4 has no reflink: a refused
        # ioctl per copy-up otherwise), and the lower layers it refused across mounts from;
        # the kernel asks its superblock's remap_file_range, which costs no syscall
        self.reflink = True
        self.no_reflink_from: set[int] = set()
        self.stats = {
            "files": 0,
            "dirs": 0,
            "bytes": 0,
            "reflink": 0,
            "metacopy": 0,
            "filled": 0,
            "fsyncs": 0,
            "fsyncs_inline": 0,
        }
        # nodes whose attributes changed behind the kernel's back (a copied-up directory now
        # reads nlink 1; a broken hard link its own st_ino and nlink): the adapter tells the
        # kernel to drop its cached attributes
        self.changed: list[int] = []
        # directories whose listing the kernel may hold with a stale d_ino
        self.listing_changed: list[int] = []

    def statistics(self) -> dict[str, int]:
        return dict(self.stats)

    def begin_at_once(self) -> bool:
        """Whether a copy-up may be made now without a wait, and if so, make the next one so
        (``at_once``, which the caller clears): its fsyncs inline, its first wait raising
        WouldWait (a copy too big to make inline, a node another copy-up holds). For the
        compiled raw path, which steps a core once and answers from C: a lone small chmod's
        copy-up then costs no pass through pyfuse3's handler (session 16, chmod4).

        False where an fsync would go to a thread (_sync's rule, asked here for the copy-up
        about to start: no other copy-up in progress, no request waiting, trio idle), so that
        the copy is not built twice: here, then in the handler."""
        if self.fsync:
            waiting = self.requests_waiting
            if self.active or waiting is None or waiting() or not _loop_idle():
                return False
        elif self.active:
            return False
        self.at_once = True
        return True

    def tmp_name(self) -> bytes:
        return b"#lfs.%d.%d" % (self._pid, next(self._names))

    async def copy_up(
        self,
        node: Node,
        *,
        data_len: int | None = None,
        meta: bool = False,
        change: SetAttr | None = None,
    ) -> os.stat_result | None:
        """Make NODE exist in the upper with its data (no-op when it does).

        DATA_LEN caps the data copied, for a truncating open or truncate(2): bytes past the new
        size are never copied. META: only metadata is about to change, so a metacopy is enough.
        CHANGE: the owner, mode and times a setattr is about to give NODE (not its size). A
        regular file's copy gets them before it is linked in, so a crash leaves the lower or
        the changed copy (the kernel's copy-up then notify_change can also leave the copy
        unchanged); then the upper's lstat is returned: the change is made. None: the caller
        makes it.
        """
        if node.upper and (meta or not node.metacopy):
            return None
        if self.stack.upper is None:
            raise OSError(30, "read-only stack")  # EROFS
        # parents first, top down, in a loop: a tree may be thousands of levels deep
        missing: list[Node] = []
        parent = node.parent
        while parent is not None and not parent.upper:
            missing.append(parent)
            parent = parent.parent
        self.active += 1
        try:
            for parent in reversed(missing):
                await self._copy_up_one(parent, None, meta=False)
            return await self._copy_up_one(node, data_len, meta=meta, change=change)
        finally:
            self.active -= 1

    async def _copy_up_one(
        self, node: Node, data_len: int | None, *, meta: bool, change: SetAttr | None = None
    ) -> os.stat_result | None:
        """Copy NODE up, its parent being in the upper already."""
        if self.at_once and self.locks.busy(node.key):
            raise WouldWait
        async with self.locks.hold(node.key):
            # re-read: another request may have copied it meanwhile (ovl_already_copied_up)
            if not node.upper:
                return await self._copy_up_locked(node, data_len, meta and self.metacopy, change)
            if node.metacopy and not meta:
                await self._fill_data(node, data_len)
            return None

    async def _copy_up_locked(
        self, node: Node, data_len: int | None, metacopy: bool, change: SetAttr | None
    ) -> os.stat_result | None:
        assert self.stack.upper is not None and node.parent is not None
        lowers = node.lowers
        layer, lpath = lowers[0]
        lname = lpath[-1]
        upath = node.path()
        dirs = _Parents(layer.dirfd(lpath[:-1]), self.stack.upper.dirfd(upath[:-1]))
        # the lower itself (not followed), whose fstat is its lstat and whose data, when it
        # is a regular file, is reopened from it (_sys.reopen_data): one stat, not two
        lower = -1
        try:
            lower = _sys.open_at(dirs.lower, lname, os.O_PATH)
            st = os.fstat(lower)
            pst = os.fstat(dirs.upper)
            # where the copy came from, as the kernel records it; not for a lower hard link,
            # whose copy-up breaks the link (ovl_do_copy_up)
            # (with userxattr the kernel keeps no file handle: an empty origin, "unknown")
            # the parent may now hold an entry whose st_ino is its origin's: the kernel then
            # computes the d_ino of its listing. Marked first, as ovl_do_copy_up does, so a
            # copy-up the upper refuses (a device in a user namespace) leaves the mark too.
            was_impure = node.parent.impure
            set_impure(dirs.upper, self.names, node.parent)
            if not was_impure and node.parent.impure:
                # its listing now looks its upper entries up: one the kernel cached before
                # must go (a copy-up restores the parent's mtime, which would keep it)
                node.parent.version += 1
                self.listing_changed.append(node.parent.id)
            origin = None
            if stat.S_ISDIR(st.st_mode) or st.st_nlink == 1:
                origin = (
                    layer.origin_fh(lpath, at=(lower, b""))
                    if self.names is not xattrs.USER
                    else b""
                )
            changed = change if stat.S_ISREG(st.st_mode) else None
            ust: os.stat_result | None = None
            if stat.S_ISREG(st.st_mode):
                metacopy = metacopy and data_len is None
                ust = await self._copy_file(
                    dirs,
                    lname,
                    st,
                    upath[-1],
                    data_len,
                    metacopy,
                    origin,
                    # the data: this file, or the one below the lower metacopy files
                    (layer, lower) if len(lowers) == 1 else lowers[-1],
                    changed,
                )
            else:
                metacopy = False
                await self._copy_other(dirs, lname, st, upath[-1], origin)
            # Restore the parent's times (best effort), as ovl_copy_up_one does.
            os.utime(dirs.upper, ns=(pst.st_atime_ns, pst.st_mtime_ns))
            if ust is None:
                ust = _sys.lstat_at(dirs.upper, upath[-1])
        finally:
            if lower >= 0:
                os.close(lower)
            dirs.close()
        if not stat.S_ISDIR(st.st_mode):
            if st.st_nlink > 1:
                node.origin = None  # the copy-up broke a lower hard link: show the upper's ino
                if node.parent is not None:
                    node.parent.version += 1  # its listing's d_ino changed
                    self.listing_changed.append(node.parent.id)
            # st_ino survives copy-up (OVL_CONST_INO), also once the kernel forgot the node
            self.table.copied_up[self.table.ident(ust.st_dev, ust.st_ino)] = (node.key, node.origin)
        node.upper = True
        node.metacopy = metacopy
        self.changed.append(node.id)
        self.stats["dirs" if stat.S_ISDIR(st.st_mode) else "metacopy" if metacopy else "files"] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("copied up %s", os.fsdecode(b"/".join(upath)))
        return ust if changed is not None else None

    async def _copy_file(
        self,
        dirs: _Parents,
        lname: bytes,
        st: os.stat_result,
        uname: bytes,
        data_len: int | None,
        metacopy: bool,
        origin: bytes | None,
        data: tuple[Layer, Path | int],
        change: SetAttr | None,
    ) -> os.stat_result:
        """Build the copy of regular file LNAME in the workdir, then link it in as UNAME; its
        bytes from DATA (layer, where): LNAME itself (where: its O_PATH fd, whose fstat is
        ST), or the path of the data below a lower metacopy LNAME. Returns the copy's stat
        once in place (its fstat: the lstat of UNAME, without a path to resolve).

        The copy is an O_TMPFILE, as ovl_copy_up_tmpfile: it has no name until it is whole, so
        a crash leaves nothing in the workdir, and its fsync does not also write the workdir's
        directory (a new name makes ext4 sync its parent). Where the upper's filesystem has no
        O_TMPFILE, a named temporary renamed into place.
        """
        work = self.stack.work_fd
        data_layer, where = data
        if isinstance(where, int):
            src = _sys.reopen_data(where, st, os.O_RDONLY)
        else:
            src = _sys.open_data(*data_layer.locate(where), os.O_RDONLY)
        try:
            dst, tmp = self._new_file(work)
            try:
                length = st.st_size if data_len is None else min(st.st_size, data_len)
                if metacopy:  # all hole, and the marker: the data stays in the lower for now
                    os.ftruncate(dst, st.st_size)
                    os.setxattr(dst, self.names.metacopy, b"")
                else:
                    await self.copy_bytes(
                        src,
                        dst,
                        length,
                        sync=False,
                        size=st.st_size,
                        layer=data_layer,
                        before_wait=dirs.hold,
                    )
                if self.new_owner is None:
                    fst = os.fstat(dst)
                    self.new_owner = (fst.st_uid, fst.st_gid)
                copy_file_metadata(
                    dirs.lower,
                    lname,
                    st,
                    dst,
                    # LNAME's own data open: its xattrs read through it (not below a metacopy)
                    src=src if isinstance(where, int) else -1,
                    owner=self.new_owner != (st.st_uid, st.st_gid),
                    # a mode or both times the change sets anyway (after the xattrs, in the
                    # same order as below: chown, then mode, then times)
                    mode=change is None or change.mode is None,
                    times=change is None or change.atime_ns is None or change.mtime_ns is None,
                )
                if origin is not None:
                    _set_origin(lambda a, v: os.setxattr(dst, a, v), self.names.origin, origin)
                if length < st.st_size:
                    # the copy holds the truncation's result already: its times too, so that
                    # a crash before the truncate itself leaves the after state, not a mix
                    os.utime(dst)
                if change is not None:
                    _change_fd(dst, change, st)
                # as ovl_copy_up_one: auto syncs a copy with data (not a metacopy, not an
                # empty file), strict every regular file (ovl_copy_up_metadata)
                if self.fsync and (self.sync_metadata or (length and not metacopy)):
                    await self._sync(os.fsync, dst, before_wait=dirs.hold)
                if tmp is None:
                    _sys.link_tmpfile(dst, dirs.upper, uname)
                else:
                    _sys.renameat2(work, tmp, dirs.upper, uname, _sys.RENAME_NOREPLACE)
            except BaseException:
                if tmp is not None:
                    _sys.remove_tree_at(work, tmp)
                raise
            else:
                return os.fstat(dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def _new_file(self, work: int) -> tuple[int, bytes | None]:
        """An empty file to build a copy in: an O_TMPFILE, else a named temporary (its name)."""
        if self.tmpfile:
            try:
                return _sys.open_tmpfile(work), None
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self.tmpfile = False
        tmp = self.tmp_name()
        return _sys.open_at(work, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), tmp

    async def _copy_other(
        self,
        dirs: _Parents,
        lname: bytes,
        st: os.stat_result,
        uname: bytes,
        origin: bytes | None,
    ) -> None:
        """Copy up a directory (metadata only), symlink or special file: build, then rename.

        fsync=strict syncs a directory before its rename, as ovl_copy_up_metadata syncs the
        temporary (the parent is not synced: neither does the kernel)."""
        work = self.stack.work_fd
        tmp = self.tmp_name()
        try:
            if stat.S_ISDIR(st.st_mode):
                _sys.mkdir_at(work, tmp, 0o700)
            elif stat.S_ISLNK(st.st_mode):
                _sys.symlink_at(_sys.readlink_at(dirs.lower, lname), work, tmp)
            else:
                _sys.mknod_at(work, tmp, st.st_mode, st.st_rdev)
            copy_metadata(dirs.lower, lname, st, work, tmp)
            if origin is not None:
                _set_origin(
                    lambda a, v: _sys.setxattr_at(work, tmp, a, v), self.names.origin, origin
                )
            if self.sync_metadata and stat.S_ISDIR(st.st_mode):
                await self._sync(_sync_dir_at, work, tmp, before_wait=dirs.hold)
            _sys.renameat2(work, tmp, dirs.upper, uname, _sys.RENAME_NOREPLACE)
        except BaseException:
            _sys.remove_tree_at(work, tmp)
            raise

    async def _fill_data(self, node: Node, data_len: int | None) -> None:
        """Give a metacopy upper file its data, in place; then drop the marker."""
        assert self.stack.upper is not None
        layer, lpath = node.lowers[-1]  # the data, below any lower metacopy files
        upath = node.path()
        if not upath:
            raise OSError(errno.ENOENT, "unlinked metacopy file")
        src = _sys.open_data(*layer.locate(lpath), os.O_RDONLY)
        try:
            dst = _sys.open_data(*self.stack.upper.locate(upath), os.O_WRONLY)
            try:
                ust = os.fstat(dst)
                length = ust.st_size if data_len is None else min(ust.st_size, data_len)
                await self.copy_bytes(src, dst, length, layer=layer)
                os.utime(dst, ns=(ust.st_atime_ns, ust.st_mtime_ns))  # filling is no change
                for attr in xattrs.METACOPY:  # a mark left on filled data would hide writes
                    try:
                        os.removexattr(dst, attr)
                    except OSError as e:
                        if e.errno != errno.ENODATA:
                            raise
            finally:
                os.close(dst)
        finally:
            os.close(src)
        node.metacopy = False
        self.changed.append(node.id)  # st_blocks now counts the upper's
        self.stats["filled"] += 1

    async def copy_bytes(
        self,
        src: int,
        dst: int,
        length: int,
        *,
        sync: bool = True,
        size: int | None = None,
        layer: Layer | None = None,
        before_wait: Callable[[], None] | None = None,
    ) -> None:
        """Copy LENGTH bytes of data (big copies on a worker thread); SYNC: then fsync. SIZE:
        the source's size, where DST is a new empty file (_sys.copy_data). LAYER: the one
        holding SRC, whose refusal to reflink across mounts is remembered. BEFORE_WAIT: called
        before the first wait that lets other requests run. A small copy is made inline
        unless the page cache may throttle it (``room``): then it too goes to a thread."""
        if length > THREAD_THRESHOLD or (self.room is not None and not self.room(length)):
            if self.at_once:
                raise WouldWait
            if before_wait is not None:
                before_wait()
            method = await trio.to_thread.run_sync(
                self._copy, src, dst, length, size, layer, limiter=self.limiter
            )
        else:
            method = self._copy(src, dst, length, size, layer)
        self.stats["bytes"] += length
        if method == "reflink":
            self.stats["reflink"] += 1
        if sync and self.fsync and length:
            await self._sync(os.fsync, dst, before_wait=before_wait)

    def _copy(self, src: int, dst: int, length: int, size: int | None, layer: Layer | None) -> str:
        """_sys.copy_data, trying FICLONE only where no refusal of it is remembered."""
        key = -1 if layer is None else layer.index
        if (
            self.reflink
            and key not in self.no_reflink_from
            and length
            and length == (os.fstat(src).st_size if size is None else size)
        ):
            refused = _sys.clone_file(src, dst)
            if not refused:
                return "reflink"
            if refused in _sys.CLONE_UNSUPPORTED:
                self.reflink = False
            elif refused == errno.EXDEV and layer is not None:
                self.no_reflink_from.add(key)
        return _sys.copy_data(src, dst, length, size, clone=False)

    async def _sync(
        self,
        fn: Callable[..., None],
        *args: object,
        before_wait: Callable[[], None] | None = None,
    ) -> None:
        """One fsync, counted: inline when no other request waits for the loop, as the kernel
        syncs in the caller's context; else on a worker thread, so that the loop serves the
        others meanwhile (and concurrent fsyncs share a journal commit).

        The hand-off to a thread costs two wake-ups per fsync (the worker's, then the loop's),
        which on a loaded host cost milliseconds each: a serial `chmod -R` paid them per file.
        Another copy-up in progress, a request waiting in /dev/fuse or a task ready to run
        sends it to a thread. A request that comes while an inline fsync runs waits for that
        one fsync.

        A copy-up takes no schedule point before this test (the per-node lock takes a free
        key at once): a FUSE request is read by a reader task that handles it straight away,
        so a request not yet being handled is still in /dev/fuse, which the poll sees, and one
        being handled has counted itself in `active`. A schedule point here cost a pass
        through trio per copy-up: ~200,000 instructions of the daemon's ~450,000 per chmod
        (callgrind, session 11)."""
        self.stats["fsyncs"] += 1
        waiting = self.requests_waiting
        # at_once: begin_at_once asked the same, just before this copy-up, with no wait since
        if self.at_once or (
            self.active == 1 and waiting is not None and not waiting() and _loop_idle()
        ):
            self.stats["fsyncs_inline"] += 1
            fn(*args)
            return
        if before_wait is not None:
            before_wait()
        await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)


class _Parents:
    """The two directories one copy-up works in: the lower's parent and the upper's. They are
    the layers' cached fds, valid until the next call that may evict one, which another
    request may make while this copy-up waits for a worker thread: so before its first wait
    (``hold``) it takes duplicates of its own. Most copy-ups never wait (a small file, its
    fsync inline): the dup and close of two fds per copy-up were four syscalls of ~35."""

    __slots__ = ("held", "lower", "upper")

    def __init__(self, lower: int, upper: int) -> None:
        self.lower = lower
        self.upper = upper
        self.held = False

    def hold(self) -> None:
        if self.held:
            return
        lower = os.dup(self.lower)
        try:
            self.upper = os.dup(self.upper)
        except BaseException:
            os.close(lower)
            raise
        self.lower = lower
        self.held = True

    def close(self) -> None:
        if self.held:
            os.close(self.lower)
            os.close(self.upper)


def _loop_idle() -> bool:
    """No other task of the loop is ready to run, and no thread result waits to be taken."""
    stats = trio.lowlevel.current_statistics()
    return stats.tasks_runnable == 0 and stats.run_sync_soon_queue_size == 0


def _change_fd(fd: int, ch: SetAttr, st: os.stat_result) -> None:
    """Make the owner, mode and time changes of CH on the copy FD (whose times are ST's), in
    the order of a setattr on the upper after the copy-up: chown (which clears setuid, setgid
    and security.capability as on the upper), mode (which updates an ACL's mask), times."""
    if ch.uid is not None or ch.gid is not None:
        os.fchown(fd, -1 if ch.uid is None else ch.uid, -1 if ch.gid is None else ch.gid)
    if ch.mode is not None:
        os.fchmod(fd, stat.S_IMODE(ch.mode))
    if ch.atime_ns is not None or ch.mtime_ns is not None:
        atime = st.st_atime_ns if ch.atime_ns is None else ch.atime_ns
        mtime = st.st_mtime_ns if ch.mtime_ns is None else ch.mtime_ns
        os.utime(fd, ns=(atime, mtime))


def _sync_dir_at(dirfd: int, name: bytes) -> None:
    fd = _sys.open_dir_at(dirfd, name)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_metadata(sdir: int, sname: bytes, st: os.stat_result, ddir: int, dname: bytes) -> None:
    """Give DNAME (not followed) the owner, mode, xattrs and times of SNAME (whose lstat is ST).

    Order matters: chown clears setuid/setgid and security.capability, so it goes first; then
    mode, then xattrs, then times (any change above bumps them).
    """
    _sys.chown_at(ddir, dname, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dname, stat.S_IMODE(st.st_mode), dir_fd=ddir)
    _copy_xattrs(sdir, sname, lambda attr, value: _sys.setxattr_at(ddir, dname, attr, value))
    _sys.utime_at(ddir, dname, st.st_atime_ns, st.st_mtime_ns)


def copy_file_metadata(
    sdir: int,
    sname: bytes,
    st: os.stat_result,
    fd: int,
    *,
    owner: bool = True,
    mode: bool = True,
    times: bool = True,
    src: int = -1,
) -> None:
    """copy_metadata for a regular file being built, through its open FD (same order).

    OWNER false: the new file has ST's owner already (a chown to the same ids would clear
    only what a new file has not: setuid, setgid, security.capability). MODE, TIMES false:
    the caller sets them next (a setattr made on the copy), after the xattrs, so the end
    state is the same: chmod sets every mode bit and recomputes an ACL's mask. SRC: SNAME
    open for its data, whose xattrs are read through it (flistxattr: no path, no ctypes)."""
    if owner:
        os.chown(fd, st.st_uid, st.st_gid)
    if mode:
        os.chmod(fd, stat.S_IMODE(st.st_mode))
    _copy_xattrs(sdir, sname, lambda attr, value: os.setxattr(fd, attr, value), src)
    if times:
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_xattrs(
    sdir: int, sname: bytes, setxattr: Callable[[bytes, bytes], None], src: int = -1
) -> None:
    """Set, with SETXATTR, each xattr of SNAME (open as SRC, where >= 0) that a copy-up keeps."""
    names = _sys.listxattr_at(sdir, sname) if src < 0 else _sys.flistxattr(src)
    for attr in xattrs.copy_up_set(names):
        value = _sys.getxattr_at(sdir, sname, attr) if src < 0 else _sys.fgetxattr(src, attr)
        if value is None:
            continue
        try:
            setxattr(attr, value)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EPERM):  # the upper cannot hold it
                raise
            log.warning("copy-up: xattr %s not kept: %s", os.fsdecode(attr), e.strerror)


def _set_origin(setxattr: Callable[[bytes, bytes], None], attr: bytes, origin: bytes) -> None:
    """Record ORIGIN (an ovl_fh, or b"": unknown) on a copy being built, as ovl_set_origin_fh:
    an upper that cannot hold it is no error."""
    try:
        setxattr(attr, origin)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EPERM):
            raise


def fix_origin(
    upper: Layer, names: xattrs.Names, parent: Node, name: bytes, lower: tuple[Layer, Path]
) -> bool:
    """Record LOWER, the directory upper directory NAME of PARENT merges first, as its origin,
    and mark PARENT impure, as the kernel's lookup does when such a directory records none (an
    upper another tool wrote: ovl_fix_origin). Returns whether PARENT was not marked before:
    its listing then looks its upper entries up (Overlay._check_impure_merged)."""
    pfd = upper.dirfd(parent.path())
    layer, lpath = lower
    origin = layer.origin_fh(lpath) if names is not xattrs.USER else b""
    _set_origin(lambda a, v: _sys.setxattr_at(pfd, name, a, v), names.origin, origin)
    was = parent.impure
    set_impure(pfd, names, parent)
    return not was and parent.impure


def set_impure(dirfd: int, names: xattrs.Names, node: Node | None = None) -> None:
    """Mark upper directory DIRFD ``overlay.impure`` (once): it holds, or is about to hold, an
    entry with an origin or a redirect, whose st_ino is not the upper's own, so the kernel
    computes the d_ino of its listing instead of taking the real one (ovl_set_impure).

    NODE: the directory's node, whose flag remembers the mark, as the kernel's OVL_IMPURE
    inode flag, so that only its first entry pays the syscalls (a `chmod -R` made two per
    file: the refused create, and the read of the value)."""
    if node is not None and node.impure:
        return
    try:
        os.setxattr(dirfd, names.impure, b"y", os.XATTR_CREATE)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.EOPNOTSUPP, errno.EPERM):
            raise
        if e.errno != errno.EEXIST:
            return  # the upper cannot hold it: ask again next time, as the kernel does
        if os.getxattr(dirfd, names.impure) != b"y":
            # a value the kernel does not read as impure (only "y" is): it writes "y"
            os.setxattr(dirfd, names.impure, b"y")
    if node is not None:
        node.impure = True

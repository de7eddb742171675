"""Open files: the handle table, copy-up on the first open for write, read/write/fsync.

Two kinds of handle. An OPEN request gets its own (a small number). Where the kernel sends no
OPEN (the adapter answered it ENOSYS, see layerfs.fusehooks), requests name the node instead,
``NODE_FH | node id``. Reads then share one descriptor per node, kept in a small LRU; a write
copies the file up if needed (the first write, not the open, copies up) and writes through the
node's descriptor, opened read-write (a file MKNOD made keeps the descriptor it was created
with, so that the writes after a create open nothing). Descriptors open for writing are closed
once no write or create has come for WRITERS_IDLE, so that the daemon does not keep files of
the upper open for writing past a burst of writes. A node that loses its last name while the
kernel holds it keeps a descriptor (pinned until the kernel forgets the node): a process may
have it open.

A read-only open of a lower file reads the lower directly (no copy), and so does one of a
metacopy file (its data is still the lower's). An open for write, or with O_TRUNC, copies the
file up first (with O_TRUNC, without its data). A handle opened on the lower before someone
else copied the data up switches to the upper copy on its next read, as overlayfs' stacked file
operations do.

Kernel analogue: fs/overlayfs/file.c (ovl_open, ovl_real_fdget).
Must not import: pyfuse3.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Iterator

import trio

from layerfs import _sys
from layerfs.attrs import Caller
from layerfs.copyup import CopyUp, set_impure
from layerfs.dirty import DirtyGauge
from layerfs.inodes import InodeTable, Node
from layerfs.layers import LayerStack

BIG_IO = 256 << 10  # reads not in the page cache from this size on: a worker thread
TRIM_AFTER = 0.1  # seconds without big I/O after which its buffers' memory goes back (_big_io_done)
NODE_FH = 1 << 62  # a handle naming a node: no OPEN was sent for it (layerfs.fusehooks)
# seconds without a write or a create after which the node descriptors open for writing are
# closed (Files._close_writers): an upper filesystem can then be remounted read-only
WRITERS_IDLE = 1.0


class Handle:
    """An open file. ``kill_priv``: an opener that may not keep setuid/setgid bits on a write
    (no CAP_FSETID: we take uid != 0), which the daemon, as root, must then clear itself; None
    for root."""

    __slots__ = (
        "busy",
        "closing",
        "fd",
        "kill_priv",
        "node",
        "old_fds",
        "on_upper",
        "pinned",
        "writable",
    )

    def __init__(
        self,
        fd: int,
        node: Node,
        on_upper: bool,
        writable: bool,
        kill_priv: Caller | None = None,
    ) -> None:
        self.fd = fd
        self.node = node
        self.on_upper = on_upper
        self.writable = writable
        self.kill_priv = kill_priv
        self.old_fds: list[int] = []  # lower fds replaced after a copy-up, closed on release
        self.busy = 0  # operations running on a worker thread with fd: not closed meanwhile
        self.pinned = False  # a node handle kept while the node has no name left
        self.closing = False  # closed while busy: the last unbusy() closes it

    def close(self) -> None:
        """Close the descriptors; while a worker thread uses one, when it is done."""
        if self.busy:
            self.closing = True
            return
        for fd in (self.fd, *self.old_fds):
            os.close(fd)

    def unbusy(self) -> None:
        self.busy -= 1
        if self.closing and not self.busy:
            self.closing = False
            self.close()


def kill_suid(fd: int, writer: Caller) -> bool:
    """Clear setuid/setgid as a write by a process without CAP_FSETID does (the FUSE kernel
    module leaves this to us: libfuse asks for handle_killpriv); True if it did.

    As setattr_should_drop_suidgid: setuid always; setgid on a group-executable file, or on
    any file whose group WRITER is not in (its supplementary groups read only then).
    """
    st = os.fstat(fd)
    mode = st.st_mode
    if not stat.S_ISREG(mode):
        return False
    kill = stat.S_ISUID if mode & stat.S_ISUID else 0
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not writer.in_group(st.st_gid)):
        kill |= stat.S_ISGID
    if kill:
        os.fchmod(fd, stat.S_IMODE(mode) & ~kill)
    return bool(kill)


async def _write(files: Files, h: Handle, off: int, data: bytes, kill_priv: Caller | None) -> int:
    """pwrite DATA at OFF through H: here, unless the page cache may make it wait (dirty-page
    throttling: FILES.dirty), then on a worker thread, so that other requests are served
    meanwhile."""
    if kill_priv is not None:
        files.killed_priv(h, kill_priv)
    fd = h.fd
    try:
        if files.free(len(data)):
            return os.pwrite(fd, data, off)
        files.writes_on_thread += 1
        return await trio.to_thread.run_sync(os.pwrite, fd, data, off)
    finally:
        if len(data) >= BIG_IO:
            files._big_io_done()  # its buffer is the main arena's (_big_io_done)


def _idle_writer(h: Handle) -> bool:
    """A node descriptor open for writing that nothing needs now (_close_writers)."""
    return h.writable and not (h.pinned or h.busy)


class Files:
    """The open-file table of one mount."""

    def __init__(
        self, stack: LayerStack, table: InodeTable, copyup: CopyUp, *, honour_fsync: bool = True
    ) -> None:
        self.stack = stack
        self.table = table
        self.copyup = copyup
        self.honour_fsync = honour_fsync
        self.handles: dict[int, Handle] = {}
        self._ids = itertools.count(1)
        self.by_node: OrderedDict[int, Handle] = OrderedDict()  # node handles, oldest first
        self.max_node_fds = 48
        self.no_open = False  # the adapter sets it when the kernel will send no OPEN
        self.trims = 0  # memory trims after big I/O (_big_io_done)
        self.reads_on_thread = 0  # big READs of data not all in the page cache (read)
        self.writes_on_thread = 0  # WRITEs the page cache might have throttled (_write)
        # whether a write to the upper may run free of dirty-page throttling (_write)
        self.dirty = None if stack.upper is None else DirtyGauge(stack.upper.dev)
        copyup.room = None if self.dirty is None else self.dirty.room  # its small copies
        self._trim_wait: trio.CancelScope | None = None  # until the trim (_big_io_done)
        self._written = 0.0  # time.monotonic() of the last write or create through a node handle
        self._closing_writers = False  # a task waits to close them (_close_writers)

    def statistics(self) -> dict[str, int]:
        return {
            "open_files": len(self.handles),
            "node_fds": len(self.by_node),
            "node_write_fds": sum(h.writable and not h.pinned for h in self.by_node.values()),
            "memory_trims": self.trims,
            "reads_on_thread": self.reads_on_thread,
            "writes_on_thread": self.writes_on_thread,
        }

    def killed_priv(self, h: Handle, writer: Caller) -> None:
        """Clear setuid/setgid before WRITER's write through H (kill_suid). The kernel keeps
        the mode it had (a write invalidates the cached times and size only, and with
        FUSE_HANDLE_KILLPRIV_V2 it leaves the clearing to us): its attributes are dropped, as
        a copy-up's (the adapter sends what CopyUp.changed lists), or a statx of the mode
        alone kept showing the bits for the attribute timeout."""
        if kill_suid(h.fd, writer):
            self.copyup.changed.append(h.node.id)

    def free(self, n: int) -> bool:
        """May N bytes be written here, the page cache unable to throttle them (and count
        them)? Else a worker thread writes them (_write)."""
        return self.dirty is None or self.dirty.room(n)

    def _big_io_done(self) -> None:
        """A read or write of BIG_IO bytes or more has ended. glibc keeps the memory its
        buffers took (a READ's result is allocated in the worker thread's malloc arena, a
        WRITE's data in the main one): 1 MiB a daemon after a container start reads a binary,
        kept for the daemon's life. Give it back once big I/O has stopped for TRIM_AFTER; not
        while it streams (the next buffer would pay its page faults again)."""
        deadline = trio.current_time() + TRIM_AFTER
        if self._trim_wait is not None:
            self._trim_wait.deadline = deadline  # still streaming: later
        else:
            self._trim_wait = trio.CancelScope(deadline=deadline)
            trio.lowlevel.spawn_system_task(self._trim_when_idle, self._trim_wait)

    async def _trim_when_idle(self, wait: trio.CancelScope) -> None:
        with wait:
            await trio.sleep_forever()
        self._trim_wait = None
        _sys.malloc_trim()
        self.trims += 1

    def real_location(self, node: Node) -> tuple[int, bytes]:
        """(dirfd, name) of NODE's top real object; ENOENT for an unlinked node."""
        if node.upper:
            if not node.name and node.parent is not None:
                raise OSError(errno.ENOENT, "unlinked")
            assert self.stack.upper is not None
            return self.stack.upper.locate(node.path())
        layer, lpath = node.lowers[0]
        return layer.locate(lpath)

    def add(
        self,
        fd: int,
        node: Node,
        on_upper: bool,
        writable: bool,
        kill_priv: Caller | None = None,
    ) -> int:
        fh = next(self._ids)
        self.handles[fh] = Handle(fd, node, on_upper, writable, kill_priv)
        node.opens += 1
        return fh

    def data_location(self, node: Node) -> tuple[int, bytes]:
        """(dirfd, name) of the real file holding NODE's data: the lower for a metacopy, the
        bottom of a chain of lower metacopy files (see lookup.Resolution)."""
        if self.data_elsewhere(node):
            layer, lpath = node.lowers[-1]
            return layer.locate(lpath)
        return self.real_location(node)

    def _open_data(self, node: Node, flags: int) -> int:
        """Open NODE's data with FLAGS. A metacopy upper file smaller than its data is refused
        (EIO): the kernel shows the upper's size and reads the data to its own end, and FUSE's
        page cache stops reads at the size shown; a copy-up never makes one (a malformed stack,
        docs/design.md, "Metacopy")."""
        dirfd, name = self.data_location(node)
        fd = _sys.open_data(dirfd, name, flags)
        if node.metacopy:
            try:
                shown = _sys.lstat_at(*self.real_location(node)).st_size
                if shown < os.fstat(fd).st_size:
                    raise OSError(errno.EIO, "metacopy file smaller than its data")
            except BaseException:
                os.close(fd)
                raise
        return fd

    @staticmethod
    def data_elsewhere(node: Node) -> bool:
        """Is NODE's data in another real file than its metadata (ovl_is_metacopy_dentry)?"""
        return node.metacopy or (not node.upper and not node.is_dir and len(node.lowers) > 1)

    async def open(self, node: Node, flags: int, caller: Caller) -> int:
        """Open NODE with FLAGS for CALLER; return a handle id."""
        acc = flags & os.O_ACCMODE
        writable = acc != os.O_RDONLY
        if writable or flags & os.O_TRUNC:
            if self.stack.upper is None:
                raise OSError(errno.EROFS, "read-only stack")
            await self.copyup.copy_up(node, data_len=0 if flags & os.O_TRUNC else None)
        real_flags = os.O_RDWR if writable else os.O_RDONLY
        if flags & os.O_TRUNC:
            real_flags |= os.O_TRUNC
        fd = self._open_data(node, real_flags | (flags & (os.O_SYNC | os.O_DSYNC)))
        return self.add(fd, node, self._on_upper(node), writable, caller.kill_priv)

    def get(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise OSError(errno.EBADF, "bad file handle")
        return h

    # -- node handles (no OPEN) ----------------------------------------------------------------

    def _node_handle(self, node: Node) -> Handle:
        """NODE's shared descriptor: its pinned one, or a read-only one on its data."""
        h = self.by_node.get(node.id)
        if h is not None and h.node is node:
            self.by_node.move_to_end(node.id)
            return h
        if h is not None:  # a stale entry of a reused id
            self._drop(node.id)
        h = Handle(self._open_data(node, os.O_RDONLY), node, self._on_upper(node), False)
        self.by_node[node.id] = h
        if len(self.by_node) > self.max_node_fds:
            self._evict()
        return h

    def upper_handle(self, node: Node) -> Handle | None:
        """NODE's kept descriptor when it is open on NODE's upper file (one MKNOD made, one
        written or read lately), else None: its metadata can be changed and read through it."""
        h = self.by_node.get(node.id)
        return h if h is not None and h.node is node and h.on_upper else None

    @staticmethod
    def _on_upper(node: Node) -> bool:
        return bool(node.upper and not node.metacopy)

    def keep_new(self, node: Node, fd: int) -> None:
        """FD: NODE's upper file, just made by MKNOD (open with O_CREAT|O_EXCL, so a new
        regular file of ours) and opened O_RDWR. Kept as the node's descriptor, for the
        writes that follow a create (where requests name nodes), else closed."""
        if not self.no_open:
            os.close(fd)  # writes come through the OPEN handles
            return
        if node.id in self.by_node:
            self._drop(node.id)  # a stale entry of a reused id
        self._keep_writable(Handle(fd, node, True, True))

    def _keep_writable(self, h: Handle) -> None:
        """Make H, open for writing on its node's upper file, the node's descriptor."""
        self.by_node[h.node.id] = h
        if len(self.by_node) > self.max_node_fds:
            self._evict()
        self._written = time.monotonic()  # trio's clock costs a microsecond a call more
        if not self._closing_writers:
            self._closing_writers = True
            trio.lowlevel.spawn_system_task(self._close_writers)

    async def _close_writers(self) -> None:
        """Once no write or create has come for WRITERS_IDLE, close the node descriptors open
        for writing (reads reopen read-only): the daemon keeps no upper file open for writing
        past a burst of writes (which would keep the upper filesystem from being remounted
        read-only, and the space of a file unlinked behind our back). Also when the serving
        loop ends (cancelled)."""
        try:
            while True:  # a deadline moved at every write would cost each write more
                left = self._written + WRITERS_IDLE - time.monotonic()
                if left <= 0:
                    break
                await trio.sleep(left)
        finally:
            self._closing_writers = False
            for node_id in [i for i, h in self.by_node.items() if _idle_writer(h)]:
                self._drop(node_id)

    def _evict(self) -> None:
        """Close the oldest descriptors nobody is using, down to three quarters of the cap."""
        excess = len(self.by_node) - self.max_node_fds * 3 // 4
        for node_id in [i for i, h in self.by_node.items() if not (h.pinned or h.busy)]:
            if excess <= 0:
                break
            self._drop(node_id)
            excess -= 1

    def _drop(self, node_id: int) -> None:
        h = self.by_node.pop(node_id, None)
        if h is not None:
            h.close()

    def forgotten(self, node_id: int) -> None:
        """The kernel let go of the node: nothing can use its descriptor any more."""
        self._drop(node_id)

    @contextlib.contextmanager
    def keeping_data(self, node: Node, mode: int) -> Iterator[None]:
        """Around the removal of a name of NODE (file type MODE): if it was the node's last
        name and the kernel holds the node, keep its data open (pinned until the kernel
        forgets it), since a process may have it open and no OPEN told us."""
        if not (self.no_open and stat.S_ISREG(mode) and node.nlookup > 0):
            yield
            return
        h = self.by_node.get(node.id)
        if h is not None and h.node is node and h.writable:  # already open on its data
            yield
            if not node.name:
                h.pinned = True
            return
        writable = self._on_upper(node)
        dirfd, name = self.data_location(node)
        fd = _sys.open_data(dirfd, name, os.O_RDWR if writable else os.O_RDONLY)
        try:
            yield
        except BaseException:
            os.close(fd)
            raise
        if node.name:  # another name is left: nothing to keep
            os.close(fd)
            return
        self._drop(node.id)
        h = self.by_node[node.id] = Handle(fd, node, writable, writable)
        h.pinned = True

    async def _detach(self, h: Handle) -> None:
        """A write to a lower file that lost its name while open: copy its data into an
        unnamed file of the workdir, as the copy-up at open would have on kernel overlayfs."""
        st = os.fstat(h.fd)
        flags = os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC
        fd = os.open(".", flags, stat.S_IMODE(st.st_mode), dir_fd=self.stack.work_fd)
        try:
            await self.copyup.copy_bytes(h.fd, fd, st.st_size, sync=False)
            os.fchown(fd, st.st_uid, st.st_gid)
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
        except BaseException:
            os.close(fd)
            raise
        self._impure_parent(h.node)
        h.old_fds.append(h.fd)
        h.fd, h.writable, h.on_upper = fd, True, True
        h.node.upper, h.node.metacopy = True, False  # nameless: attributes come from fd

    def _impure_parent(self, node: Node) -> None:
        """The kernel's copy-up at open would have marked the parent the file was opened in
        impure (ovl_set_impure): do it now, where that parent is still in the upper."""
        parent = node.parent
        if parent is None or not parent.upper or self.stack.upper is None:
            return
        try:
            set_impure(self.stack.upper.dirfd(parent.path()), self.copyup.names, parent)
        except OSError:
            pass  # the parent went away meanwhile: nothing to mark

    async def _node_write_handle(self, node: Node) -> Handle:
        """NODE's descriptor to write its data through: open for writing on its data (a
        pure upper node's upper file never changes inode under it: a copy-up makes a new
        one only for a node not yet on the upper, and a name replaced by a rename or an
        unlink leaves the node with its own inode), the pinned one of a nameless node."""
        h = self._node_write_handle_now(node)
        if h is not None:
            return h
        h = self.by_node.get(node.id)
        if h is not None and h.node is node and h.pinned:  # a nameless lower file
            await self._detach(h)
            self._written = time.monotonic()
            return h
        await self.copyup.copy_up(node)  # the first write copies the file up
        return self._open_writable(node)

    def _node_write_handle_now(self, node: Node) -> Handle | None:
        """``_node_write_handle`` where it awaits nothing, else None: a copy-up or a
        nameless lower file's detach is due first."""
        h = self.by_node.get(node.id)
        if h is not None and h.node is node and (h.pinned or h.writable):
            if not h.writable:
                return None
            self._written = time.monotonic()
            return h
        if not self._on_upper(node):
            return None
        return self._open_writable(node)

    def _open_writable(self, node: Node) -> Handle:
        """NODE's upper file opened for writing, kept as its descriptor."""
        dirfd, name = self.real_location(node)
        new = Handle(_sys.open_data(dirfd, name, os.O_RDWR), node, True, True)
        self._drop(node.id)  # a read-only one (a read on a thread closes it when done)
        self._keep_writable(new)
        return new

    def _follow_copy_up(self, h: Handle) -> None:
        if not h.on_upper and self._on_upper(h.node):
            try:
                dirfd, name = self.real_location(h.node)
            except OSError:  # the copy lost its last name: reach it through its own handle
                up = self._open_handle(h.node)
                if up is None or not up.on_upper:
                    raise
                fd = os.dup(up.fd)
            else:
                fd = _sys.open_data(dirfd, name, os.O_RDONLY)
            h.old_fds.append(h.fd)  # a read on a worker thread may still be using it
            h.fd, h.on_upper = fd, True

    async def read(self, fh: int, off: int, size: int) -> bytes:
        """SIZE bytes at OFF. A big read of data the page cache holds is served here (a
        binary a container starts, a file read twice); one that may wait for the disk goes to
        a worker thread, so other requests are served meanwhile. The hop to a thread and
        back costs ~0.4 ms of a 1 MiB READ from the cache (~0.1 ms), and the first one of a
        daemon starts the thread: 2.6 ms of the first READ of a container start."""
        h = self._node_handle(self.table.get(fh & ~NODE_FH)) if fh & NODE_FH else self.get(fh)
        self._follow_copy_up(h)
        if size >= BIG_IO and _sys.cached(h.fd, off, size):
            try:
                return os.pread(h.fd, size, off)
            finally:
                self._big_io_done()  # its buffer is the main arena's: trimmed as a write's
        if size >= BIG_IO:
            self.reads_on_thread += 1
            h.busy += 1
            try:
                return await trio.to_thread.run_sync(os.pread, h.fd, size, off)
            finally:
                h.unbusy()
                self._big_io_done()
        return os.pread(h.fd, size, off)

    async def write(self, fh: int, off: int, data: bytes, writer: Caller | None = None) -> int:
        """Write DATA at OFF. WRITER: who writes, for a node handle (the opener of an OPEN
        handle was recorded at open)."""
        if not fh & NODE_FH:
            h = self.get(fh)
            if not h.writable:
                raise OSError(errno.EBADF, "not open for writing")
            kill_priv, h.kill_priv = h.kill_priv, None  # cleared once: a later chmod +s stays
            return await _write(self, h, off, data, kill_priv)
        node = self.table.get(fh & ~NODE_FH)
        kill_priv = None if writer is None else writer.kill_priv
        try:
            return await self._node_write(node, off, data, kill_priv)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not await self._pins_released():
                raise
            return await self._node_write(node, off, data, kill_priv)

    def write_now(
        self, fh: int, off: int, data: bytes | memoryview, writer: Caller | None
    ) -> int | None:
        """``write`` to the node handle FH where it awaits nothing (the compiled raw path's
        WRITE, DATA a view of its request buffer), else None, nothing written: a copy-up or
        a detach is due, the page cache might throttle the write (a worker thread writes
        it), or the disk is full while deleted files' data is pinned (``write`` waits for
        their FORGETs)."""
        h = self._node_write_handle_now(self.table.get(fh & ~NODE_FH))
        if h is None or not self.free(len(data)):
            return None
        if writer is not None and writer.kill_priv is not None:
            self.killed_priv(h, writer.kill_priv)
        try:
            return os.pwrite(h.fd, data, off)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT) and any(
                p.pinned for p in self.by_node.values()
            ):
                return None  # write: the same again once pins are let go
            raise

    async def _node_write(self, node: Node, off: int, data: bytes, kill_priv: Caller | None) -> int:
        h = await self._node_write_handle(node)
        h.busy += 1
        try:
            return await _write(self, h, off, data, kill_priv)
        finally:
            h.unbusy()

    async def fallocate(
        self, fh: int, mode: int, offset: int, length: int, writer: Caller | None = None
    ) -> None:
        """fallocate(2) MODE on the upper file, copied up first as for a write (kernel
        overlayfs copied it up at the open for write), setuid/setgid cleared as a write by
        WRITER clears them (the kernel's file_modified; for a node handle). On a worker
        thread: allocating or zeroing a large range takes the upper filesystem a while."""
        if not fh & NODE_FH:
            h = self.get(fh)
            if not h.writable:
                raise OSError(errno.EBADF, "not open for writing")
            kill_priv, h.kill_priv = h.kill_priv, None  # as write
            fd, close = os.dup(h.fd), True  # a thread may outlive the handle
        else:
            h = await self._node_write_handle(self.table.get(fh & ~NODE_FH))
            kill_priv = None if writer is None else writer.kill_priv
            fd, close = os.dup(h.fd), True
        if kill_priv is not None:
            self.killed_priv(h, kill_priv)
        try:
            await trio.to_thread.run_sync(_sys.fallocate, fd, mode, offset, length)
        finally:
            if close:
                os.close(fd)

    async def _pins_released(self) -> bool:
        """Wait a little for the kernel to forget files deleted just before (their FORGET
        follows the unlink by a few ms), whose pinned data still fills the disk; True if
        some were let go."""
        pinned = sum(h.pinned for h in self.by_node.values())
        for _ in range(20):
            if not pinned:
                return False
            await trio.sleep(0.005)
            if sum(h.pinned for h in self.by_node.values()) < pinned:
                return True
        return False

    async def fsync(self, fh: int, datasync: bool) -> None:
        if not self.honour_fsync:
            return
        sync = os.fdatasync if datasync else os.fsync
        if not fh & NODE_FH:
            h = self.get(fh)
            if h.writable:
                await trio.to_thread.run_sync(sync, h.fd)
            return
        node = self.table.get(fh & ~NODE_FH)
        if not self._on_upper(node):
            return  # nothing of it was written
        fd = os.dup(self._node_handle(node).fd)  # a thread may outlive an eviction
        try:
            await trio.to_thread.run_sync(sync, fd)
        finally:
            os.close(fd)

    def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        h.close()
        h.node.opens -= 1
        self.table.release(h.node)

    def close(self) -> None:
        for fh in list(self.handles):
            self.release(fh)
        for node_id in list(self.by_node):
            self._drop(node_id)

    def fd_of(self, node: Node) -> int | None:
        """An open fd of NODE, for a node that has lost its last name (else None)."""
        h = self.by_node.get(node.id)
        if h is not None and h.node is node:
            self._follow_copy_up(h)
            return h.fd
        h = self._open_handle(node)
        return h.fd if h is not None else None

    def _open_handle(self, node: Node) -> Handle | None:
        """An open handle of NODE, one on the upper copy first: a handle opened on the lower
        before the copy-up can no longer follow it by name once the name is gone (ENOENT)."""
        mine = [h for h in self.handles.values() if h.node is node]
        return next((h for h in mine if h.on_upper), mine[0] if mine else None)

    def fstat(self, node: Node) -> os.stat_result | None:
        """lstat through an open handle of NODE (for a node that has lost its last name)."""
        fd = self.fd_of(node)
        return os.fstat(fd) if fd is not None else None

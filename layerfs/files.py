"""Open files: the handle table, copy-up on the first open for write, read/write/fsync.

Two kinds of handle. An OPEN request gets its own (a small number). Where the kernel sends no
OPEN (the adapter answered it ENOSYS, see layerfs.fusehooks), requests name the node instead,
``NODE_FH | node id``: each node then has one shared handle, opened on first use (read-only on
the data, or read-write on the upper, copied up by the first write), kept in a bounded LRU, and
pinned while the node has lost its last name, since the kernel may still hold it open.

A read-only open of a lower file reads the lower directly (no copy), and so does one of a
metacopy file (its data is still the lower's). An open for write, or with O_TRUNC, copies the
file up first (with O_TRUNC, without its data). A handle opened on the lower before someone
else copied the data up switches to the upper copy on its next read, as overlayfs' stacked file
operations do.

Kernel analogue: fs/overlayfs/file.c (ovl_open, ovl_real_fdget).
Must not import: pyfuse3.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from collections import OrderedDict

import trio

from layerfs import _sys
from layerfs.attrs import Caller
from layerfs.copyup import CopyUp
from layerfs.inodes import InodeTable, Node
from layerfs.layers import LayerStack

BIG_IO = 256 << 10  # reads/writes from this size on go to a worker thread
NODE_FH = 1 << 62  # a handle naming a node: no OPEN was sent for it (layerfs.fusehooks)


class Handle:
    """An open file. ``kill_priv``: the groups of an opener that may not keep setuid/setgid
    bits on a write (no CAP_FSETID: we take uid != 0), which the daemon, as root, must then
    clear itself; None for root."""

    __slots__ = ("busy", "fd", "kill_priv", "node", "old_fds", "on_upper", "pinned", "writable")

    def __init__(
        self,
        fd: int,
        node: Node,
        on_upper: bool,
        writable: bool,
        kill_priv: frozenset[int] | None = None,
    ) -> None:
        self.fd = fd
        self.node = node
        self.on_upper = on_upper
        self.writable = writable
        self.kill_priv = kill_priv
        self.old_fds: list[int] = []  # lower fds replaced after a copy-up, closed on release
        self.busy = 0  # operations running on a worker thread with fd
        self.pinned = False  # a node handle kept while the node has no name left

    def close(self) -> None:
        for fd in (self.fd, *self.old_fds):
            os.close(fd)


def kill_suid(fd: int, groups: frozenset[int]) -> None:
    """Clear setuid/setgid as a write by a process without CAP_FSETID does (the FUSE kernel
    module leaves this to us: libfuse asks for handle_killpriv).

    As setattr_should_drop_suidgid: setuid always; setgid on a group-executable file, or on
    any file whose group the writer (GROUPS) is not in.
    """
    st = os.fstat(fd)
    mode = st.st_mode
    if not stat.S_ISREG(mode):
        return
    kill = stat.S_ISUID if mode & stat.S_ISUID else 0
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or st.st_gid not in groups):
        kill |= stat.S_ISGID
    if kill:
        os.fchmod(fd, stat.S_IMODE(mode) & ~kill)


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
        self.max_node_fds = 512
        self.no_open = False  # the adapter sets it when the kernel will send no OPEN

    def statistics(self) -> dict[str, int]:
        return {"open_files": len(self.handles), "node_fds": len(self.by_node)}

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
        kill_priv: frozenset[int] | None = None,
    ) -> int:
        fh = next(self._ids)
        self.handles[fh] = Handle(fd, node, on_upper, writable, kill_priv)
        node.opens += 1
        return fh

    def data_location(self, node: Node) -> tuple[int, bytes]:
        """(dirfd, name) of the real file holding NODE's data: the lower for a metacopy."""
        if node.metacopy:
            layer, lpath = node.lowers[0]
            return layer.locate(lpath)
        return self.real_location(node)

    async def open(self, node: Node, flags: int, caller: Caller) -> int:
        """Open NODE with FLAGS for CALLER; return a handle id."""
        acc = flags & os.O_ACCMODE
        writable = acc != os.O_RDONLY
        if writable or flags & os.O_TRUNC:
            if self.stack.upper is None:
                raise OSError(errno.EROFS, "read-only stack")
            await self.copyup.copy_up(node, data_len=0 if flags & os.O_TRUNC else None)
        dirfd, name = self.data_location(node)
        real_flags = os.O_RDWR if writable else os.O_RDONLY
        if flags & os.O_TRUNC:
            real_flags |= os.O_TRUNC
        fd = _sys.open_at(dirfd, name, real_flags | (flags & (os.O_SYNC | os.O_DSYNC)))
        on_upper = node.upper and not node.metacopy
        return self.add(fd, node, on_upper, writable, caller.kill_priv_groups())

    def get(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise OSError(errno.EBADF, "bad file handle")
        return h

    # -- node handles (no OPEN) ----------------------------------------------------------------

    def _node_handle(self, node: Node, *, writable: bool = False) -> Handle:
        """NODE's shared handle, read-write on the upper if WRITABLE (copied up already)."""
        h = self.by_node.get(node.id)
        if h is not None and h.node is not node:  # a stale entry of a reused id
            self._drop(node.id)
            h = None
        if h is not None and (h.writable or not writable):
            self.by_node.move_to_end(node.id)
            return h
        dirfd, name = self.data_location(node)
        fd = _sys.open_at(dirfd, name, os.O_RDWR if writable else os.O_RDONLY)
        if h is not None:  # a read-only handle becomes writable: keep the old fd for readers
            h.old_fds.append(h.fd)
            h.fd, h.writable, h.on_upper = fd, True, True
            return h
        h = Handle(fd, node, bool(node.upper and not node.metacopy), writable)
        self.by_node[node.id] = h
        if len(self.by_node) > self.max_node_fds:
            self._evict()
        return h

    def adopt(self, fd: int, node: Node) -> int:
        """Make FD (read-write, on the upper) NODE's handle; return the node's handle id."""
        self._drop(node.id)
        self.by_node[node.id] = Handle(fd, node, True, True)
        if len(self.by_node) > self.max_node_fds:
            self._evict()
        return NODE_FH | node.id

    def _evict(self) -> None:
        """Close the oldest node handles nobody is using, down to three quarters of the cap."""
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
        """The kernel let go of the node: nothing can use its handle any more."""
        if node_id in self.by_node:
            self._drop(node_id)

    def pin(self, node: Node, mode: int) -> None:
        """NODE (of file type MODE) is about to lose its last name while the kernel holds it:
        keep its data open, since a process may have it open and no OPEN told us."""
        if self.no_open and stat.S_ISREG(mode) and node.nlookup > 0:
            self._node_handle(node, writable=bool(node.upper and not node.metacopy)).pinned = True

    async def _resolve(self, fh: int, *, write: bool = False) -> Handle:
        if not fh & NODE_FH:
            return self.get(fh)
        node = self.table.get(fh & ~NODE_FH)
        if write and not (node.upper and not node.metacopy):
            await self.copyup.copy_up(node)  # the first write copies the file up
        return self._node_handle(node, writable=write)

    # -- I/O -----------------------------------------------------------------------------------

    def _follow_copy_up(self, h: Handle) -> None:
        if not h.on_upper and h.node.upper and not h.node.metacopy:
            dirfd, name = self.real_location(h.node)
            fd = _sys.open_at(dirfd, name, os.O_RDONLY)
            h.old_fds.append(h.fd)  # a read on a worker thread may still be using it
            h.fd, h.on_upper = fd, True

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = await self._resolve(fh)
        self._follow_copy_up(h)
        if size >= BIG_IO:
            h.busy += 1
            try:
                return await trio.to_thread.run_sync(os.pread, h.fd, size, off)
            finally:
                h.busy -= 1
        return os.pread(h.fd, size, off)

    async def write(self, fh: int, off: int, data: bytes, writer: Caller | None = None) -> int:
        """Write DATA at OFF. WRITER: who writes, for a node handle (the opener of an OPEN
        handle was recorded at open)."""
        h = await self._resolve(fh, write=True)
        if not h.writable:
            raise OSError(errno.EBADF, "not open for writing")
        kill_priv = h.kill_priv if writer is None else writer.kill_priv_groups()
        if kill_priv is not None:
            kill_suid(h.fd, kill_priv)
            h.kill_priv = None  # once cleared, a later chmod +s by the owner must stay
        if len(data) >= BIG_IO:
            h.busy += 1
            try:
                return await trio.to_thread.run_sync(os.pwrite, h.fd, data, off)
            finally:
                h.busy -= 1
        return os.pwrite(h.fd, data, off)

    async def fsync(self, fh: int, datasync: bool) -> None:
        h = await self._resolve(fh)
        if self.honour_fsync and (h.writable or h.on_upper):
            h.busy += 1
            try:
                await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, h.fd)
            finally:
                h.busy -= 1

    def release(self, fh: int) -> None:
        if fh & NODE_FH:
            return  # a node handle lives until the node is forgotten
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
        for h in self.handles.values():
            if h.node is node:
                self._follow_copy_up(h)
                return h.fd
        return None

    def fstat(self, node: Node) -> os.stat_result | None:
        """lstat through an open handle of NODE (for a node that has lost its last name)."""
        fd = self.fd_of(node)
        return os.fstat(fd) if fd is not None else None

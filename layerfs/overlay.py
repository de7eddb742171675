"""The Overlay facade: one method per filesystem operation, in engine types (no pyfuse3).

It owns the layer stack, the inode table, the copy-up engine, the namespace and file tables,
and answers each request from them. Errors are OSError with an errno; the adapter maps them.

Caveats (deliberate divergences from kernel overlayfs):
- Copy-up writes no ``overlay.origin``/``impure`` xattrs: inode numbers of copied-up files are
  kept for the life of the mount, not across remounts (kernel: across remounts too).

Kernel analogue: fs/overlayfs/inode.c (ovl_getattr, ovl_setattr, ovl_xattr_*), super.c.
Must not import: pyfuse3.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Iterator
from typing import cast

import trio

from layerfs import _sys, acl, xattrs
from layerfs.attrs import Attr, Caller, SetAttr
from layerfs.config import MountConfig
from layerfs.copyup import CopyUp, fix_origin
from layerfs.errors import MetacopySizeError
from layerfs.files import NODE_FH, Files, kill_suid
from layerfs.idmap import IdMap
from layerfs.inodes import ROOT_ID, InodeTable, Node
from layerfs.layers import Layer, LayerStack, Path
from layerfs.lookup import Resolution, node_for, resolve
from layerfs.namespace import Namespace
from layerfs.readdir import DirCache, DirHandle, kernel_order, merged_listing

log = logging.getLogger(__name__)


def _truncate(fd: int, size: int, caller: Caller) -> None:
    """ftruncate FD for CALLER, keeping setuid/setgid bits for a caller that keeps them.

    The kernel clears them on a truncate by a process without CAP_FSETID in the initial user
    namespace, which a rootless daemon never has, whoever asked; kernel overlayfs truncates
    its upper file without that check (notify_change). Clearing for unprivileged callers is
    kill_suid's part.
    """
    mode = os.fstat(fd).st_mode if caller.keeps_priv else 0
    os.ftruncate(fd, size)
    if mode & (stat.S_ISUID | stat.S_ISGID) and os.fstat(fd).st_mode != mode:
        os.fchmod(fd, stat.S_IMODE(mode))


def _setattr_fd(fd: int, ch: SetAttr, caller: Caller) -> os.stat_result:
    """setattr through FD, open on the file (the descriptor a node keeps, or the one left of
    a file unlinked while open); returns its fstat after, the reply's attributes."""
    if ch.size is not None:
        _truncate(fd, ch.size, caller)
        if not caller.keeps_priv and ch.mode is None:
            kill_suid(fd, caller)
    return _change_fd(fd, ch.mode, ch.uid, ch.gid, ch.atime_ns, ch.mtime_ns)


def _change_fd(
    fd: int,
    mode: int | None,
    uid: int | None,
    gid: int | None,
    atime_ns: int | None,
    mtime_ns: int | None,
) -> os.stat_result:
    """The owner, mode and times of FD's file changed where not None (in that order, as
    tar's fchown, fchmod, utimensat); its fstat after."""
    if uid is not None or gid is not None:
        os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
    if mode is not None:
        os.fchmod(fd, stat.S_IMODE(mode))
    if atime_ns is not None or mtime_ns is not None:
        _sys.futimens(fd, atime_ns, mtime_ns)
    return os.fstat(fd)


# the inode flag getters FUSE sends (fuse_fileattr_get) and the size of their data
FS_IOC_GETFLAGS, FS_IOC_FSGETXATTR = 0x80086601, 0x801C581F
_FLAG_GETTERS = {FS_IOC_GETFLAGS: 4, FS_IOC_FSGETXATTR: 28}

CAPS = b"security.capability"  # what the kernel's kill-priv checks ask (Node.no_caps)

# errors of the daemon, not of an entry: a listing stops at them rather than skip the entry
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


class Overlay:
    """A mounted layer stack, served by the methods below."""

    def __init__(self, config: MountConfig) -> None:
        self.config = config
        self.stack = LayerStack(config.lowers, config.upper, config.workdir)
        self.stack.metacopy = config.metacopy
        self.table = InodeTable(self.stack.devs, writable=self.stack.upper is not None)
        # the overlay xattrs written in the upper: trusted.overlay.*, or user.overlay.*
        self.names = xattrs.names_for(config.user_xattrs)
        self.ids = IdMap.of(config)  # ids shown vs stored (uidmapping=, squash_to_uid=, ...)
        self.ids_active = self.ids.active  # a property: asked at every reply
        self.copyup = CopyUp(
            self.stack,
            self.table,
            fsync=config.fsync_mode,
            metacopy=config.metacopy,
            names=self.names,
        )
        self.ns = Namespace(self.stack, self.table, self.copyup, redirect_dir=config.redirects)
        self.files = Files(
            self.stack, self.table, self.copyup, honour_fsync=config.fsync_mode != "volatile"
        )
        self.ns.keeping_data = self.files.keeping_data
        self.dirs: dict[int, DirHandle] = {}
        self.node_dirs: dict[int, DirHandle] = {}  # listings in progress without an OPENDIR
        self.dircache = DirCache()
        self.plain_listings = True  # the adapter clears it if it cannot send bare st_ino
        self._dir_ids = 0
        self.root = self._make_root()

    def _make_root(self) -> Node:
        top = self.stack.lowers[0] if self.stack.lowers else self.stack.upper
        assert top is not None
        st = os.fstat(top.root_fd)
        # An opaque mark on a layer's root means nothing to the kernel, nor to us.
        lowers: list[tuple[Layer, Path]] = [(layer, ()) for layer in self.stack.lowers]
        key = self.table.ident(st.st_dev, st.st_ino)
        root = Node(key, True, None, b"", self.stack.upper is not None, lowers, key)
        root.nlookup = 1
        return self.table.add(root, ROOT_ID)

    def close(self) -> None:
        self.files.close()
        self.stack.close()

    def shrink(self) -> None:
        """Drop the caches that only save work (listings); the kernel is shedding memory."""
        self.dircache.clear()
        self.stack.indexes.clear()
        for layer in self.stack.lowers:
            layer.clear_listings()

    def statistics(self) -> dict[str, int]:
        return {
            **self.table.statistics(),
            **{f"copyup_{k}": v for k, v in self.copyup.statistics().items()},
            **{f"ns_{k}": v for k, v in self.ns.statistics().items()},
            **self.files.statistics(),
            "open_dirs": len(self.dirs),
            **self.dircache.statistics(),
            **self.stack.indexes.statistics(),
        }

    # -- attributes --------------------------------------------------------------------------

    def _lstat(self, node: Node) -> os.stat_result:
        try:
            dirfd, name = self.files.real_location(node)
        except OSError:
            st = self.files.fstat(node)
            if st is None:
                raise
            return st
        if not name:
            return os.fstat(dirfd)
        return _sys.lstat_at(dirfd, name)

    def attr(self, node: Node, st: os.stat_result | None = None) -> Attr:
        if st is None:
            st = self._lstat(node)
        nlink = 1 if node.merged else None  # merged dirs read nlink 1, as in ovl_getattr
        rid = node.origin if node.origin is not None else self.table.ident(st.st_dev, st.st_ino)
        attr = Attr.from_stat(node.id, self.table.st_ino(rid), st, nlink)
        if self.files.data_elsewhere(node):  # the blocks are the data's, as ovl_getattr
            dirfd, name = self.files.data_location(node)
            attr = attr._replace(blocks=_sys.lstat_at(dirfd, name).st_blocks)
        return self.ids.attr(attr) if self.ids_active else attr

    def getattr(self, ino: int) -> Attr:
        return self.attr(self.table.get(ino))

    def lookup(self, parent_ino: int, name: bytes) -> Attr:
        """Resolve NAME and count a lookup on its node (pyfuse3's lookup contract)."""
        attr = self.find(parent_ino, name)
        if attr is None:
            raise OSError(errno.ENOENT, "no such entry")
        return attr

    def find(self, parent_ino: int, name: bytes) -> Attr | None:
        """lookup(), None where NAME does not exist: a failed lookup is a common request
        (a path search, a create's first look), not worth an exception."""
        parent = self.table.get(parent_ino)
        if name == b".":
            node = parent
        elif name == b"..":
            node = parent.parent or parent
        else:
            if not parent.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")
            _sys.check_name(name)
            res = resolve(self.stack, parent, name, unseen=True)
            if res is None:
                return None
            if res.fix_origin:
                self.fix_origin(parent, name, res)
            node = node_for(self.table, parent, name, res)
            node.nlookup += 1
            return self.attr(node, res.st)
        node.nlookup += 1
        return self.attr(node)

    def fix_origin(self, parent: Node, name: bytes, res: Resolution) -> None:
        """What the kernel's lookup writes on an upper directory that merges lowers but
        records no origin: the origin, and the parent's impure mark (copyup.fix_origin)."""
        upper = self.stack.upper
        if (
            res.fix_origin
            and upper is not None
            and fix_origin(upper, self.names, parent, name, res.lowers[0])
        ):
            parent.version += 1  # its listing now looks its upper entries up
            self.copyup.listing_changed.append(parent.id)

    def forget(self, items: list[tuple[int, int]]) -> None:
        for ino, n in items:
            self.table.forget(ino, n)
            if ino not in self.table.nodes:  # the id may name a new node later
                self.files.forgotten(ino)
                self.node_dirs.pop(ino, None)
                self.dircache.forget(ino)
        self.table.compact()

    def counted(self, node: Node, st: os.stat_result | None = None) -> Attr:
        """Count a lookup on a node just created and return its attributes (from ST, its
        lstat, if given)."""
        node.nlookup += 1
        return self.attr(node, st)

    async def setattr(self, ino: int, ch: SetAttr, fh: int | None, caller: Caller) -> Attr:
        if self.ids_active:  # chown to shown ids: store them as the layers keep them
            caller = self.ids.caller(caller)
            ch = ch._replace(
                uid=None if ch.uid is None else self.ids.store_uid(ch.uid),
                gid=None if ch.gid is None else self.ids.store_gid(ch.gid),
            )
        node = self.table.get(ino)
        if self.stack.upper is None:
            raise OSError(errno.EROFS, "read-only stack")
        if ch.size is not None and node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        if not node.upper or (ch.size is not None and node.metacopy):  # copy_up's no-op test
            # a truncate copies no more data; anything else changes metadata only, and a
            # regular file's copy-up makes that change itself (the copy's lstat comes back)
            meta = ch.size is None
            done = await self.copyup.copy_up(
                node, data_len=ch.size, meta=meta, change=ch if meta else None
            )
            if node.id in self.copyup.changed:  # the reply carries its attributes: no notice
                self.copyup.changed.remove(node.id)
            if done is not None:
                return self.attr(node, done)
        h = self.files.upper_handle(node)
        if h is not None and (ch.size is None or h.writable):
            # the descriptor the node keeps on its upper file (a file this mount made or
            # wrote): no path to walk, here or in the kernel
            return self.attr(node, _setattr_fd(h.fd, ch, caller))
        try:
            dirfd, name = self.files.real_location(node)
        except OSError:  # unlinked, but still open: work through the open file
            fd = self.files.fd_of(node)
            if fd is None:
                raise
            return self.attr(node, _setattr_fd(fd, ch, caller))
        if ch.size is not None:
            h = self.files.handles.get(fh) if fh else None  # 0: no OPEN was sent
            fd = h.fd if h is not None else _sys.open_data(dirfd, name, os.O_WRONLY)
            try:
                _truncate(fd, ch.size, caller)
                if not caller.keeps_priv and ch.mode is None:
                    kill_suid(fd, caller)
            finally:
                if h is None:
                    os.close(fd)
        target = name or b"."
        if ch.uid is not None or ch.gid is not None:
            uid = -1 if ch.uid is None else ch.uid
            gid = -1 if ch.gid is None else ch.gid
            os.chown(target, uid, gid, dir_fd=dirfd, follow_symlinks=False)
        if ch.mode is not None:
            _sys.chmod_at(dirfd, target, stat.S_IMODE(ch.mode))
        if ch.atime_ns is not None or ch.mtime_ns is not None:
            _sys.utimens_at(dirfd, name, ch.atime_ns, ch.mtime_ns)
        return self.attr(node, _sys.lstat_at(dirfd, name) if name else os.fstat(dirfd))

    def setattr_fd(
        self,
        ino: int,
        mode: int | None,
        uid: int | None,
        gid: int | None,
        atime_ns: int | None,
        mtime_ns: int | None,
    ) -> Attr | None:
        """``setattr``'s commonest case, synchronous and without a SetAttr or a Caller (the
        compiled raw path's first try at a SETATTR, an untar's three a file): no size, ids
        not mapped, a node in the upper with a descriptor kept on its upper file (one MKNOD
        made, or a write opened): the changes through it. None where setattr must serve."""
        if self.ids_active:
            return None
        node = self.table.get(ino)
        if not node.upper:
            return None
        h = self.files.upper_handle(node)
        if h is None:
            return None
        return self.attr(node, _change_fd(h.fd, mode, uid, gid, atime_ns, mtime_ns))

    def readlink(self, ino: int) -> bytes:
        node = self.table.get(ino)
        dirfd, name = self.files.real_location(node)
        return _sys.readlink_at(dirfd, name)

    def statfs(self) -> os.statvfs_result:
        layer = self.stack.upper or self.stack.lowers[0]
        return os.statvfs(_sys.proc_path(layer.root_fd))

    # -- files -------------------------------------------------------------------------------

    async def open(self, ino: int, flags: int, caller: Caller) -> int:
        caller = self.ids.caller(caller)
        node = self.table.get(ino)
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        return await self.files.open(node, flags, caller)

    async def create(
        self, parent_ino: int, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[int, Attr]:
        caller = self.ids.caller(caller)
        parent = self.table.get(parent_ino)
        node, st, fd = await self.ns.create(parent, name, mode, flags, caller)
        node.no_caps = True  # a new file of ours
        fh = self.files.add(fd, node, True, True, caller.kill_priv)
        return fh, self.counted(node, st)

    def release(self, fh: int) -> None:
        self.files.release(fh)

    # -- namespace ---------------------------------------------------------------------------

    async def mkdir(self, parent_ino: int, name: bytes, mode: int, caller: Caller) -> Attr:
        caller = self.ids.caller(caller)
        node, st = await self.ns.mkdir(self.table.get(parent_ino), name, mode, caller)
        return self.counted(node, st)

    async def mknod(
        self, parent_ino: int, name: bytes, mode: int, rdev: int, caller: Caller
    ) -> Attr:
        caller = self.ids.caller(caller)
        node, st, fd = await self.ns.mknod(self.table.get(parent_ino), name, mode, rdev, caller)
        node.no_caps = True  # a new file of ours: the first write's GETXATTR needs no syscall
        if fd is not None:
            self.files.keep_new(node, fd)
        return self.counted(node, st)

    async def symlink(self, parent_ino: int, name: bytes, target: bytes, caller: Caller) -> Attr:
        caller = self.ids.caller(caller)
        node, st = await self.ns.symlink(self.table.get(parent_ino), name, target, caller)
        return self.counted(node, st)

    async def link(self, ino: int, parent_ino: int, name: bytes) -> Attr:
        node = await self.ns.link(self.table.get(ino), self.table.get(parent_ino), name)
        return self.counted(node)

    async def unlink(self, parent_ino: int, name: bytes) -> None:
        await self.ns.unlink(self.table.get(parent_ino), name)

    async def rmdir(self, parent_ino: int, name: bytes) -> None:
        await self.ns.rmdir(self.table.get(parent_ino), name)

    async def rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int) -> None:
        await self.ns.rename(self.table.get(p1), n1, self.table.get(p2), n2, flags)

    # -- directories -------------------------------------------------------------------------

    def opendir(self, ino: int) -> int:
        node = self.table.get(ino)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        self._dir_ids += 1
        self.dirs[self._dir_ids] = self._dir_handle(node)
        node.opens += 1
        return self._dir_ids

    def _dir_handle(self, node: Node) -> DirHandle:
        plain = self.dircache.get(node) if self.plain_listings else None
        if plain is not None:
            return DirHandle(node, [e[0] for e in plain], plain)
        dh = DirHandle(node, [], None)
        self._snapshot(dh)
        return dh

    def _node_dir(self, node_id: int, start: int) -> DirHandle | None:
        """The listing of a directory read without OPENDIR (NODE_FH): a fresh one from offset
        0, the one in progress after; dropped at the end, where the kernel reads no further."""
        node = self.table.get(node_id)
        dh = self.node_dirs.get(node_id)
        if start == 0 or dh is None or dh.node is not node:
            dh = self.node_dirs[node_id] = self._dir_handle(node)
        elif start >= len(dh.names):
            del self.node_dirs[node_id]
            return None
        return dh

    def _snapshot(self, dh: DirHandle) -> None:
        """Take the names of a listing of DH's directory, the error its listing answers, the
        indexes of the entries it leaves out and the lookups made (_check_impure_merged)."""
        node = dh.node
        names, upper = merged_listing(self.stack, node)
        dh.error, dh.stale, dh.resolved = None, set(), {}
        if node.upper and self._impure(node):
            if not node.lowers:
                dh.error = self._check_impure(node, names)
            elif upper:
                dh.error, left_out = self._check_impure_merged(node, names, upper, dh.resolved)
                dh.stale = {i + 2 for i, n in enumerate(names) if n in left_out}
        dh.names = [b".", b"..", *names]
        dh.version = node.version

    def _impure(self, node: Node) -> bool:
        """Is NODE's upper directory marked impure (its listing computes d_ino by lookups)?"""
        if not node.upper or self.stack.upper is None:
            return False
        ufd = self.stack.upper.dirfd(node.path())
        # exactly "y", as ovl_path_check_dir_xattr reads it (one byte, and it must be "y")
        return _sys.getxattr_at(ufd, b"", self.names.impure) == b"y"

    def _check_impure(self, node: Node, names: list[bytes]) -> OSError | None:
        """Listing an upper-only directory marked impure looks every entry up first, as the
        kernel does (ovl_dir_read_impure): the first lookup that fails fails the listing
        (returned); if every entry shows its own inode number (none has an origin), the
        mark is removed ("a good opportunity to get rid of an unneeded impure flag")."""
        assert self.stack.upper is not None
        needed = False
        for name in names:
            try:
                res = resolve(self.stack, node, name)
                if res is not None:
                    self.fix_origin(node, name, res)
                child = node_for(self.table, node, name, res) if res is not None else None
            except OSError as e:
                if e.errno in _OUT_OF_RESOURCES:
                    return None  # the listing itself meets it (see readdir)
                return e
            # an upper file whose origin a remount has not followed still needs the mark
            needed = needed or (
                child is not None and (child.origin is not None or self.ns.has_origin(child))
            )
        if not needed and node.parent is not None:
            node.impure = False
            with contextlib.suppress(OSError):  # best effort, as the kernel's
                os.removexattr(self.stack.upper.dirfd(node.path()), self.names.impure)
        return None

    def _check_impure_merged(
        self,
        node: Node,
        names: list[bytes],
        upper: dict[bytes, bool],
        resolved: dict[bytes, object],
    ) -> tuple[OSError | None, set[bytes]]:
        """Listing a merged directory marked impure looks its upper entries up, in the
        kernel's order (readdir.kernel_order), as it fills their d_ino (ovl_iterate_merged,
        ovl_cache_update); its lower entries keep the real d_ino, unlooked. An entry whose
        lookup fails ends that getdents (the kernel marks it stale: left out after), and fails
        it when nothing came before it in it: at the start, or right after another such entry
        (a caller's buffer taken as large enough for the directory, as readdir(3)'s 32 KiB).
        Returns that error, if any, and the names left out; RESOLVED gets the lookups made."""
        failed: dict[bytes, OSError | None] = {}  # None: a negative lookup (stale, no error)
        for name in kernel_order(self.stack, node, names, dots=False):
            if name not in upper:
                continue
            try:
                res = resolve(self.stack, node, name)
                if res is None:
                    failed[name] = None
                    continue
                if res.fix_origin:
                    self.fix_origin(node, name, res)
                node_for(self.table, node, name, res)
                resolved[name] = res
            except MetacopySizeError:
                continue  # the kernel's lookup passes it: listed, bare (see MetacopySizeError)
            except OSError as e:
                if e.errno in _OUT_OF_RESOURCES:
                    return None, set()  # the listing itself meets it (see readdir)
                failed[name] = e
        if not failed:
            return None, set()
        # where ``.`` and ``..`` fall decides whether a failing entry starts a getdents
        left_out: set[bytes] = set()
        emitted = False  # an entry went out since the last getdents began
        for name in kernel_order(self.stack, node, names, dots=True):
            if name not in failed:
                emitted = True
                continue
            error = failed[name]
            if error is not None:
                if not emitted:
                    return error, left_out
                emitted = False
            left_out.add(name)
        return None, left_out

    def readdir(self, fh: int, start: int) -> Iterator[tuple[bytes, Node | None, Attr, int]]:
        """Yield (name, node, attr, next offset) from offset START of the handle's snapshot.

        The caller counts a lookup for each entry the kernel accepted that has a node (not
        ``.`` and ``..``, for which the kernel takes none). Entries without a node carry only
        st_ino and the type (see DirCache).
        """
        if fh & NODE_FH:
            dh = self._node_dir(fh & ~NODE_FH, start)
            if dh is None:
                return
        else:
            dh = self.dirs.get(fh)
            if dh is None:
                raise OSError(errno.EBADF, "bad directory handle")
        node = dh.node
        if start == 0 and dh.version != node.version:
            self._snapshot(dh)
            dh.plain, dh.sent = None, {}
        if dh.error is not None:
            error = dh.error
            if node.lowers:
                dh.error = None  # merged: once, where the kernel's getdents meets it
            raise OSError(error.errno, error.strerror)
        if dh.plain is not None:
            for i in range(start, len(dh.plain)):
                name, ino, mode = dh.plain[i]
                yield name, None, Attr(0, ino, mode, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0), i + 1
            return
        sent_any = False
        for i in range(start, len(dh.names)):
            name = dh.names[i]
            if i in dh.stale:
                continue
            if name in (b".", b".."):
                child = node if name == b"." else node.parent or node
                attr = self.attr(child)
            else:
                try:
                    kept = dh.resolved.pop(name, None) if dh.resolved else None
                    res: Resolution | None
                    if kept is None or dh.version != node.version:
                        res = resolve(self.stack, node, name)
                    else:
                        res = cast(Resolution, kept)  # the snapshot's (_check_impure_merged)
                    if res is not None and res.fix_origin and kept is None:
                        # a merged upper directory without an origin, which the kernel's
                        # listing does not look up (this directory is not impure): a node
                        # needs fix_origin first, which the kernel writes at the name's
                        # first lookup. Bare, the entry makes the kernel send that LOOKUP
                        found, bare = None, self._bare_entry(node, name)
                    else:
                        found = node_for(self.table, node, name, res) if res is not None else None
                        bare = None
                except OSError as e:
                    if e.errno not in _OUT_OF_RESOURCES:
                        # the kernel lists a name whose lookup fails (a planted metacopy with
                        # no data, a bad redirect, a second name of a redirected directory)
                        # with its real d_ino, unlooked: a nodeless entry (the impure
                        # directory's failing upper entries are left out: dh.stale)
                        bare = self._bare_entry(node, name)
                        if bare is not None:
                            dh.sent[i] = (name, bare.ino, bare.mode)
                            sent_any = True
                            yield name, None, bare, i + 1
                        continue  # gone since the snapshot: skipped
                    if sent_any:
                        return  # end this reply here: the next one starts at NAME again
                    raise  # never a listing that silently lacks an entry
                if bare is not None:
                    dh.sent[i] = (name, bare.ino, bare.mode)
                    sent_any = True
                    yield name, None, bare, i + 1
                    continue
                if res is None or found is None:
                    continue  # removed since the snapshot
                child = found
                attr = self.attr(child, res.st)
            dh.sent[i] = (name, attr.ino, attr.mode)
            sent_any = True
            yield name, child, attr, i + 1
        if len(dh.sent) == len(dh.names) and dh.version == node.version:
            self.dircache.put(node, [dh.sent[i] for i in range(len(dh.names))])

    def _bare_entry(self, parent: Node, name: bytes) -> Attr | None:
        """st_ino and type of entry NAME of PARENT as the kernel lists it without a lookup:
        the topmost real object's (None: not there)."""
        st = None
        if parent.upper and self.stack.upper is not None:
            st = _sys.lstat_at_or_none(self.stack.upper.dirfd(parent.path()), name)
        if st is None:
            for layer, dpath in parent.lowers:
                if name in layer.listing(dpath).entries:
                    st = _sys.lstat_at(layer.dirfd(dpath), name)
                    break
        if st is None:
            return None
        ino = self.table.st_ino(self.table.ident(st.st_dev, st.st_ino))
        return Attr(0, ino, stat.S_IFMT(st.st_mode), 1, 0, 0, 0, 0, 0, 0, 0, 0, 0)

    async def fsyncdir(self, fh: int) -> None:
        """fsync the directory's upper part (what a rename or create there changed)."""
        if fh & NODE_FH:
            node: Node | None = self.table.get(fh & ~NODE_FH)
        else:
            dh = self.dirs.get(fh)
            node = dh.node if dh is not None else None
        if (
            node is None
            or not node.upper
            or self.stack.upper is None
            or self.config.fsync_mode == "volatile"
        ):
            return
        fd = os.dup(self.stack.upper.dirfd(node.path()))  # a thread may outlive the cache
        try:
            await trio.to_thread.run_sync(os.fsync, fd, limiter=self.copyup.limiter)
        finally:
            os.close(fd)

    def releasedir(self, fh: int) -> None:
        dh = self.dirs.pop(fh, None)
        if dh is not None:
            dh.node.opens -= 1
            self.table.release(dh.node)

    # -- inode flags -------------------------------------------------------------------------

    def get_inode_flags(self, ino: int, cmd: int, size: int) -> bytes:
        """FS_IOC_GETFLAGS / FS_IOC_FSGETXATTR (SIZE bytes) of NODE's real file, as
        ovl_fileattr_get answers them; any other ioctl is ENOTTY. The setters are not served
        (docs/design.md, "Inode flags")."""
        if cmd not in _FLAG_GETTERS or size != _FLAG_GETTERS[cmd]:
            raise OSError(errno.ENOTTY, "ioctl not served")
        node = self.table.get(ino)
        dirfd, name = self.files.real_location(node)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        fd = os.open(name or b".", flags, dir_fd=dirfd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode) and not node.is_dir:
                raise OSError(errno.ENOTTY, "not a file or directory")
            out = bytearray(size)
            fcntl.ioctl(fd, cmd, out)
        finally:
            os.close(fd)
        return bytes(out)

    # -- xattrs ------------------------------------------------------------------------------

    def _xattr_path(self, node: Node) -> tuple[bytes | int, bool]:
        """Where to reach NODE's xattrs: a path not to follow, or an open fd once unlinked."""
        try:
            dirfd, real = self.files.real_location(node)
        except OSError:
            fd = self.files.fd_of(node)
            if fd is None:
                raise
            return fd, True
        return _sys.proc_path(dirfd, real), not real  # a layer's root: the fd's link, followed

    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self.find_xattr(ino, name)
        if value is None:
            raise OSError(errno.ENODATA, "no such attribute")
        return value

    def find_xattr(self, ino: int, name: bytes) -> bytes | None:
        """getxattr(), None where there is no such attribute: the kernel asks for one that
        most files lack (``security.capability``) at each new file's first write and at
        each chown; a node that has none knows it (Node.no_caps)."""
        if name == CAPS:
            node = self.table.get(ino)
            if node.no_caps:
                return None
            value = self._real_xattr(node, CAPS)
            node.no_caps = value is None
            return value if value is None or not self.ids_active else self.ids.cap_shown(value)
        if not xattrs.user_may_name(name, self.names):
            return None
        value = self._real_xattr(self.table.get(ino), xattrs.to_real(name, self.names))
        if value is not None and self.ids_active and name in (acl.ACCESS, acl.DEFAULT):
            return self.ids.acl_shown(value)  # the entries' ids, as the owner's
        return value

    def _real_xattr(self, node: Node, real_name: bytes) -> bytes | None:
        """The value of the real xattr REAL_NAME of NODE's top real object, None if absent."""
        try:
            dirfd, real = self.files.real_location(node)
        except OSError:  # unlinked: through an open fd
            where, is_fd = self._xattr_path(node)
            try:
                return os.getxattr(where, real_name, follow_symlinks=is_fd)
            except OSError as e:
                if e.errno == errno.ENODATA:
                    return None
                raise
        return _sys.getxattr_or_none_at(dirfd, real, real_name)  # as _xattr_path's, no /proc

    def listxattr(self, ino: int, *, trusted: bool = True) -> list[bytes]:
        """The xattr names of INO a caller sees; TRUSTED: with the ``trusted.*`` ones, which
        the kernel lists only to CAP_SYS_ADMIN (ovl_can_list)."""
        where, is_fd = self._xattr_path(self.table.get(ino))
        try:
            names = os.listxattr(where, follow_symlinks=is_fd)
        except OSError as e:
            if e.errno != errno.ENOTSUP:
                raise
            names = []
        shown = xattrs.visible([os.fsencode(n) for n in names])
        return shown if trusted else [n for n in shown if not n.startswith(b"trusted.")]

    async def setxattr(
        self, ino: int, name: bytes, value: bytes, caller: Caller | None = None
    ) -> None:
        private = not xattrs.user_may_name(name, self.names)
        if private and not (self.names is xattrs.USER and name.startswith(xattrs.TRUSTED.prefix)):
            raise OSError(errno.EPERM, "overlay-private attribute")
        node = await self._copied_up(ino)
        node.no_caps = False  # the one way a file gets security.capability: ask again
        if private:
            # With userxattr the kernel takes trusted.overlay.X for the user's own: it copies
            # up, then the filesystem refuses (no CAP_SYS_ADMIN in a user namespace). layerfs
            # reads it as bookkeeping, so it refuses it there too.
            raise OSError(errno.EPERM, "overlay-private attribute")
        where, is_fd = self._xattr_path(node)
        if name == acl.DEFAULT:
            node.no_default_acl = False  # read again at the next create in it
        if caller is not None:
            caller = self.ids.caller(caller)
        if name == acl.ACCESS and caller is not None and not caller.keeps_priv:
            # As ovl_set_acl: a caller outside the file's group (without CAP_FSETID) loses
            # setgid; the daemon's own setxattr would keep it (we are root). FUSE tells us
            # only with FUSE_SETXATTR_EXT, which pyfuse3 does not pass on: decided here.
            st = os.stat(where, follow_symlinks=is_fd)
            if st.st_mode & stat.S_ISGID and not caller.in_group(st.st_gid):
                os.chmod(where, stat.S_IMODE(st.st_mode) & ~stat.S_ISGID, follow_symlinks=is_fd)
        if name == CAPS and self.ids_active:
            value = self.ids.cap_stored(value)  # for the stored id of its root
        elif name in (acl.ACCESS, acl.DEFAULT) and self.ids_active:
            value = self.ids.acl_stored(value)  # the entries' ids, as a chown's
        os.setxattr(where, xattrs.to_real(name, self.names), value, follow_symlinks=is_fd)

    async def removexattr(self, ino: int, name: bytes) -> None:
        if not self.table.get(ino).upper:
            # ENODATA before any copy-up, as ovl_xattr_set; an upper answers for itself
            # (EPERM for trusted.* in a user namespace, as the kernel, whatever it holds)
            self.getxattr(ino, name)
        node = await self._copied_up(ino)
        where, is_fd = self._xattr_path(node)
        if name == acl.DEFAULT:
            node.no_default_acl = False
        os.removexattr(where, xattrs.to_real(name, self.names), follow_symlinks=is_fd)

    async def _copied_up(self, ino: int) -> Node:
        node = self.table.get(ino)
        if self.stack.upper is None:
            raise OSError(errno.EROFS, "read-only stack")
        await self.copyup.copy_up(node, meta=True)
        return node

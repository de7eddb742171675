"""Namespace changes: create, mkdir, mknod, symlink, link, unlink, rmdir, rename.

Every change lands in the upper in kernel overlayfs' format: a removed name that a lower still
shows becomes a whiteout (char 0/0, or ``.wh.NAME`` where mknod is refused); a directory made
where a whiteout stood is opaque; a renamed directory with lower contents carries an absolute
``overlay.redirect`` to them. A new object that one call makes whole (Namespace._as_made) is
made in place, as ovl_create_upper; any other, and every object replacing a whiteout, is built
in the workdir and swapped in with one rename, so a crash never leaves a half-made name.

Kernel analogue: fs/overlayfs/dir.c (ovl_create_object, ovl_do_remove, ovl_rename).
Must not import: pyfuse3.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable
from contextlib import AbstractContextManager

from layerfs import _sys, acl, whiteout, xattrs
from layerfs.attrs import Caller
from layerfs.copyup import CopyUp, copy_metadata, set_impure
from layerfs.inodes import InodeTable, Node
from layerfs.layers import LayerStack
from layerfs.lookup import Resolution, lower_positive, node_for, resolve
from layerfs.readdir import merged_names

log = logging.getLogger(__name__)

# The longest absolute redirect written (the kernel's overlay.redirect_max module parameter,
# 256 by default): a rename that needs a longer one answers EXDEV, as the kernel does.
REDIRECT_MAX = 256


class Namespace:
    """Namespace operations of one mount."""

    def __init__(
        self, stack: LayerStack, table: InodeTable, copyup: CopyUp, *, redirect_dir: bool = True
    ) -> None:
        self.redirect_dir = redirect_dir
        self.stack = stack
        self.table = table
        self.copyup = copyup
        self.names = copyup.names  # the overlay xattrs this mount writes
        self._mknod_whiteouts = True  # cleared when the upper refuses mknod (then .wh.NAME)
        # wraps the removal of a non-directory's name, given (node, st_mode): Files keeps the
        # data of a node the kernel may hold open (Files.keeping_data)
        self.keeping_data: Callable[[Node, int], AbstractContextManager[None]] = _no_keep
        # what an object the daemon makes gets by itself: its owner (our fsuid, fsgid) and its
        # mode cut by this umask (the daemon sets 0 before serving: mount._open)
        self._euid, self._egid = os.geteuid(), os.getegid()
        self._umask = _sys.umask()
        self.stats = {"in_place": 0, "in_work": 0}  # new objects made in one step / built

    def statistics(self) -> dict[str, int]:
        return dict(self.stats)

    # -- helpers -----------------------------------------------------------------------------

    def _upper_dir(self, node: Node) -> int:
        assert self.stack.upper is not None
        return self.stack.upper.dirfd(node.path())

    def _resolve(self, parent: Node, name: bytes) -> Resolution | None:
        _sys.check_name(name)
        return resolve(self.stack, parent, name)

    def _existing(self, parent: Node, name: bytes) -> tuple[Resolution, Node]:
        res = self._resolve(parent, name)
        if res is None:
            raise OSError(errno.ENOENT, "no such entry")
        return res, node_for(self.table, parent, name, res)

    def _writable(self) -> None:
        if self.stack.upper is None:
            raise OSError(errno.EROFS, "read-only stack")

    def _whiteout_state(self, udir: int, name: bytes) -> str:
        """What the upper holds at NAME when the merged view shows nothing: none/char/oci."""
        st = _sys.lstat_at_or_none(udir, name)
        if st is not None:
            if whiteout.is_chardev_whiteout(st.st_mode, st.st_rdev):
                return "char"
            raise OSError(errno.EEXIST, "exists in upper")
        if whiteout.has_oci_whiteout(udir, name):
            return "oci"
        return "none"

    def _made_here(self, node: Node) -> None:
        """NODE, a directory, was just made in the upper by this mount (a mkdir, a copy-up):
        empty, so it holds no ``.wh.NAME`` whiteout, nor will while mknod works
        (Node.no_oci_whiteouts)."""
        if self.mknod_whiteouts:
            node.no_oci_whiteouts = True

    @property
    def mknod_whiteouts(self) -> bool:
        """Whiteouts are char devices 0/0; False once the upper refused mknod, from when on
        they are ``.wh.NAME`` files, in any directory: then no directory is known to hold
        none (Node.no_oci_whiteouts) any more."""
        return self._mknod_whiteouts

    @mknod_whiteouts.setter
    def mknod_whiteouts(self, value: bool) -> None:
        self._mknod_whiteouts = value
        if not value:
            for node in self.table.nodes.values():
                node.no_oci_whiteouts = False

    def _make_whiteout(self, dirfd: int, name: bytes) -> bool:
        """Create a char 0/0 whiteout NAME in DIRFD; False if mknod is refused (use .wh.)."""
        if self.mknod_whiteouts:
            try:
                _sys.mknod_at(dirfd, name, stat.S_IFCHR, 0)
                return True
            except PermissionError:
                self.mknod_whiteouts = False
                log.warning("upper refuses mknod: writing .wh. whiteouts instead")
        return False

    def _whiteout_name(self, udir: int, name: bytes) -> None:
        """Hide NAME (absent from the upper) from the lowers."""
        if not self._make_whiteout(udir, name):
            # O_NONBLOCK: a FIFO planted under the marker's name must not block the loop (its
            # open fails, ENXIO, and the request with it)
            flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK
            fd = _sys.open_at(udir, whiteout.WH_PREFIX + name, flags, 0o600)
            os.close(fd)

    def _replace_with_whiteout(self, udir: int, name: bytes) -> None:
        """Atomically turn upper object NAME into a whiteout; clean the old object away."""
        work = self.stack.work_fd
        tmp = self.copyup.tmp_name()
        if self._make_whiteout(work, tmp):
            _sys.renameat2(work, tmp, udir, name, _sys.RENAME_EXCHANGE)
            _sys.remove_tree_at(work, tmp)
        else:
            self._whiteout_name(udir, name)  # .wh.NAME first: NAME wins until it is gone
            _sys.renameat2(udir, name, work, tmp)
            _sys.remove_tree_at(work, tmp)

    def _clear_empty(self, udir: int, name: bytes) -> None:
        """Swap the upper directory NAME, empty in the merged view but maybe holding whiteouts,
        for an empty opaque copy of it, as ovl_clear_empty: a rename can then replace it in
        one step. Removing it first would show the lowers' entries until the rename."""
        if _sys.is_empty_dir_at(udir, name):
            return
        work = self.stack.work_fd
        tmp = self.copyup.tmp_name()
        st = _sys.lstat_at(udir, name)
        try:
            _sys.mkdir_at(work, tmp, 0o700)
            _sys.setxattr_at(work, tmp, self.names.opaque, b"y")
            copy_metadata(udir, name, st, work, tmp)
            _sys.renameat2(work, tmp, udir, name, _sys.RENAME_EXCHANGE)
        except BaseException:
            _sys.remove_tree_at(work, tmp)
            raise
        _sys.remove_tree_at(work, tmp)  # the old directory and its whiteouts

    def _place(
        self,
        udir: int,
        name: bytes,
        build: Callable[[int, bytes], None],
        *,
        one_step: bool = False,
        state: str | None = None,
    ) -> None:
        """Create NAME in upper dir UDIR with BUILD(dirfd, name).

        An object that takes several syscalls to finish (owner, mode, xattrs) is built in the
        workdir and renamed into place, so a crash never leaves it half made in the upper (a
        0600 root-owned file, say). Over a char whiteout the rename is an exchange
        (ovl_create_over_whiteout). A ONE_STEP build (a hard link) is made in place when no
        whiteout is in the way. STATE: the upper's state at NAME (_whiteout_state), if known.
        """
        if state is None:
            state = self._whiteout_state(udir, name)
        if state == "none" and one_step:
            build(udir, name)
            return
        self.stats["in_work"] += 1
        work = self.stack.work_fd
        tmp = self.copyup.tmp_name()
        build(work, tmp)
        try:
            if state == "char":
                _sys.renameat2(work, tmp, udir, name, _sys.RENAME_EXCHANGE)
                _sys.unlink_at(work, tmp)
            else:
                _sys.renameat2(work, tmp, udir, name, _sys.RENAME_NOREPLACE)
                if state == "oci":
                    _sys.unlink_at(udir, whiteout.WH_PREFIX + name)
        except BaseException:
            _sys.remove_tree_at(work, tmp)
            raise

    @staticmethod
    def _default_acl(parent: Node, udir: int) -> bytes | None:
        """The default ACL of PARENT, whose upper is UDIR; read once while it has none
        (Node.no_default_acl)."""
        if parent.no_default_acl:
            return None
        value = _sys.getxattr_at(udir, b"", acl.DEFAULT)
        if value is None:
            parent.no_default_acl = True
        return value

    def _as_made(self, caller: Caller, mode: int) -> bool:
        """Does an object of MODE that the daemon makes, in a directory without a default
        ACL, get the owner and mode _owner gives CALLER's, by itself? Then it is made in one
        call (_make_in_place). The uid is our fsuid; the gid our fsgid, or the directory's
        when it is setgid, which is _owner's too; a directory in a setgid parent gets S_ISGID
        as _owner gives it (inode_init_owner). Our umask must leave MODE whole, and setuid or
        setgid in MODE is left to the build (the kernel may strip setgid there,
        mode_strip_sgid, and mkdir drops both)."""
        return (
            caller.uid == self._euid
            and caller.gid == self._egid
            and not mode & (self._umask | stat.S_ISUID | stat.S_ISGID)
        )

    def _make_in_place(
        self, parent: Node, udir: int, name: bytes, make: Callable[[int, bytes], None]
    ) -> str | None:
        """Make NAME in upper directory UDIR by MAKE(udir, name), one call that gives the
        object its owner and mode (_as_made), in place as ovl_create_upper does: a crash
        leaves it whole or absent, so it needs no build in the workdir. None once made; when
        the upper has something at NAME (a char whiteout, or a name a race took: the create
        is exclusive), the upper's state there (_free_name: EEXIST when NAME is taken) to
        build over instead."""
        try:
            make(udir, name)
        except FileExistsError:
            return self._free_name(parent, udir, name)
        self.stats["in_place"] += 1
        return None

    @staticmethod
    def _owner(
        parent_st: os.stat_result, caller: Caller, is_dir: bool, mode: int
    ) -> tuple[int, int, int]:
        """uid, gid and mode of a new object: a setgid directory hands down its group."""
        gid = caller.gid
        if parent_st.st_mode & stat.S_ISGID:
            gid = parent_st.st_gid
            if is_dir:
                mode |= stat.S_ISGID
        elif is_dir:
            mode &= ~stat.S_ISGID
        return caller.uid, gid, mode

    def _finish_new(
        self, parent: Node, name: bytes, udir: int, st: os.stat_result | None = None
    ) -> tuple[Node, os.stat_result]:
        """The node of NAME, just placed in upper dir UDIR, and its lstat (ST, if known).

        What resolve() would find, without asking the layers again: the new object is upper
        and hides every lower (NAME was free in the merged view, so a lower shows it only
        under a whiteout, now replaced, or an opaque directory made over one), and nothing
        made it a metacopy or gave it a redirect.
        """
        parent.version += 1
        if st is None:
            st = _sys.lstat_at(udir, name)
        node = node_for(self.table, parent, name, Resolution(st, True, [], False))
        node.upper = True
        if stat.S_ISDIR(st.st_mode):
            self._made_here(node)
        return node, st

    async def _prepare_parent(self, parent: Node, name: bytes) -> tuple[int, str | None]:
        """Check that NAME is free in PARENT and bring PARENT up: its upper dir, and the
        upper's state at NAME (_whiteout_state) to create NAME over; None when the lowers
        and ``.wh.NAME`` show nothing and the upper's NAME is not looked at: an exclusive
        create in place finds out (_make_in_place), else _free_name."""
        self._writable()
        _sys.check_new_name(name)
        if not parent.upper:
            if resolve(self.stack, parent, name) is not None:
                raise OSError(errno.EEXIST, "exists")
            await self.copyup.copy_up(parent)
            # made by a copy-up in this mount (its upper did not exist: else the node is
            # upper), metadata only, so empty of whiteouts but what this mount wrote since
            self._made_here(parent)
        udir = self._upper_dir(parent)
        if lower_positive(self.stack, parent, name) or (
            not parent.no_oci_whiteouts and whiteout.has_oci_whiteout(udir, name)
        ):
            return udir, self._free_name(parent, udir, name)
        return udir, None

    def _free_name(self, parent: Node, udir: int, name: bytes) -> str:
        """The upper's state at NAME (as _whiteout_state) when NAME is free in PARENT, an
        upper directory (UDIR); EEXIST, or the error resolve() meets, when it is taken.

        The same answer as resolve() being None, with the upper asked once: resolve()'s
        upper part is these lstats; with nothing in the upper, the lowers show NAME exactly
        when lower_positive() says so (the first layer with an entry or a whiteout of it
        decides), and only then is resolve() asked for what it is, or what fails.
        """
        st = _sys.lstat_at_or_none(udir, name)
        if st is not None and whiteout.is_chardev_whiteout(st.st_mode, st.st_rdev):
            return "char"
        if st is None:
            if not parent.no_oci_whiteouts and whiteout.has_oci_whiteout(udir, name):
                return "oci"
            if not lower_positive(self.stack, parent, name):
                return "none"
        if resolve(self.stack, parent, name) is None:  # not reached: taken, or it raises
            return self._whiteout_state(udir, name)
        raise OSError(errno.EEXIST, "exists")

    # -- creation ----------------------------------------------------------------------------

    async def create(
        self, parent: Node, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[Node, os.stat_result, int]:
        """Create regular file NAME; return its node, its lstat and an fd opened O_RDWR."""
        # The kernel enforces the caller's access mode on its own file; ours stays O_RDWR.
        node, st, fd = await self.mknod(parent, name, stat.S_IFREG | stat.S_IMODE(mode), 0, caller)
        assert fd is not None  # mknod opens every regular file it makes
        return node, st, fd

    async def mkdir(
        self, parent: Node, name: bytes, mode: int, caller: Caller
    ) -> tuple[Node, os.stat_result]:
        udir, state = await self._prepare_parent(parent, name)
        mode = stat.S_IFDIR | stat.S_IMODE(mode)
        # The mode and ACLs come from the directory's default ACL, else the caller's umask
        # (posix_acl_create, acl.inherit). The kernel leaves both to us under FUSE_POSIX_ACL;
        # without it, it applied the umask already (applying it again changes nothing).
        default = self._default_acl(parent, udir)
        # in a merged parent, the kernel marks every new directory opaque (ovl_create_upper:
        # "just an optimization, allow to fail"), with redirect_dir=on only (measured: not
        # off/nofollow/follow, nor userxattr's default)
        merge_opaque = bool(parent.lowers) and self.redirect_dir
        if state is None and default is None:
            made = stat.S_IMODE(acl.plain_mode(mode, caller.umask))
            if self._as_made(caller, made):
                state = self._make_in_place(
                    parent, udir, name, lambda d, n: _sys.mkdir_at(d, n, made)
                )
                if state is None:
                    if merge_opaque:  # after the mkdir, as the kernel: NAME hides nothing
                        with contextlib.suppress(OSError):
                            _sys.setxattr_at(udir, name, self.names.opaque, b"y")
                    return self._finish_new(parent, name, udir)
        if state is None:
            state = self._free_name(parent, udir, name)
        acls = acl.inherit(default, mode, caller.umask)
        uid, gid, mode = self._owner(os.fstat(udir), caller, True, acls.mode)
        # Over a whiteout, what it hid must stay hidden
        opaque = state != "none" or merge_opaque

        def build(dirfd: int, n: bytes) -> None:
            _sys.mkdir_at(dirfd, n, 0o700)
            if opaque:
                _sys.setxattr_at(dirfd, n, self.names.opaque, b"y")
            _sys.chown_at(dirfd, n, uid, gid)
            os.chmod(n, stat.S_IMODE(mode), dir_fd=dirfd)
            _set_acls(dirfd, n, acls)

        self._place(udir, name, build, state=state)
        return self._finish_new(parent, name, udir)

    async def mknod(
        self, parent: Node, name: bytes, mode: int, rdev: int, caller: Caller
    ) -> tuple[Node, os.stat_result, int | None]:
        """Make NAME; return its node, its lstat and, for a regular file, a descriptor of it
        opened O_RDWR (the caller owns it).

        A regular file is made by open(O_CREAT|O_EXCL) rather than mknod, in as many calls:
        the descriptor can only be a new regular file of ours (never a device, a FIFO or a
        symlink planted at the name), so it may be used for the file's data without
        _sys.open_data's check, and the writes that follow a create need no open of their
        own (Files.keep_new)."""
        if stat.S_ISCHR(mode) and rdev == 0:
            # a 0/0 device is a whiteout: "don't allow creation of whiteout on overlay" (ovl_mknod)
            raise OSError(errno.EPERM, "a 0/0 character device is a whiteout")
        udir, state = await self._prepare_parent(parent, name)
        default = self._default_acl(parent, udir)  # as in mkdir
        fds: list[int] = []
        made = acl.plain_mode(mode, caller.umask)
        if state is None and default is None and self._as_made(caller, made):

            def make(dirfd: int, n: bytes) -> None:
                if stat.S_ISREG(made):
                    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
                    fds.append(_sys.open_at(dirfd, n, flags, stat.S_IMODE(made)))
                else:
                    _sys.mknod_at(dirfd, n, made, rdev)

            state = self._make_in_place(parent, udir, name, make)
            if state is None:
                try:
                    st = os.fstat(fds[0]) if fds else None
                    node, st = self._finish_new(parent, name, udir, st)
                except BaseException:
                    for fd in fds:
                        os.close(fd)
                    raise
                return node, st, fds[0] if fds else None
        if state is None:
            state = self._free_name(parent, udir, name)
        acls = acl.inherit(default, mode, caller.umask)
        uid, gid, mode = self._owner(os.fstat(udir), caller, False, acls.mode)

        def build(dirfd: int, n: bytes) -> None:
            if stat.S_ISREG(mode):
                fd = _sys.open_at(dirfd, n, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                fds.append(fd)
                os.fchown(fd, uid, gid)
                os.fchmod(fd, stat.S_IMODE(mode))
            else:
                _sys.mknod_at(dirfd, n, stat.S_IFMT(mode) | 0o600, rdev)
                _sys.chown_at(dirfd, n, uid, gid)
                os.chmod(n, stat.S_IMODE(mode), dir_fd=dirfd)
            _set_acls(dirfd, n, acls)

        try:
            self._place(udir, name, build, state=state)
            node, st = self._finish_new(parent, name, udir)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return node, st, fds[0] if fds else None

    async def symlink(
        self, parent: Node, name: bytes, target: bytes, caller: Caller
    ) -> tuple[Node, os.stat_result]:
        udir, state = await self._prepare_parent(parent, name)
        if state is None and self._as_made(caller, 0):  # symlinks take no mode, no ACL
            state = self._make_in_place(
                parent, udir, name, lambda d, n: _sys.symlink_at(target, d, n)
            )
            if state is None:
                return self._finish_new(parent, name, udir)
        if state is None:
            state = self._free_name(parent, udir, name)
        uid, gid, _ = self._owner(os.fstat(udir), caller, False, 0)

        def build(dirfd: int, n: bytes) -> None:
            _sys.symlink_at(target, dirfd, n)
            _sys.chown_at(dirfd, n, uid, gid)

        self._place(udir, name, build, state=state)
        return self._finish_new(parent, name, udir)

    async def link(self, node: Node, parent: Node, name: bytes) -> Node:
        if node.is_dir:
            raise OSError(errno.EPERM, "hard link to a directory")
        self._writable()
        _sys.check_new_name(name)
        while True:  # copy-ups first, the source's before the parent's as in ovl_link
            if not node.upper:
                await self.copyup.copy_up(node, meta=True)
            elif not parent.upper:
                await self.copyup.copy_up(parent)
            else:
                break
        if resolve(self.stack, parent, name) is not None:
            raise OSError(errno.EEXIST, "exists")
        src = node.path()
        if not src or not node.name:
            raise OSError(errno.ENOENT, "source is gone")
        # the new name must find a metacopy's data too: an absolute redirect on the inode, as
        # ovl_set_link_redirect
        self._set_redirect(node, False)
        if self.has_origin(node):
            set_impure(self._upper_dir(parent), self.names, parent)  # as ovl_create_or_link
        sdir = self._upper_dir_of(src)
        self._place(
            self._upper_dir(parent),
            name,
            lambda d, n: _sys.link_at(sdir, src[-1], d, n),
            one_step=True,
        )
        parent.version += 1
        res = resolve(self.stack, parent, name)
        assert res is not None
        return node_for(self.table, parent, name, res)

    def _upper_dir_of(self, path: tuple[bytes, ...]) -> int:
        assert self.stack.upper is not None
        return self.stack.upper.dirfd(path[:-1])

    # -- removal -----------------------------------------------------------------------------

    async def _settled(self, parent: Node, name: bytes) -> tuple[Resolution, Node]:
        """Resolve NAME once PARENT is in the upper and no copy-up of it is under way.

        Every await (copy-up, waiting for one) is followed by a fresh resolve, so the caller
        acts on what is true now: nothing awaits between this return and its changes.
        """
        while True:
            res, node = self._existing(parent, name)
            if not parent.upper:
                await self.copyup.copy_up(parent)
            elif self.copyup.locks.busy(node.key):
                await self.copyup.locks.wait_idle(node.key)
            else:
                return res, node

    def _forget_upper(self, res: Resolution) -> None:
        """The upper object RES named is gone: its inode number may be reused."""
        if res.upper and not res.is_dir and res.st.st_nlink <= 1:
            self.table.copied_up.pop(self.table.ident(res.st.st_dev, res.st.st_ino), None)

    async def unlink(self, parent: Node, name: bytes) -> Node:
        self._writable()
        res, node = await self._settled(parent, name)
        if res.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        udir = self._upper_dir(parent)
        with self.keeping_data(node, res.st.st_mode):
            if res.upper:
                if res.lower_positive:
                    self._replace_with_whiteout(udir, name)
                else:
                    _sys.unlink_at(udir, name)
                self._forget_upper(res)
            else:
                self._whiteout_name(udir, name)
            parent.version += 1
            drop_name(self.table, node, parent, name)
        return node

    def _check_rmdir(self, res: Resolution, node: Node) -> None:
        if not res.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if merged_names(self.stack, node):
            raise OSError(errno.ENOTEMPTY, "directory not empty")

    async def rmdir(self, parent: Node, name: bytes) -> Node:
        self._writable()
        # before any copy-up, as ovl_do_remove: an rmdir that fails leaves the upper as it was
        self._check_rmdir(*self._existing(parent, name))
        res, node = await self._settled(parent, name)
        self._check_rmdir(res, node)  # again: the copy-up awaited
        udir = self._upper_dir(parent)
        assert self.stack.upper is not None
        path = node.path()
        if res.upper:
            if res.lower_positive:
                self._replace_with_whiteout(udir, name)
            else:
                work = self.stack.work_fd
                tmp = self.copyup.tmp_name()
                _sys.renameat2(udir, name, work, tmp)  # it may still hold stale whiteouts
                _sys.remove_tree_at(work, tmp)
        else:
            self._whiteout_name(udir, name)
        self.stack.upper.forget_prefix(path)
        parent.version += 1
        drop_name(self.table, node, parent, name)
        return node

    # -- rename ------------------------------------------------------------------------------

    async def rename(self, p1: Node, n1: bytes, p2: Node, n2: bytes, flags: int) -> Node | None:
        """Rename; return the node that NAME2 named before, if it was replaced."""
        if flags & ~(_sys.RENAME_EXCHANGE | _sys.RENAME_NOREPLACE):
            raise OSError(errno.EINVAL, "unsupported rename flags")  # RENAME_WHITEOUT (ovl_rename)
        self._writable()
        assert self.stack.upper is not None
        _sys.check_new_name(n2)
        exchange = bool(flags & _sys.RENAME_EXCHANGE)
        while True:  # copy-ups and waits first; then, with no await left, check and act
            src_res, src = self._existing(p1, n1)
            dst_res = resolve(self.stack, p2, n2)
            dst = node_for(self.table, p2, n2, dst_res) if dst_res is not None else None
            if dst is src:
                return None
            self._check_rename(src_res, src, dst_res, dst, p2, flags)
            # in ovl_rename's order: the source (its parents first), the target's parent, an
            # exchanged target; a copy-up that fails (a device in a user namespace) leaves the
            # later ones undone
            todo = [n for n in (src, p2, dst if exchange else None) if n and not n.upper]
            busy = [n.key for n in (src, dst) if n and self.copyup.locks.busy(n.key)]
            if todo:
                await self.copyup.copy_up(todo[0], meta=True)
            elif busy:
                await self.copyup.locks.wait_idle(busy[0])
            else:
                break
        d1, d2 = self._upper_dir(p1), self._upper_dir(p2)
        old_path = src.path()

        if exchange:
            assert dst is not None and dst_res is not None
            self._set_redirect(src, p1 is p2)
            self._set_redirect(dst, p1 is p2)
            self._mark_impure(p1, p2, src, dst, d1, d2)
            # each side is a pure upper dir landing on a name the lowers hold, maybe: as in a
            # plain rename, it must hide them (else it merges them, and shares the lower
            # origin and node of the redirected directory it changes places with)
            self._hide_lowers_at(src, d1, n1, p2)
            self._hide_lowers_at(dst, d2, n2, p1)
            _sys.renameat2(d1, n1, d2, n2, _sys.RENAME_EXCHANGE)
            self.stack.upper.forget_prefix(old_path)
            self.stack.upper.forget_prefix(dst.path())
            _swap_names(src, p1, n1, dst, p2, n2)
            p1.version += 1
            p2.version += 1
            return None

        keep = (
            self.keeping_data(dst, dst_res.st.st_mode)
            if dst is not None and dst_res is not None and not dst_res.is_dir
            else contextlib.nullcontext()
        )
        with keep:
            self._set_redirect(src, p1 is p2)
            self._mark_impure(p1, p2, src, None, d1, d2)
            self._hide_lowers_at(src, d1, n1, p2)
            # Every step below leaves a valid tree on disk: the rename is one call, and what
            # prepares or cleans up around it changes nothing the merged view shows.
            if dst_res is not None and dst_res.upper and dst_res.is_dir:
                assert dst is not None
                if not self._pure_upper_dir(dst):
                    # an empty merged target may still hold whiteouts (ovl_clear_empty); a pure
                    # upper one is left to the rename, which refuses it if not empty
                    self._clear_empty(d2, n2)
            state = self._whiteout_state(d2, n2) if dst_res is None or not dst_res.upper else "none"
            need_whiteout = src_res.lower_positive
            flags = 0
            cleanup = False
            if state == "char":
                # ovl_rename: the source changes places with the whiteout, which then hides
                # the lowers' N1, or is removed when nothing below has N1 (a directory cannot
                # replace a char device; removing the whiteout first would show the lowers)
                flags = _sys.RENAME_EXCHANGE
                cleanup = not need_whiteout
                need_whiteout = False
            elif need_whiteout and not self.mknod_whiteouts:
                self._whiteout_name(d1, n1)  # .wh.N1 beside N1: the name still wins
                need_whiteout = False
            if need_whiteout:
                try:
                    _sys.renameat2(d1, n1, d2, n2, _sys.RENAME_WHITEOUT)
                    need_whiteout = False
                except OSError as e:
                    # refused (a pure upper target not empty), it may still have changed P1's
                    # upper: ext4 puts N1's entry back, which sets its mtime. The kernel drops
                    # cached attributes after a rename that succeeded only, and kernel
                    # overlayfs shows the upper's (ovl_getattr): drop P1's
                    self.copyup.changed.append(p1.id)
                    if e.errno not in (errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP):
                        raise
                    # an upper without RENAME_WHITEOUT: two steps, the lowers' N1 shows between
                    _sys.renameat2(d1, n1, d2, n2)
            else:
                _sys.renameat2(d1, n1, d2, n2, flags)
            if cleanup:
                _sys.unlink_at(d1, n1)
            elif need_whiteout:
                self._whiteout_name(d1, n1)
            if state == "oci":
                _sys.unlink_at(d2, whiteout.WH_PREFIX + n2)  # after: until then N2 wins
            self.stack.upper.forget_prefix(old_path)
            if dst is not None:
                self.stack.upper.forget_prefix(dst.path())
                if dst_res is not None:
                    self._forget_upper(dst_res)
                drop_name(self.table, dst, p2, n2)
            move_name(src, p1, n1, p2, n2)
            p1.version += 1
            p2.version += 1
        return dst

    def _hide_lowers_at(self, node: Node, udir: int, name: bytes, p2: Node) -> None:
        """NODE, NAME in upper dir UDIR, moves into P2: a pure upper directory moving into a
        merged directory turns opaque (ovl_rename: ovl_type_merge(new->d_parent), whatever the
        redirect_dir mode), whether or not the lowers hold its new name."""
        if node.is_dir and not node.lowers and p2.lowers:
            _sys.setxattr_at(udir, name, self.names.opaque, b"y")

    def _check_rename(
        self,
        src_res: Resolution,
        src: Node,
        dst_res: Resolution | None,
        dst: Node | None,
        p2: Node,
        flags: int,
    ) -> None:
        """Refuse a rename the way rename(2) does (on overlayfs)."""
        exchange = bool(flags & _sys.RENAME_EXCHANGE)
        if flags & _sys.RENAME_NOREPLACE and dst_res is not None:
            raise OSError(errno.EEXIST, "target exists")
        if exchange and dst_res is None:
            raise OSError(errno.ENOENT, "nothing to exchange with")
        # In the kernel's order: the VFS' checks (do_renameat2, may_delete), then ovl_rename's
        # EXDEV, and only then the target's emptiness (ovl_check_empty_dir, or the upper's).
        if src_res.is_dir and _is_ancestor(src, p2):
            raise OSError(errno.EINVAL, "cannot move a directory into itself")
        if dst_res is not None and not exchange:
            if src_res.is_dir and not dst_res.is_dir:
                raise OSError(errno.ENOTDIR, "target is not a directory")
            if not src_res.is_dir and dst_res.is_dir:
                raise OSError(errno.EISDIR, "target is a directory")
        if not self.redirect_dir and src_res.is_dir and src.lowers:
            raise OSError(errno.EXDEV, "lower directory rename needs redirect_dir")
        if not self.redirect_dir and exchange and dst is not None and dst.is_dir and dst.lowers:
            # the exchange moves the target too (ovl_rename: !ovl_can_move(new))
            raise OSError(errno.EXDEV, "lower directory rename needs redirect_dir")
        replaced_dir = dst_res is not None and not exchange and dst_res.is_dir
        if (
            replaced_dir
            and dst is not None
            and not self._pure_upper_dir(dst)
            and merged_names(self.stack, dst)
        ):
            raise OSError(errno.ENOTEMPTY, "target directory not empty")
        # a pure upper target is not looked at: the upper's rename refuses it if it is not
        # empty, after the copy-ups, as ovl_rename leaves it (!ovl_pure_upper(new))

    def _pure_upper_dir(self, node: Node) -> bool:
        """An upper directory with no lowers that never had any (no origin: the kernel's
        !OVL_WHITEOUTS), so that it holds no whiteouts to clear."""
        path = node.path()
        if not node.upper or node.lowers or not path:
            return False
        udir = self._upper_dir_of(path)
        return not any(_sys.getxattr_at(udir, path[-1], a) is not None for a in xattrs.ORIGIN)

    def _mark_impure(
        self, p1: Node, p2: Node, src: Node, dst: Node | None, d1: int, d2: int
    ) -> None:
        """An entry with an origin moving to another parent makes that parent impure (in an
        exchange, both ways), as ovl_rename does once the redirects are set."""
        if p1 is p2:
            return
        if self.has_origin(src):
            set_impure(d2, self.names, p2)
        if dst is not None and self.has_origin(dst):
            set_impure(d1, self.names, p1)

    def has_origin(self, node: Node) -> bool:
        """Does NODE show a lower object's st_ino (ovl_type_origin)? A directory that merges
        lowers, a copied-up object; after a remount an upper file with an origin recorded.
        Not a file whose copy-up broke a lower hard link: it shows its own st_ino, and the
        kernel's inode is not hashed by the lower (ovl_hash_bylower: no OVL_CONST_INO)."""
        if node.lowers:
            return node.is_dir or node.origin is not None
        if node.origin is not None and not node.is_dir:
            # copied up in this mount, forgotten by the kernel and found again: it shows its
            # origin's st_ino still (InodeTable.copied_up), as the kernel's inode hashed by
            # its lower does while cached, whose moves mark the new parent impure, also with
            # userxattr, where the upper's empty overlay.origin says nothing
            return True
        path = node.path()
        if node.is_dir or not node.upper or not path:
            return False
        udir = self._upper_dir_of(path)
        return any(_sys.getxattr_at(udir, path[-1], a) for a in xattrs.ORIGIN)

    def _set_redirect(self, node: Node, samedir: bool) -> None:
        """Point a moved directory or metacopy file at its lower part, as ovl_set_redirect does.

        Within one parent (SAMEDIR) the redirect is the old name (relative); across parents it
        is the absolute path of the lower directory or data, and always for a file whose lower
        is a hard link (ovl_need_absolute_redirect: its names may end up in several dirs). An
        object without lowers needs none.
        """
        if not (node.is_dir or node.metacopy) or not node.lowers:
            return
        path = node.path()
        udir = self._upper_dir_of(path)
        existing = whiteout.redirect_of(udir, path[-1])
        if existing and (samedir or existing.startswith(b"/")):
            return
        if samedir and not node.is_dir:
            layer, lpath = node.lowers[0]
            samedir = _sys.lstat_at(*layer.locate(lpath)).st_nlink == 1
        value = path[-1] if samedir else self._absolute_redirect(node)
        try:
            _sys.setxattr_at(udir, path[-1], self.names.redirect, value)
        except OSError as e:
            # as ovl_set_redirect: any failure is EXDEV, so that mv copies instead
            raise OSError(errno.EXDEV, f"cannot set redirect: {e.strerror}") from None

    def _absolute_redirect(self, node: Node) -> bytes:
        """The absolute redirect of NODE, as ovl_get_redirect builds it: its merged path, with
        each ancestor's own redirect (read from the upper) standing for the ancestor's name, up
        to the first absolute one. Longer than REDIRECT_MAX: EXDEV (mv copies instead)."""
        assert self.stack.upper is not None
        parts: list[bytes] = []
        n: Node | None = node
        while n is not None and n.parent is not None:
            part = n.name
            if n.upper:
                part = whiteout.redirect_of(*self.stack.upper.locate(n.path())) or part
            parts.append(part)
            if part.startswith(b"/"):
                break
            n = n.parent
        value = b"/".join(reversed(parts))
        if not value.startswith(b"/"):
            value = b"/" + value
        if len(value) > REDIRECT_MAX:
            raise OSError(errno.EXDEV, "redirect longer than redirect_max")
        return value


def _set_acls(dirfd: int, name: bytes, acls: acl.NewAcls) -> None:
    """Give NAME the ACLs it inherited (after its mode: the access ACL matches it)."""
    if acls.access is not None:
        _sys.setxattr_at(dirfd, name, acl.ACCESS, acls.access)
    if acls.default is not None:
        _sys.setxattr_at(dirfd, name, acl.DEFAULT, acls.default)


def _is_ancestor(node: Node, other: Node) -> bool:
    n: Node | None = other
    while n is not None:
        if n is node:
            return True
        n = n.parent
    return False


def _no_keep(node: Node, mode: int) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


def drop_name(table: InodeTable, node: Node, parent: Node, name: bytes) -> None:
    """Forget that NAME in PARENT names NODE (unlink, or replaced by a rename).

    A node that loses its last name leaves the identity map (its real inode number may be
    reused by a new file) and lives on by node id while the kernel or a handle holds it.
    """
    if node.aliases:
        node.aliases = [a for a in node.aliases if a != (parent, name)]
        if node.aliases and (node.parent, node.name) == (parent, name):
            node.rename(*node.aliases[0])
        if len(node.aliases) <= 1:
            node.aliases = None
        if node.aliases is None and (node.parent, node.name) != (parent, name):
            return
    if (node.parent, node.name) == (parent, name):
        node.rename(node.parent, b"")  # unlinked: reachable only through open handles now
        table.unhash(node)


def move_name(node: Node, p1: Node, n1: bytes, p2: Node, n2: bytes) -> None:
    if node.aliases:
        node.aliases = [(p2, n2) if a == (p1, n1) else a for a in node.aliases]
    if (node.parent, node.name) == (p1, n1) or node.is_dir:
        node.rename(p2, n2)


def _swap_names(a: Node, p1: Node, n1: bytes, b: Node, p2: Node, n2: bytes) -> None:
    move_name(a, p1, n1, p2, n2)
    move_name(b, p2, n2, p1, n1)

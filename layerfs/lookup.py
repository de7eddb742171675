"""Resolve one name in a merged directory to its real objects across the layers.

A name resolves to the topmost layer that has it; a whiteout hides it and everything below; a
directory merges with same-named directories below it until one is opaque; a non-directory
hides everything below it (and a directory hides a non-directory below). A renamed directory
carries a redirect to where its lower part lives (kernel ``redirect_dir``), followed in the
upper and in lowers that were uppers once, and stopped where the merge would stop. An
upper file marked metacopy holds metadata only: its data is the lower file at the same name or
at its redirect (kernel ``metacopy``).

Kernel analogue: fs/overlayfs/namei.c (ovl_lookup, ovl_lookup_layer, ovl_lower_positive).
Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from layerfs import _sys, whiteout, xattrs
from layerfs.errors import MetacopySizeError
from layerfs.inodes import InodeTable, Key, Node
from layerfs.layers import INDEX_MIN_LAYERS, Layer, LayerStack, Path

log = logging.getLogger(__name__)


class Resolution:
    """Where a merged name lives: the top real object and what lies below it.

    st: lstat of the top real object; upper: the top object is in the upper; lowers: the
    merged lower dirs (dir), or a non-directory's lower metacopy files, if any, then its data,
    topmost first (lowers[0]: its origin; lowers[-1]: its data); lower_positive: some lower
    shows this name, so removing it needs a whiteout; origin: the lstat of the first lower
    object (its nlink: hard links break on copy-up); metacopy: the upper file's data is in the
    lowers; in_layer: the layer of a non-directory's lower found under its own name in the
    parent's lowers (a new Node keeps just that, see Node); fix_origin: an upper directory
    that merges lowers but records no origin, which the kernel's lookup records, marking the
    parent impure (ovl_fix_origin: Overlay.fix_origin does it).
    """

    __slots__ = (
        "fix_origin",
        "in_layer",
        "lower_positive",
        "lowers",
        "metacopy",
        "origin",
        "st",
        "upper",
    )

    def __init__(
        self,
        st: os.stat_result,
        upper: bool,
        lowers: list[tuple[Layer, Path]],
        lower_positive: bool,
        origin: os.stat_result | None = None,
        metacopy: bool = False,
        in_layer: Layer | None = None,
    ) -> None:
        self.in_layer = in_layer
        self.fix_origin = False
        self.metacopy = metacopy
        self.st = st
        self.upper = upper
        self.lowers = lowers
        self.lower_positive = lower_positive
        self.origin = origin

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


def upper_dir_flags(fd: int, name: bytes) -> tuple[bool, bytes | None, bool]:
    """Return (opaque, redirect, has an origin) of upper directory NAME with one listxattr in
    the common case."""
    names = set(_sys.listxattr_at(fd, name))
    origin = not names.isdisjoint(xattrs.ORIGIN)
    opaque = False
    for attr in xattrs.OPAQUE:
        if attr in names:
            value = _sys.getxattr_at(fd, name, attr)
            opaque = opaque or (value is not None and value.startswith(b"y"))
    redirect = _listed_redirect(fd, name, names)
    if not opaque:
        # fuse-overlayfs marks opaque upper dirs with a visible .wh..wh..opq file as well
        try:
            child = _sys.open_dir_at(fd, name)
        except OSError:
            return opaque, redirect, origin
        try:
            opaque = _sys.lstat_at_or_none(child, whiteout.OPQ_MARKER) is not None
        finally:
            os.close(child)
    return opaque, redirect, origin


class _Lookup:
    """The name being looked up through the lowers and whether to go on (ovl_lookup_data).

    NAME is one name in the parent's lower directories, or (ABSOLUTE) a path from each lower
    layer's root: a redirect found on the way rewrites it for the layers below.
    """

    __slots__ = ("absolute", "name", "stop")

    def __init__(self, name: bytes, stop: bool) -> None:
        self.name: tuple[bytes, ...] = (name,)
        self.absolute = False
        self.stop = stop

    def redirect(self, value: bytes, pos: int) -> None:
        """Apply a redirect found on component POS of the name (ovl_check_redirect).

        The value is read as the kernel reads it (ovl_get_redirect_xattr): a C string, so it
        ends at its first NUL; an absolute one with an empty component (``/``, ``/a//b``) or
        a relative one with a ``/`` is invalid (EINVAL); a component the lookup refuses
        (``.``, ``..``) fails it with EACCES (lookup_one_len) when the walk meets it: an
        absolute redirect's walk stops at a non-directory or a missing name first."""
        value = value.split(b"\0", 1)[0]
        if value.startswith(b"/"):
            parts = tuple(value[1:].split(b"/"))
            if b"" in parts:
                raise OSError(errno.EINVAL, "invalid overlay.redirect")
            for part in parts:
                if part not in _DOTS:  # those at the walk (_lookup_layer)
                    _valid_redirect_part(part)
            self.name = parts + self.name[pos + 1 :]
            self.absolute = True
            # an absolute redirect below an opaque ancestor of the walk goes on below it
            self.stop = False
        else:
            if b"/" in value:
                raise OSError(errno.EINVAL, "invalid overlay.redirect")
            _valid_redirect_part(value)
            self.name = (*self.name[:pos], value, *self.name[pos + 1 :])


def _lookup_layer(layer: Layer, base: Path, d: _Lookup, bottom: bool) -> tuple[Path, bool] | None:
    """Look D's name up in LAYER from BASE, one component at a time (ovl_lookup_layer).

    Returns (path, is_dir) of what the last component names, or None. On the way: a whiteout
    or a non-directory stops the lookup in the layers below; an opaque directory stops it too
    (once this layer's walk is done); a directory's redirect rewrites the name for the layers
    below. The bottom layer's directories are not asked (nothing lies below them).
    """
    path = base
    rem = len(d.name) - 1  # components after the current one: counted from the end, since a
    while True:  # redirect may rewrite the components before them
        pos = len(d.name) - 1 - rem
        comp = d.name[pos]
        if comp in _DOTS:  # an absolute redirect's, met by the walk (lookup_one_len)
            raise OSError(errno.EACCES, "invalid overlay.redirect")
        listing = layer.listing(path)
        is_dir = listing.entries.get(comp)
        if is_dir is None:
            if comp in listing.whiteouts:
                d.stop = True
            return None
        path = (*path, comp)
        if not is_dir:
            d.stop = True  # resolve() goes on below a lower metacopy file
            return (path, False) if rem == 0 else None
        if not bottom:
            child = layer.listing(path)
            if child.opaque:
                d.stop = True
            elif child.redirect is not None:
                d.redirect(child.redirect, pos)
        if rem == 0:
            return path, True
        rem -= 1


def resolve(
    stack: LayerStack, parent: Node, name: bytes, *, unseen: bool = False
) -> Resolution | None:
    """Resolve NAME in the merged directory PARENT; None when the name does not exist.
    UNSEEN: a LOOKUP, a name the kernel holds no dentry of (see below)."""
    if name.startswith(whiteout.WH_PREFIX):
        return None  # format markers are never entries of the merged view
    if parent.missed and not (parent.upper and stack.upper is not None):
        # the lowers alone (below): a name the index holds as no layer's entry first (none
        # has it, or a whiteout hides it) is missing, said without building the walk
        below = parent.lowers
        if len(below) > 1 and stack.indexes.first(below).get(name, -1) < 0:
            return None
    upper_st: os.stat_result | None = None
    d = _Lookup(name, False)
    redirected = metacopy = chain = False
    has_origin = True
    if parent.upper and stack.upper is not None:
        ufd = stack.upper.dirfd(parent.path())
        # Every name in a directory this mount made (Node.no_oci_whiteouts) came through the
        # kernel, which keeps its dentry: a LOOKUP there is mostly of a new name (a create's
        # first look). An access(F_OK) answers that in a third of a failing lstat's
        # instructions (no exception raised, no stat built); a name found is lstat'ed after.
        # Not for the namespace changes' own resolves: theirs name what exists (an unlink).
        if unseen and parent.no_oci_whiteouts and not _sys.exists_at(ufd, name):
            st = None
        else:
            st = _sys.lstat_at_or_none(ufd, name)
        if st is not None:
            if whiteout.is_chardev_whiteout(st.st_mode, st.st_rdev):
                return None
            upper_st = st
            if stat.S_ISDIR(st.st_mode):
                opaque, redirect, has_origin = upper_dir_flags(ufd, name)
                if opaque:
                    d.stop = True
                elif redirect:
                    d.redirect(redirect, 0)
                    redirected = True
            elif stat.S_ISREG(st.st_mode):  # an empty file may be a metacopy too
                metacopy, redirect = upper_file_flags(ufd, name)
                if metacopy and not stack.metacopy:
                    # the kernel's "refusing to follow metacopy origin": an upper's mark may
                    # not make another file's data readable on a mount that never wrote one
                    raise OSError(errno.EPERM, "metacopy upper file on a metacopy=off mount")
                if metacopy and redirect:
                    d.redirect(redirect, 0)
                    redirected = True
        elif not parent.no_oci_whiteouts and whiteout.has_oci_whiteout(ufd, name):
            return None  # .wh.NAME whiteout, as fuse-overlayfs writes where mknod is refused

    lowers: list[tuple[Layer, Path]] = []
    positive = False
    origin: os.stat_result | None = None
    in_layer: Layer | None = None
    top_st = upper_st
    search: list[tuple[Layer, Path]] = _root_lowers(stack) if d.absolute else parent.lowers
    i = 0
    # The index answers a name no lower shows with one dict lookup. Worth building for many
    # lowers, or where names were missing already (Node.missed): one lower's listing is
    # already that dict.
    if (
        not d.stop
        and not d.absolute
        and len(search) > 1
        and (parent.missed or len(search) >= INDEX_MIN_LAYERS)
    ):
        i = stack.indexes.first(search).get(d.name[0], -1)  # before it: no entry, no whiteout
        if i < 0:
            i = len(search)
    bottom = stack.lowers[-1] if stack.lowers else None
    need_data = metacopy  # a metacopy found whose data is still to find below it
    data_st: os.stat_result | None = None
    while not d.stop and i < len(search):
        layer, dpath = search[i]
        i += 1
        renamed = redirected or d.name != (name,)
        found = _lookup_layer(layer, () if d.absolute else dpath, d, layer is bottom)
        if found is None:
            continue
        child, is_dir = found
        positive = True
        if upper_st is not None and not stat.S_ISDIR(upper_st.st_mode) and not metacopy:
            break  # an upper non-dir: the lowers only tell whether a whiteout is needed
        if not is_dir:
            if top_st is None or need_data:
                lst = _sys.lstat_at(*layer.locate(child))
                if need_data and not stat.S_ISREG(lst.st_mode):
                    break  # a metacopy's data is a regular file, never a device or FIFO
                data_st = lst
                top_st = top_st or lst
                origin = origin or lst
                lowers.append((layer, child))
                in_layer = None if renamed or chain else layer
                need_data = False
                if stack.metacopy and stat.S_ISREG(lst.st_mode):
                    # a lower's metacopy file (an upper restacked as a lower): its metadata
                    # is the file's, its data lies further down, as ovl_lookup follows it
                    lmeta, lredirect = upper_file_flags(*layer.locate(child))
                    if lmeta:
                        chain = need_data = True
                        in_layer = None
                        d.stop = False
                        if lredirect:
                            d.redirect(lredirect, len(d.name) - 1)
                            if d.absolute and search is not _root_lowers(stack):
                                search = _root_lowers(stack)
                                i = stack.lowers.index(layer) + 1
                        continue
            break  # a non-directory ends the merge (and hides nothing above it)
        if need_data:
            break  # a directory cannot hold a file's data: no data found (EIO below)
        if origin is None:
            origin = _sys.lstat_at(*layer.locate(child))
            top_st = top_st or origin
        lowers.append((layer, child))
        if d.absolute and search is not _root_lowers(stack):
            # the rest of the merge is found from the root, below this layer
            search = _root_lowers(stack)
            i = stack.lowers.index(layer) + 1
    if top_st is None:
        if unseen:
            parent.missed = True
        return None
    if upper_st is not None and (redirected or d.stop):
        # whether removing NAME needs a whiteout depends on NAME in the parent's lowers, not
        # on where (or whether) the directory's own merge continues
        positive = lower_positive(stack, parent, name)
    if need_data:
        # ovl_lookup: "metacopy with no lower data found - abort lookup"
        log.warning("metacopy file %s has no lower data", os.fsdecode(name))
        raise OSError(errno.EIO, "metacopy file without lower data")
    if (
        metacopy
        and upper_st is not None
        and data_st is not None
        and data_st.st_size != upper_st.st_size
    ):
        raise MetacopySizeError(errno.EIO, "metacopy file and its data differ in size")
    res = Resolution(
        top_st,
        upper_st is not None,
        lowers,
        positive,
        origin,
        metacopy and bool(lowers),
        in_layer,
    )
    if not has_origin and lowers:  # has_origin: read for an upper directory only
        res.fix_origin = True
    return res


def _root_lowers(stack: LayerStack) -> list[tuple[Layer, Path]]:
    """Every lower layer's root, topmost first: where an absolute redirect is looked up."""
    roots = stack.root_lowers
    if roots is None:
        roots = stack.root_lowers = [(layer, ()) for layer in stack.lowers]
    return roots


def upper_file_flags(fd: int, name: bytes) -> tuple[bool, bytes | None]:
    """(metacopy, redirect) of upper regular file NAME: is its data in a lower, and where.

    One listxattr, not a getxattr per name: most upper files have no xattrs at all.
    """
    names = set(_sys.listxattr_at(fd, name))
    if xattrs.METACOPY_SET.isdisjoint(names):
        return False, None
    for attr in xattrs.METACOPY_SET & names:
        value = _sys.getxattr_at(fd, name, attr)
        if value and not _valid_metacopy(value):
            raise OSError(errno.EIO, "invalid overlay.metacopy in the upper")
    return True, _listed_redirect(fd, name, names)


def _valid_metacopy(value: bytes) -> bool:
    """A non-empty metacopy value shorter than a struct ovl_metacopy's 4-byte header fails
    the lookup (EIO). The lookup reads the value's size alone (ovl_check_metacopy_xattr with
    no buffer): its version and length matter to a verity digest only, which layerfs does not
    check (measured on 6.18: ``/a/x`` and a 100-byte value serve the lower's data)."""
    return len(value) >= 4


def _listed_redirect(fd: int, name: bytes, names: set[bytes]) -> bytes | None:
    """The redirect of NAME, whose xattr names (listxattr) are NAMES."""
    for attr in xattrs.REDIRECT:
        if attr in names:
            value = _sys.getxattr_at(fd, name, attr)
            if value == b"":  # ovl_get_redirect_xattr: "invalid redirect"
                raise OSError(errno.EINVAL, "empty overlay.redirect in the upper")
            return value
    return None


_DOTS = (b".", b"..")


def _valid_redirect_part(part: bytes) -> None:
    """EACCES for a component lookup_one_len refuses; a name longer than NAME_MAX passes:
    the layer's lookup answers ENAMETOOLONG, which ovl_lookup_single takes for "not here"
    (a 2000-byte relative redirect: the upper directory alone, not EACCES; seed 4097)."""
    try:
        _sys.check_name(part)
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise OSError(errno.EACCES, "invalid overlay.redirect in the upper") from None


def lower_positive(stack: LayerStack, parent: Node, name: bytes) -> bool:
    """True if some lower layer below PARENT shows NAME (so removing it needs a whiteout)."""
    for layer, dpath in parent.lowers:
        listing = layer.listing(dpath)
        if name in listing.entries:
            return True
        if name in listing.whiteouts:
            return False
    return False


def _is_under(node: Node | None, ancestor: Node) -> bool:
    while node is not None:
        if node is ancestor:
            return True
        node = node.parent
    return False


def _either(origin: Key | None, real: Key) -> Key:
    """ORIGIN or REAL: the object itself, which the node keeps as its key and its origin.
    ``origin or real`` in node_for, compiled by mypyc, would unbox the int and box another."""
    return origin or real


def node_for(table: InodeTable, parent: Node, name: bytes, res: Resolution) -> Node:
    """Return the Node for the object RES found as NAME in PARENT, creating it on first sight.

    A known node is refreshed (it may have been copied up, or renamed by us); a second name of
    an upper hard link becomes an alias of the same node. See inodes.py for identities.
    """
    real = table.ident(res.st.st_dev, res.st.st_ino)
    key: Key
    origin = None if res.origin is None else table.ident(res.origin.st_dev, res.origin.st_ino)
    one_link = res.origin is None or res.origin.st_nlink == 1
    if res.is_dir:
        key = _either(origin, real)
    elif res.upper:
        # a metacopy found after a remount shows its lower's st_ino, as a fresh copy-up does
        fallback = origin if res.metacopy and one_link else None
        key, origin = table.copied_up.get(real, (real, fallback))
    elif not one_link and table.writable:
        key = (real, parent.id, name)  # one node per name (index=off)
    else:
        key = _either(origin, real)  # one int object for both: most nodes are lower files
    node = table.find(key)
    if node is None:
        node = Node(key, res.is_dir, parent, name, res.upper, res.in_layer or res.lowers, origin)
        node.metacopy = res.metacopy
        return table.add(node)
    if node.parent is not parent or node.name != name:
        if node.is_dir and (node.upper or res.upper):
            # Two names of one lower directory, one of them (at least) with an upper part: a
            # redirect to a directory another name shows too. The kernel hashes both by the
            # lower and refuses the second while the first is cached (ovl_verify_inode:
            # "lookup of an uncovered redirect origin", or another upper): so does layerfs,
            # where moving the node would show the first name's upper under the second.
            raise OSError(errno.ESTALE, "a second name of a redirected directory")
        if node.is_dir and _is_under(parent, node):
            # Two merged directories with one lower origin (redirects can do that), one found
            # inside the other: moving the node would make it its own ancestor, and every
            # path() after would loop. The kernel refuses the second too (ovl_verify_inode).
            raise OSError(errno.ESTALE, "directory found under itself")
        if node.is_dir or not node.name:
            node.rename(parent, name)
        else:
            aliases = node.aliases
            if aliases is None:
                aliases = [(node.parent, node.name)] if node.parent is not None else []
            if (parent, name) not in aliases:
                aliases.append((parent, name))
            node.aliases = aliases
    node.upper = node.upper or res.upper
    if not node.lowers and res.lowers:
        node.lowers = res.lowers
    if res.upper and not res.is_dir:
        node.metacopy = res.metacopy
    return node

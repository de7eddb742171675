"""Resolve one name in a merged directory to its real objects across the layers.

A name resolves to the topmost layer that has it; a whiteout hides it and everything below; a
directory merges with same-named directories below it until one is opaque; a non-directory
hides everything below it (and a directory hides a non-directory below). An upper directory
renamed by us carries a redirect to where its lower part lives (kernel ``redirect_dir``). An
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
from layerfs.inodes import InodeTable, Key, Node
from layerfs.layers import INDEX_MIN_LAYERS, Layer, LayerStack, Path

log = logging.getLogger(__name__)


class Resolution:
    """Where a merged name lives: the top real object and what lies below it.

    st: lstat of the top real object; upper: the top object is in the upper; lowers: the
    origin (non-dir) or the merged lower dirs (dir); lower_positive: some lower shows this
    name, so removing it needs a whiteout; origin: the lstat of the first lower object (its
    nlink: hard links break on copy-up); metacopy: the upper
    file's data is lowers[0]; in_layer: the layer of a non-directory's lower found under its
    own name in the parent's lowers (a new Node keeps just that, see Node).
    """

    __slots__ = (
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
        self.metacopy = metacopy
        self.st = st
        self.upper = upper
        self.lowers = lowers
        self.lower_positive = lower_positive
        self.origin = origin

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


def upper_dir_flags(fd: int, name: bytes) -> tuple[bool, bytes | None]:
    """Return (opaque, redirect) of upper directory NAME with one listxattr in the common case."""
    names = set(_sys.listxattr_at(fd, name))
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
            return opaque, redirect
        try:
            opaque = _sys.lstat_at_or_none(child, whiteout.OPQ_MARKER) is not None
        finally:
            os.close(child)
    return opaque, redirect


def resolve(stack: LayerStack, parent: Node, name: bytes) -> Resolution | None:
    """Resolve NAME in the merged directory PARENT; None when the name does not exist."""
    if name.startswith(whiteout.WH_PREFIX):
        return None  # format markers are never entries of the merged view
    ppath = parent.path()
    upper_st: os.stat_result | None = None
    search: list[tuple[Layer, Path]] = parent.lowers
    lname = name
    stop_lowers = redirected = metacopy = False
    if parent.upper and stack.upper is not None:
        ufd = stack.upper.dirfd(ppath)
        st = _sys.lstat_at_or_none(ufd, name)
        if st is not None:
            if whiteout.is_chardev_whiteout(st.st_mode, st.st_rdev):
                return None
            upper_st = st
            if stat.S_ISDIR(st.st_mode):
                opaque, redirect = upper_dir_flags(ufd, name)
                if opaque:
                    stop_lowers = True
                elif redirect:
                    search, lname = _redirected(stack, parent, redirect)
                    redirected = True
            elif stat.S_ISREG(st.st_mode):  # an empty file may be a metacopy too
                metacopy, redirect = upper_file_flags(ufd, name)
                if metacopy and redirect:
                    search, lname = _redirected(stack, parent, redirect)
                    redirected = True
        elif whiteout.has_oci_whiteout(ufd, name):
            return None  # .wh.NAME whiteout, as fuse-overlayfs writes where mknod is refused

    lowers: list[tuple[Layer, Path]] = []
    positive = False
    origin: os.stat_result | None = None
    in_layer: Layer | None = None
    top_st = upper_st
    if not stop_lowers:
        if len(search) >= INDEX_MIN_LAYERS:
            start = stack.indexes.first(search).get(lname, -1)
            search = search[start:] if start >= 0 else []  # before it: no entry, no whiteout
        for layer, dpath in search:
            listing = layer.listing(dpath)
            is_dir = listing.entries.get(lname)
            if is_dir is None:
                if lname in listing.whiteouts:
                    break
                continue
            positive = True
            if upper_st is not None and not stat.S_ISDIR(upper_st.st_mode) and not metacopy:
                break  # an upper non-dir: the lowers only tell whether a whiteout is needed
            child = (*dpath, lname)
            if not is_dir:
                if top_st is None or metacopy:
                    lst = _sys.lstat_at(layer.dirfd(dpath), lname)
                    top_st = top_st or lst
                    origin = lst
                    lowers.append((layer, child))
                    in_layer = None if redirected else layer
                break  # a non-directory ends the merge (and hides nothing above it)
            if metacopy:
                break  # a directory cannot hold a file's data: read the upper as it is
            if origin is None:
                origin = _sys.lstat_at(layer.dirfd(dpath), lname)
                top_st = top_st or origin
            lowers.append((layer, child))
            if layer.listing(child).opaque:
                break
    if top_st is None:
        return None
    if upper_st is not None and (redirected or stop_lowers):
        # whether removing NAME needs a whiteout depends on NAME in the parent's lowers, not
        # on where (or whether) the directory's own merge continues
        positive = lower_positive(stack, parent, name)
    if metacopy and not lowers:
        log.warning("metacopy file %s has no lower data", os.fsdecode(name))
    return Resolution(
        top_st,
        upper_st is not None,
        lowers,
        positive,
        origin,
        metacopy and bool(lowers),
        in_layer,
    )


def upper_file_flags(fd: int, name: bytes) -> tuple[bool, bytes | None]:
    """(metacopy, redirect) of upper regular file NAME: is its data in a lower, and where.

    One listxattr, not a getxattr per name: most upper files have no xattrs at all.
    """
    names = set(_sys.listxattr_at(fd, name))
    if xattrs.METACOPY_SET.isdisjoint(names):
        return False, None
    return True, _listed_redirect(fd, name, names)


def _listed_redirect(fd: int, name: bytes, names: set[bytes]) -> bytes | None:
    """The redirect of NAME, whose xattr names (listxattr) are NAMES."""
    for attr in xattrs.REDIRECT:
        if attr in names:
            return _sys.getxattr_at(fd, name, attr)
    return None


def _redirected(
    stack: LayerStack, parent: Node, redirect: bytes
) -> tuple[list[tuple[Layer, Path]], bytes]:
    """Where the lower part of a renamed directory lives: (search dirs, name to look up).

    A redirect is data from the upper, never a path to walk as such: each component must be a
    plain name (no ``..``), or the lookup is refused (EACCES), as the kernel refuses it.
    """
    if redirect.startswith(b"/"):
        parts = tuple(p for p in redirect.split(b"/") if p)
        if not parts:
            return [], b""
        for part in parts:
            _valid_redirect_part(part)
        dirs: list[tuple[Layer, Path]] = []
        for layer in stack.lowers:
            try:
                layer.dirfd(parts[:-1])
            except OSError:
                continue
            dirs.append((layer, parts[:-1]))
        return dirs, parts[-1]
    _valid_redirect_part(redirect)
    return parent.lowers, redirect


def _valid_redirect_part(part: bytes) -> None:
    try:
        _sys.check_name(part)
    except OSError:
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
        key = origin or real
    elif res.upper:
        # a metacopy found after a remount shows its lower's st_ino, as a fresh copy-up does
        fallback = origin if res.metacopy and one_link else None
        key, origin = table.copied_up.get(real, (real, fallback))
    elif not one_link and table.writable:
        key = (real, parent.id, name)  # one node per name (index=off)
    else:
        key = origin or real  # one int object for both: most nodes are lower files
    node = table.find(key)
    if node is None:
        node = Node(key, res.is_dir, parent, name, res.upper, res.in_layer or res.lowers, origin)
        node.metacopy = res.metacopy
        return table.add(node)
    if node.parent is not parent or node.name != name:
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

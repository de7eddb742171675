"""The layer stack: one open root fd per layer, cached directory fds, cached lower listings.

Lowers are immutable while mounted (as with overlayfs), so a lower directory is listed once and
its listing kept: a lookup in a lower is then a dict probe, not a syscall. The upper changes only
through us; its directory fds are cached by merged path and dropped when a rename or rmdir
moves the path.

Kernel analogue: fs/overlayfs/super.c (ovl_get_layers), ovl_entry.h (struct ovl_layer).
Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import stat
import sys
from collections import OrderedDict
from dataclasses import dataclass

from layerfs import _sys, whiteout, xattrs

Path = tuple[bytes, ...]
LISTING_CACHE_ENTRIES = 200_000  # per layer: bounds memory, not the number of directories


@dataclass(slots=True)
class Listing:
    """One real directory's entries, as far as the merge needs them.

    Whiteouts of every dialect are decoded here once: ``entries`` holds only real objects.
    """

    entries: dict[bytes, bool]  # name -> is a directory (markers and whiteouts excluded)
    # Names this directory hides in the layers below. A NAME beside a .wh.NAME (an OCI layer
    # that deleted and re-added NAME) is an entry first: entries win over whiteouts.
    whiteouts: frozenset[bytes]
    opaque: bool
    # the directory's own overlay.redirect (a renamed directory of a former upper), as stored
    redirect: bytes | None = None


class Layer:
    """One layer: a root directory fd and a cache of open directory fds below it."""

    def __init__(self, path: str, index: int, *, writable: bool, fd_cache: int = 512) -> None:
        self.path = path
        self.index = index  # 0 = upper when there is one; lowers follow, topmost first
        self.writable = writable
        self.root_fd = os.open(path, _sys.O_DIR)
        self.dev = os.fstat(self.root_fd).st_dev
        self._fds: OrderedDict[Path, int] = OrderedDict()
        self._fd_cache = fd_cache
        self._listings: OrderedDict[Path, Listing] = OrderedDict()
        self._held = 0  # entries in the cached listings
        self._uuid: bytes | None = None

    def __repr__(self) -> str:
        return f"Layer({self.path!r}, index={self.index})"

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        os.close(self.root_fd)

    def locate(self, path: Path) -> tuple[int, bytes]:
        """(dirfd, name) of PATH for the *at() calls; (root fd, b"") for the root itself."""
        if not path:
            return self.root_fd, b""
        return self.dirfd(path[:-1]), path[-1]

    def dirfd(self, path: Path) -> int:
        """Return a cached fd of directory PATH, walked one component at a time, no symlinks.

        The fd stays valid until the next call that may evict it; callers that keep an fd
        across an await (copy-up) must ``os.dup`` it.
        """
        if not path:
            return self.root_fd
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        # walk down from the deepest cached ancestor, in a loop (trees can be 5,000 deep)
        depth = len(path) - 1
        while depth and path[:depth] not in self._fds:
            depth -= 1
        fd = self._fds[path[:depth]] if depth else self.root_fd
        for end in range(depth + 1, len(path) + 1):
            fd = _sys.open_dir_at(fd, path[end - 1])
            self._fds[path[:end]] = fd
            if len(self._fds) > self._fd_cache:
                _, old = self._fds.popitem(last=False)  # never FD's parent: just used
                os.close(old)
        return fd

    def origin_fh(self, path: Path, at: tuple[int, bytes] | None = None) -> bytes:
        """What the kernel stores in ``overlay.origin`` of a copy of PATH (ovl_get_origin_fh).

        A struct ovl_fb: version 0, magic 0xfb, length, flags (0: little-endian CPU), the
        handle type, the filesystem's uuid, then the handle. Empty where the filesystem has no
        file handles ("copied up, origin unknown"). AT: PATH's (dirfd, name) where the caller
        has it (b"": the fd is PATH's own), instead of locating it again.
        """
        handle = _sys.file_handle_at(*(self.locate(path) if at is None else at))
        if handle is None:
            return b""
        if self._uuid is None:
            self._uuid = _sys.fs_uuid(self.root_fd)
        kind, fid = handle
        flags = 0 if sys.byteorder == "little" else 1  # OVL_FH_FLAG_CPU_ENDIAN
        return bytes((0, 0xFB, 21 + len(fid), flags, kind & 0xFF)) + self._uuid + fid

    def clear_listings(self) -> None:
        self._listings.clear()
        self._held = 0

    def forget_prefix(self, path: Path) -> None:
        """Drop cached fds at PATH and below (after a rename or rmdir in the upper)."""
        n = len(path)
        for key in [k for k in self._fds if k[:n] == path]:
            os.close(self._fds.pop(key))
        for key in [k for k in self._listings if k[:n] == path]:
            self._held -= len(self._listings.pop(key).entries)

    def listing(self, path: Path) -> Listing:
        """Return the (cached) listing of lower directory PATH."""
        cached = self._listings.get(path)
        if cached is not None:
            self._listings.move_to_end(path)
            return cached
        listing = self.read_listing(path)
        if not self.writable:
            self._listings[path] = listing
            self._held += len(listing.entries)
            while self._held > LISTING_CACHE_ENTRIES and len(self._listings) > 1:
                _, old = self._listings.popitem(last=False)
                self._held -= len(old.entries)
        return listing

    def read_listing(self, path: Path) -> Listing:
        fd = self.dirfd(path)
        return read_listing(fd)


def read_listing(fd: int) -> Listing:
    """List directory FD, decoding whiteouts and the opaque marker in every dialect.

    An xattr whiteout (zero-size file with ``overlay.whiteout``) is honoured only in a directory
    marked ``overlay.opaque=x``, as the kernel does, so ordinary files cost no getxattr.
    """
    entries: dict[bytes, bool] = {}
    wh: set[bytes] = set()
    opaque = False
    maybe_x: list[bytes] = []
    with os.scandir(fd) as it:
        for e in it:
            name = os.fsencode(e.name)
            if name.startswith(whiteout.WH_PREFIX):
                if name == whiteout.OPQ_MARKER:
                    opaque = True
                else:
                    wh.add(name[len(whiteout.WH_PREFIX) :])
                continue
            if e.is_dir(follow_symlinks=False):
                entries[name] = True
                continue
            if not (e.is_file(follow_symlinks=False) or e.is_symlink()):
                st = _sys.lstat_at(fd, name)
                if whiteout.is_chardev_whiteout(st.st_mode, st.st_rdev):
                    wh.add(name)
                    continue
            elif e.is_file(follow_symlinks=False):
                maybe_x.append(name)
            entries[name] = False
    # one listxattr: most directories carry no overlay xattr at all
    present = set(_flistxattr(fd))
    opq = [_sys.fgetxattr(fd, a) for a in xattrs.OPAQUE if a in present]
    if any(v is not None and v.startswith(b"y") for v in opq):
        opaque = True
    if any(v is not None and v.startswith(b"x") for v in opq):
        for name in maybe_x:
            st = _sys.lstat_at(fd, name)
            if whiteout.is_whiteout_at(fd, name, st.st_mode, st.st_rdev, st.st_size):
                del entries[name]
                wh.add(name)
    redirect = next((_sys.fgetxattr(fd, a) for a in xattrs.REDIRECT if a in present), None)
    return Listing(entries, frozenset(wh), opaque, redirect or None)


def _flistxattr(fd: int) -> list[bytes]:
    try:
        return [os.fsencode(n) for n in os.listxattr(fd)]
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return []
        raise


INDEX_MIN_LAYERS = 8  # below this, a lookup asks each layer's listing (but see Node.missed)
INDEX_CACHE_ENTRIES = 200_000


class LowerIndexes:
    """For directories merged over many lowers: where in the stack each name first appears.

    ``first[name]`` is the position, in the directory's list of lower directories, of the first
    one that holds NAME as an entry, or ``~position`` where a whiteout hides it first. A lookup
    then starts at that layer instead of asking every layer above it (lookup cost flat in the
    layer count). Lowers are immutable, so an index never goes stale; the cache is keyed by the
    list object itself (a node's ``lowers``), bounded by the names it holds, LRU.
    """

    def __init__(self, max_entries: int = INDEX_CACHE_ENTRIES) -> None:
        self._max = max_entries
        self._held = 0
        self._cache: OrderedDict[int, tuple[object, dict[bytes, int]]] = OrderedDict()
        # the last index asked for, the most recent in the LRU order already: the lookups of
        # one directory in a row (a PATH search, an import scan) skip the hash and the move
        self._last: object = None
        self._last_first: dict[bytes, int] = {}

    def first(self, lowers: list[tuple[Layer, Path]]) -> dict[bytes, int]:
        if lowers is self._last:
            return self._last_first
        hit = self._cache.get(id(lowers))
        if hit is not None and hit[0] is lowers:
            self._cache.move_to_end(id(lowers))
            self._last, self._last_first = lowers, hit[1]
            return hit[1]
        first: dict[bytes, int] = {}
        for i, (layer, dpath) in enumerate(lowers):
            listing = layer.listing(dpath)
            for name in listing.entries:
                first.setdefault(name, i)
            for name in listing.whiteouts:
                first.setdefault(name, ~i)
        old = self._cache.pop(id(lowers), None)
        if old is not None:
            self._held -= len(old[1])
        self._cache[id(lowers)] = (lowers, first)  # holding the list keeps its id unique
        self._held += len(first)
        while self._held > self._max and len(self._cache) > 1:
            _, (_, dropped) = self._cache.popitem(last=False)
            self._held -= len(dropped)
        self._last, self._last_first = lowers, first
        return first

    def statistics(self) -> dict[str, int]:
        return {"lower_indexes": len(self._cache), "lower_index_names": self._held}

    def clear(self) -> None:
        self._cache.clear()
        self._held = 0
        self._last, self._last_first = None, {}


def fd_cache_size(n_layers: int) -> int:
    """Directory fds each of N_LAYERS layers may keep open: 512, or less where the soft limit
    on open files would not hold them all beside a reserve for everything else (node
    descriptors, copy-ups, /dev/fuse); never below 128, so that two paths' fds held at once
    are not evicted by each other (a cached fd lives until the next miss evicts it)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    reserve = min(256, soft // 4)
    return max(128, min(512, (soft - reserve) // max(1, n_layers) - 1))


class LayerStack:
    """The upper (optional) and the lowers, topmost first; the workdir fd for atomic builds."""

    def __init__(self, lowers: tuple[str, ...], upper: str | None, workdir: str | None) -> None:
        self.upper: Layer | None = None
        self.lowers: list[Layer] = []
        self.work_fd = -1
        self.indexes = LowerIndexes()
        self.root_lowers: list[tuple[Layer, Path]] | None = None  # see lookup._root_lowers
        self.metacopy = False  # follow metacopy marks of the upper (kernel metacopy=on)
        cache = fd_cache_size(len(lowers) + (upper is not None))
        try:
            if upper is not None:
                self.upper = Layer(upper, 0, writable=True, fd_cache=cache)
            base = 1 if upper is not None else 0
            for i, path in enumerate(lowers):
                self.lowers.append(Layer(path, base + i, writable=False, fd_cache=cache))
            if upper is not None and workdir is not None:
                self.work_fd = _prepare_workdir(workdir)
        except BaseException:
            self.close()
            raise
        devs: list[int] = []
        for layer in self.layers():
            if layer.dev not in devs:
                devs.append(layer.dev)
        self.devs = devs

    def layers(self) -> list[Layer]:
        return ([self.upper] if self.upper else []) + self.lowers

    def close(self) -> None:
        for layer in self.layers():
            layer.close()
        if self.work_fd >= 0:
            os.close(self.work_fd)
            self.work_fd = -1


def _prepare_workdir(workdir: str) -> int:
    """Open WORKDIR/work (as the kernel names it), emptied of what a crash left behind.

    The work directory is locked for the life of the mount (the kernel drops the lock if the
    daemon dies): a second mount on it would otherwise empty the first one's work area
    (the kernel's ovl_inuse_trylock).
    """
    wfd = os.open(workdir, _sys.O_DIR)
    try:
        st = _sys.lstat_at_or_none(wfd, b"work")
        if st is not None and not stat.S_ISDIR(st.st_mode):
            _sys.unlink_at(wfd, b"work")
            st = None
        if st is None:
            _sys.mkdir_at(wfd, b"work", 0o700)
        fd = _sys.open_dir_at(wfd, b"work")
    finally:
        os.close(wfd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(errno.EBUSY, "workdir is in use by another mount", workdir) from None
    for name in os.listdir(fd):
        _sys.remove_tree_at(fd, os.fsencode(name))
    return fd

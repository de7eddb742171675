"""The merged listing of a directory: upper first, then each lower down to an opaque one.

Names already seen, names whited out by a layer above, and format markers (``.wh.*``) are
dropped. A listing is snapshotted per open directory handle, so the offsets handed to the
kernel (an index into the snapshot) stay valid across calls whatever happens to the directory;
a rewind to offset 0 takes a fresh snapshot if the directory changed.

Kernel analogue: fs/overlayfs/readdir.c (ovl_dir_read_merged, ovl_cache_get).
Must not import: pyfuse3, trio.
"""

from __future__ import annotations

from collections import OrderedDict

from layerfs import _sys
from layerfs.inodes import Node
from layerfs.layers import LayerStack, read_listing


def merged_names(stack: LayerStack, node: Node) -> list[bytes]:
    """Return the names visible in merged directory NODE, in layer order."""
    return merged_listing(stack, node)[0]


def merged_listing(stack: LayerStack, node: Node) -> tuple[list[bytes], dict[bytes, bool]]:
    """The names visible in merged directory NODE, in layer order, and the upper's entries
    (name -> is a directory; empty without an upper part)."""
    seen: dict[bytes, None] = {}
    hidden: set[bytes] = set()
    upper: dict[bytes, bool] = {}
    if node.upper and stack.upper is not None:
        listing = read_listing(stack.upper.dirfd(node.path()))
        upper = listing.entries
        seen.update(dict.fromkeys(upper))
        hidden |= listing.whiteouts
        if listing.opaque and node.parent is not None:  # the root's opaque mark means nothing
            return list(seen), upper
    for layer, dpath in node.lowers:
        listing = layer.listing(dpath)
        for name in listing.entries:
            if name not in seen and name not in hidden:
                seen[name] = None
        hidden |= listing.whiteouts
    return list(seen), upper


def kernel_order(stack: LayerStack, node: Node, names: list[bytes], *, dots: bool) -> list[bytes]:
    """NAMES (merged_listing's, visible) in the order the kernel lists merged directory NODE
    (ovl_dir_read_merged): the bottom layer's entries first, in its readdir order, then the
    others in the order the layers above first showed them. DOTS: with ``.`` and ``..`` where
    the bottom layer's readdir puts them (ext4 may put them anywhere in a one-block directory:
    one more read of it, not cached)."""
    layer, dpath = node.lowers[-1]
    visible = dict.fromkeys(names)
    if dots:
        first = [n for n in _sys.dir_order(layer.dirfd(dpath)) if n in visible or n in DOTS]
    else:
        first = [n for n in layer.listing(dpath).entries if n in visible]
    placed = set(first)
    return first + [n for n in names if n not in placed]


DOTS = (b".", b"..")


def is_empty(stack: LayerStack, node: Node) -> bool:
    """True if merged directory NODE shows no entries (whiteouts do not count)."""
    return not merged_names(stack, node)


class DirHandle:
    """An open directory: a snapshot of its merged names and the version it was taken at.

    ``plain`` holds the cached listing when the kernel already had it with attributes (see
    DirCache); ``sent`` collects what a first listing sends, for the cache.
    """

    __slots__ = ("error", "names", "node", "plain", "resolved", "sent", "stale", "version")

    def __init__(
        self,
        node: Node,
        names: list[bytes],
        plain: list[Entry] | None,
        error: OSError | None = None,
    ) -> None:
        self.node = node
        self.names = names
        self.version = node.version
        self.plain = plain
        self.sent: dict[int, Entry] = {}
        # the kernel's impure-directory listing rules (see Overlay.readdir): the error every
        # listing of the directory answers, and the entries left out after a failed lookup
        self.error = error
        self.stale: set[int] = set()
        # lookups the snapshot made (lookup.Resolution by name), for the listing to reuse
        # while the directory is unchanged
        self.resolved: dict[bytes, object] = {}


Entry = tuple[bytes, int, int]  # name, st_ino, st_mode


class DirCache:
    """Listings the kernel has received with attributes, per directory node and version.

    pyfuse3 always answers readdir as readdirplus. The kernel keeps listings itself where the
    adapter can set FOPEN_CACHE_DIR; where it cannot, or once the kernel dropped a cached
    listing, this cache still helps: a directory listed with attributes has its entries held by
    the kernel, so later listings of the same version send names, inode
    numbers and types only: no lookup per entry, no lstat, no node (node id 0 is the
    protocol's "no attributes"). Bounded by the number of entries held.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self._max = max_entries
        self._held = 0
        self._lists: OrderedDict[int, tuple[int, list[Entry]]] = OrderedDict()

    def get(self, node: Node) -> list[Entry] | None:
        hit = self._lists.get(node.id)
        if hit is None or hit[0] != node.version:
            return None
        self._lists.move_to_end(node.id)
        return hit[1]

    def put(self, node: Node, entries: list[Entry]) -> None:
        self.forget(node.id)
        self._lists[node.id] = (node.version, entries)
        self._held += len(entries)
        while self._held > self._max and self._lists:
            _, (_, dropped) = self._lists.popitem(last=False)
            self._held -= len(dropped)

    def forget(self, node_id: int) -> None:
        """The kernel forgot the directory, and with it the entries it held."""
        old = self._lists.pop(node_id, None)
        if old is not None:
            self._held -= len(old[1])

    def clear(self) -> None:
        self._lists.clear()
        self._held = 0

    def statistics(self) -> dict[str, int]:
        return {"dircache_dirs": len(self._lists), "dircache_entries": self._held}

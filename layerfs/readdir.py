"""The merged listing of a directory: upper first, then each lower down to an opaque one.

Names already seen, names whited out by a layer above, and format markers (``.wh.*``) are
dropped. A listing is snapshotted per open directory handle, so the offsets handed to the
kernel (an index into the snapshot) stay valid across calls whatever happens to the directory;
a rewind to offset 0 takes a fresh snapshot if the directory changed.

Kernel analogue: fs/overlayfs/readdir.c (ovl_dir_read_merged, ovl_cache_get).
Must not import: pyfuse3, trio.
"""

from __future__ import annotations

from layerfs.inodes import Node
from layerfs.layers import LayerStack, read_listing


def merged_names(stack: LayerStack, node: Node) -> list[bytes]:
    """Return the names visible in merged directory NODE, in layer order."""
    seen: dict[bytes, None] = {}
    hidden: set[bytes] = set()
    if node.upper and stack.upper is not None:
        listing = read_listing(stack.upper.dirfd(node.path()))
        seen.update(dict.fromkeys(listing.entries))
        hidden |= listing.whiteouts
        if listing.opaque:
            return list(seen)
    for layer, dpath in node.lowers:
        listing = layer.listing(dpath)
        for name in listing.entries:
            if name not in seen and name not in hidden:
                seen[name] = None
        hidden |= listing.whiteouts
    return list(seen)


def is_empty(stack: LayerStack, node: Node) -> bool:
    """True if merged directory NODE shows no entries (whiteouts do not count)."""
    return not merged_names(stack, node)


class DirHandle:
    """An open directory: a snapshot of its merged names and the version it was taken at."""

    __slots__ = ("names", "node", "version")

    def __init__(self, node: Node, names: list[bytes]) -> None:
        self.node = node
        self.names = names
        self.version = node.version

"""The inode table: merged objects (Nodes), their stable inode numbers and lookup counts.

st_ino (which pyfuse3 also uses as the FUSE node id) follows kernel overlayfs: the real inode
number of the object's origin, i.e. the topmost lower for a merged directory or a lower file, the
upper for a pure-upper object, and still the lower's after a copy-up (OVL_CONST_INO), except for
lower hard links, whose copy-up breaks the link as with ``index=off``. When the layers sit on
several filesystems, the layer's filesystem index goes into the top bits (xino-style).

Lookup counts follow pyfuse3's contract: +1 per lookup/create/readdirplus entry, -n per forget;
a node leaves the table at zero unless a handle keeps it open.

Kernel analogue: fs/overlayfs/inode.c (ovl_get_inode, ovl_map_ino), export.c.
Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from layerfs.layers import Layer, Path

log = logging.getLogger(__name__)

ROOT_INO = 1
XINO_SHIFT = 56


class Node:
    """One object of the merged view.

    ``parent``/``name`` is a current name of the object (directories have exactly one; a hard
    link has several, all in ``aliases``). ``upper`` says whether the object has been copied up
    or created in the upper, where its path is the merged path. ``lowers`` are the real lower
    objects: the origin for a non-directory, the merged stack (down to an opaque one) for a
    directory.
    """

    __slots__ = (
        "aliases",
        "is_dir",
        "key",
        "lowers",
        "name",
        "nlookup",
        "opens",
        "parent",
        "upper",
        "version",
    )

    def __init__(
        self,
        key: tuple[int, int],
        is_dir: bool,
        parent: Node | None,
        name: bytes,
        upper: bool,
        lowers: list[tuple[Layer, Path]],
    ) -> None:
        self.key = key
        self.is_dir = is_dir
        self.parent = parent
        self.name = name
        self.upper = upper
        self.lowers = lowers
        self.nlookup = 0
        self.opens = 0
        self.version = 0  # bumped on every change of a directory's entries
        self.aliases: list[tuple[Node, bytes]] | None = None  # only for hard links seen twice

    def path(self) -> Path:
        parts: list[bytes] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        parts.reverse()
        return tuple(parts)

    @property
    def merged(self) -> bool:
        """A directory merged from more than one real directory (nlink reads 1, as overlayfs)."""
        return self.is_dir and len(self.lowers) + (1 if self.upper else 0) > 1


class InodeTable:
    """Maps inode numbers and real identities to Nodes; counts lookups."""

    def __init__(self, devs: list[int]) -> None:
        self._devs = devs
        self.nodes: dict[int, Node] = {}
        self._by_key: dict[tuple[int, int], int] = {}
        self._next_private = (1 << 63) + 1
        self.origin_of: dict[tuple[int, int], tuple[int, int]] = {}  # upper key -> lower key

    def statistics(self) -> dict[str, int]:
        return {"nodes": len(self.nodes), "copied_up": len(self.origin_of)}

    def ino_for(self, key: tuple[int, int]) -> int:
        """Map a real (st_dev, st_ino) to the inode number shown to users."""
        ino = self._by_key.get(key)
        if ino is not None:
            return ino
        dev, real = key
        fsid = self._devs.index(dev) if dev in self._devs else len(self._devs)
        if fsid == 0 and real != ROOT_INO:
            ino = real
        elif real < (1 << XINO_SHIFT) and fsid < 127:
            ino = real | (fsid << XINO_SHIFT)
        else:
            ino = self._private_ino()
        if ino in self.nodes and self.nodes[ino].key != key:
            ino = self._private_ino()  # never give two live objects one number
        return ino

    def _private_ino(self) -> int:
        ino = self._next_private
        self._next_private += 1
        return ino

    def get(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise OSError(2, "stale inode")  # ENOENT: the kernel asked for a forgotten node
        return node

    def find(self, key: tuple[int, int]) -> Node | None:
        ino = self._by_key.get(key)
        return self.nodes.get(ino) if ino is not None else None

    def add(self, node: Node, ino: int) -> Node:
        self.nodes[ino] = node
        self._by_key[node.key] = ino
        return node

    def ino_of(self, node: Node) -> int:
        return self._by_key[node.key]

    def forget(self, ino: int, n: int) -> None:
        node = self.nodes.get(ino)
        if node is None:
            return
        node.nlookup -= n
        if node.nlookup <= 0 and node.opens == 0 and ino != ROOT_INO:
            self.drop(ino)

    def release(self, node: Node) -> None:
        """Drop NODE once it has neither lookups nor open handles (after a release)."""
        if node.opens <= 0 and node.nlookup <= 0:
            ino = self._by_key.get(node.key)
            if ino is not None and ino != ROOT_INO and self.nodes.get(ino) is node:
                self.drop(ino)

    def drop(self, ino: int) -> None:
        node = self.nodes.pop(ino, None)
        if node is not None and self._by_key.get(node.key) == ino:
            del self._by_key[node.key]

"""The inode table: merged objects (Nodes), their FUSE node ids, st_ino and lookup counts.

Two numbers per object, as in the FUSE protocol: the node id the kernel uses to name it to us
(a counter, never reused), and the st_ino users see, which follows kernel overlayfs:
- a directory shows its topmost lower directory's inode number (the upper's if it has none);
- a lower file shows the lower's number, and keeps it when copied up (OVL_CONST_INO), except a
  file whose lower had several links: its copy-up breaks the link, as with ``index=off``, and
  it shows the upper's number from then on;
- a pure upper object shows the upper's number.
With layers on several filesystems, the filesystem's index goes into the top bits (xino).

Identity (which node a lookup returns) is the real object: two names of one upper inode are
one node (a hard link). Lower hard links in a writable stack are one node *per name*, since a
copy-up through one name must not change what the others show (kernel ``index=off``).

Lookup counts follow pyfuse3's contract: +1 per lookup/create/readdirplus entry, -n per
forget; a node leaves the table at zero unless an open handle keeps it.

Kernel analogue: fs/overlayfs/inode.c (ovl_get_inode, ovl_map_ino), util.c.
Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from layerfs.layers import Layer, Path

log = logging.getLogger(__name__)

ROOT_ID = 1
XINO_SHIFT = 56

# A real object's identity, (st_dev << 64) | st_ino: one int, not a tuple of two, since a
# tree of a million files keeps a million of them.
RealId = int
Key = RealId | tuple[int, int, bytes]


def real_id(dev: int, ino: int) -> RealId:
    return (dev << 64) | ino


def split_real_id(rid: RealId) -> tuple[int, int]:
    return rid >> 64, rid & 0xFFFF_FFFF_FFFF_FFFF


class Node:
    """One object of the merged view.

    ``parent``/``name`` is a current name of the object (a directory has exactly one; a hard
    link has several, listed in ``aliases`` once a second one was seen; ``name`` is empty once
    the last one is gone). ``upper``: the object exists in the upper, at its merged path.
    ``lowers``: the real lower objects, the origin for a non-directory, the merged stack (down
    to an opaque one) for a directory. ``origin``: the real id whose st_ino users see,
    when it comes from a lower (see the module docstring).

    Most nodes are lower files whose one lower object is their own name in the directory their
    parent has in that layer. Such a node keeps only the layer and derives the path when asked:
    a list, a tuple and a path tuple less per node, about 200 of its 620 bytes. It writes the
    path down (``pin_lowers``) before its name or parent changes; a directory's lowers, which
    its children derive theirs from, are always written down and never change.
    """

    __slots__ = (
        "_lowers",
        "aliases",
        "id",
        "is_dir",
        "key",
        "metacopy",
        "name",
        "nlookup",
        "opens",
        "origin",
        "parent",
        "upper",
        "version",
    )

    def __init__(
        self,
        key: Key,
        is_dir: bool,
        parent: Node | None,
        name: bytes,
        upper: bool,
        lowers: list[tuple[Layer, Path]] | Layer,
        origin: RealId | None,
    ) -> None:
        """LOWERS: the list, or the one layer holding the lower object, which then is NAME in
        the directory PARENT has in that layer."""
        self.id = 0
        self.key = key
        self.is_dir = is_dir
        self.parent = parent
        self.name = name
        self.upper = upper
        self._lowers = lowers or None
        self.origin = origin
        self.metacopy = False  # upper holds the metadata only; the data is still lowers[0]
        self.nlookup = 0
        self.opens = 0
        self.version = 0  # bumped on every change of a directory's entries
        self.aliases: list[tuple[Node, bytes]] | None = None

    @property
    def lowers(self) -> list[tuple[Layer, Path]]:
        low = self._lowers
        if low is None:
            return []
        if isinstance(low, list):
            return low
        assert self.parent is not None
        for layer, dpath in self.parent.lowers:
            if layer is low:
                return [(layer, (*dpath, self.name))]
        raise AssertionError("a derived lower without its parent's")

    @lowers.setter
    def lowers(self, lowers: list[tuple[Layer, Path]]) -> None:
        self._lowers = lowers or None

    def pin_lowers(self) -> None:
        """Write down a derived lower path, which would not survive a change of name."""
        if self._lowers is not None and not isinstance(self._lowers, list):
            self._lowers = self.lowers

    def rename(self, parent: Node | None, name: bytes) -> None:
        """Give the node another current name (its lower paths stay where they are)."""
        self.pin_lowers()
        self.parent, self.name = parent, name

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
    """Maps node ids and real identities to Nodes; counts lookups; computes st_ino."""

    def __init__(self, devs: list[int], *, writable: bool) -> None:
        self._devs = devs
        self.writable = writable  # a stack with an upper: lower hard links are per name
        self.nodes: dict[int, Node] = {}
        self._by_key: dict[Key, Node] = {}
        self._peak = 0  # most nodes the two maps held since they were last rebuilt
        self._ids = itertools.count(ROOT_ID + 1)
        # upper (st_dev, st_ino) of a file copied up in this mount -> its node's key, so that a
        # node forgotten and looked up again keeps its identity and st_ino
        self.copied_up: dict[RealId, tuple[Key, RealId | None]] = {}

    def statistics(self) -> dict[str, int]:
        return {"nodes": len(self.nodes), "copied_up": len(self.copied_up)}

    def st_ino(self, dev: int, ino: int) -> int:
        """Map a real (st_dev, st_ino) to the st_ino users see (xino-style when several fs)."""
        if len(self._devs) <= 1 or dev == self._devs[0]:
            return ino
        fsid = self._devs.index(dev) if dev in self._devs else len(self._devs)
        if ino < (1 << XINO_SHIFT) and fsid < 128:
            return ino | (fsid << XINO_SHIFT)
        return ino  # does not fit: show it unmapped rather than invent a number

    def get(self, node_id: int) -> Node:
        node = self.nodes.get(node_id)
        if node is None:
            raise OSError(2, "stale node id")  # the kernel asked for a forgotten node
        return node

    def find(self, key: Key) -> Node | None:
        return self._by_key.get(key)

    def add(self, node: Node, node_id: int | None = None) -> Node:
        node.id = next(self._ids) if node_id is None else node_id
        self.nodes[node.id] = node
        self._by_key[node.key] = node
        self._peak = max(self._peak, len(self.nodes))
        return node

    def compact(self) -> None:
        """Rebuild the maps once they hold a quarter of their peak: a dict never gives back
        its table (a million nodes: two tables of ~40 MB) as entries go; a new one is sized
        to what is left. Amortised: each rebuild follows at least 3x its size in removals."""
        if self._peak > 4096 and len(self.nodes) < self._peak // 4:
            self.nodes = dict(self.nodes)
            self._by_key = dict(self._by_key)
            self._peak = len(self.nodes)

    def unhash(self, node: Node) -> None:
        """Take NODE out of the identity map (it has no name left), keeping its node id."""
        if self._by_key.get(node.key) is node:
            del self._by_key[node.key]

    def forget(self, node_id: int, n: int) -> None:
        node = self.nodes.get(node_id)
        if node is None:
            return
        node.nlookup -= n
        self.release(node)

    def release(self, node: Node) -> None:
        """Drop NODE once it has neither lookups nor open handles."""
        if node.opens <= 0 and node.nlookup <= 0 and node.id != ROOT_ID:
            if self.nodes.get(node.id) is node:
                del self.nodes[node.id]
            if self._by_key.get(node.key) is node:
                del self._by_key[node.key]

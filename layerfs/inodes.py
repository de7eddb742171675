"""The inode table: merged objects (Nodes), their FUSE node ids, st_ino and lookup counts.

Two numbers per object, as in the FUSE protocol: the node id the kernel uses to name it to us,
and the st_ino users see, which follows kernel overlayfs:
- a directory shows its topmost lower directory's inode number (the upper's if it has none);
- a lower file shows the lower's number, and keeps it when copied up (OVL_CONST_INO), except a
  file whose lower had several links: its copy-up breaks the link, as with ``index=off``, and
  it shows the upper's number from then on;
- a pure upper object shows the upper's number.
With layers on several filesystems, the filesystem's index goes into the top bits (xino).

Identity (which node a lookup returns) is the real object: two names of one upper inode are
one node (a hard link). Lower hard links in a writable stack are one node *per name*, since a
copy-up through one name must not change what the others show (kernel ``index=off``).

A node's id is its identity where it can be, as fuse-overlayfs uses its inode numbers: one
int and one map entry per node, not two of each (a walk of a million files keeps a million
nodes). Ids are reused only once the kernel forgot them, as C daemons reuse their pointers.

Lookup counts follow pyfuse3's contract: +1 per lookup/create/readdirplus entry, -n per
forget; a node leaves the table at zero unless an open handle keeps it.

Kernel analogue: fs/overlayfs/inode.c (ovl_get_inode, ovl_map_ino), util.c.
Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from layerfs.layers import Layer, Path

log = logging.getLogger(__name__)

ROOT_ID = 1
XINO_SHIFT = 56
# Identities of objects on the stack's filesystems are their xino inode numbers, below 2**63;
# other objects' are (dev + 1) << 64 | ino. Node ids that are not an identity count from here.
SPARE_IDS = 1 << 63
_INO_MASK = (1 << 64) - 1

# A real object's identity (see InodeTable.ident); a per-name node's is (identity, parent
# node id, name).
RealId = int
Key = RealId | tuple[int, int, bytes]

_DIR, _UPPER, _METACOPY, _IMPURE, _NO_WH, _NO_CAPS, _NO_DACL, _MISSED = 1, 2, 4, 8, 16, 32, 64, 128
_OPENS = 8  # the open handles' count: the bits of Node._flags from this one up
_FLAGS = (1 << _OPENS) - 1


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
    a list, a tuple and a path tuple less per node. It writes the path down (``pin_lowers``)
    before its name or parent changes; a directory's lowers, which its children derive theirs
    from, are always written down and never change.

    Memory: a million of these stay while the kernel holds a walked tree, and the allocator
    hands out 16-byte steps, so the flags and the count of open handles share one int and a
    directory's listing ``version`` and a file's ``aliases`` (a directory has one name) share
    one slot: 9 slots, 112 bytes interpreted and compiled by mypyc (whose vtable pointer
    takes 8 more). Compiled, an ``int`` attribute (``id``, ``nlookup``) is stored unboxed and
    each read boxes a new int: what a table keeps must be the boxed ``key``/``origin``
    themselves (see InodeTable.add, lookup.node_for), or each node keeps extra ints.
    """

    __slots__ = (
        "_extra",
        "_flags",
        "_lowers",
        "id",
        "key",
        "name",
        "nlookup",
        "origin",
        "parent",
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
        self._flags = (_DIR if is_dir else 0) | (_UPPER if upper else 0)
        self.parent = parent
        self.name = name
        self._lowers = lowers or None
        self.origin = origin
        self.nlookup = 0
        self._extra: int | list[tuple[Node, bytes]] | None = 0 if is_dir else None

    @property
    def is_dir(self) -> bool:
        return bool(self._flags & _DIR)

    @property
    def upper(self) -> bool:
        return bool(self._flags & _UPPER)

    @upper.setter
    def upper(self, value: bool) -> None:
        self._set(_UPPER, value)

    @property
    def metacopy(self) -> bool:
        """The upper holds the metadata only; the data is still lowers[-1]."""
        return bool(self._flags & _METACOPY)

    @metacopy.setter
    def metacopy(self, value: bool) -> None:
        self._set(_METACOPY, value)

    @property
    def impure(self) -> bool:
        """A directory whose upper we marked ``overlay.impure`` (or found marked): no need to
        mark it again, as the kernel's OVL_IMPURE inode flag. Cleared where the mark is
        removed; a new upper directory is a new node."""
        return bool(self._flags & _IMPURE)

    @impure.setter
    def impure(self, value: bool) -> None:
        self._set(_IMPURE, value)

    @property
    def no_oci_whiteouts(self) -> bool:
        """A directory whose upper holds no ``.wh.NAME`` whiteouts: one this mount made (a
        mkdir, a copy-up) while it wrote none (Namespace.mknod_whiteouts). Its failed lookups
        need not look for ``.wh.NAME`` (lookup.resolve)."""
        return bool(self._flags & _NO_WH)

    @no_oci_whiteouts.setter
    def no_oci_whiteouts(self, value: bool) -> None:
        self._set(_NO_WH, value)

    @property
    def no_caps(self) -> bool:
        """Its real file has no ``security.capability``: made by this mount's MKNOD, or
        found without one (Overlay.find_xattr); cleared by any SETXATTR through the mount, the
        only way one is added. The kernel asks for it at a file's first write and at every
        chown (its kill-priv checks): answered without a syscall."""
        return bool(self._flags & _NO_CAPS)

    @no_caps.setter
    def no_caps(self, value: bool) -> None:
        self._set(_NO_CAPS, value)

    @property
    def no_default_acl(self) -> bool:
        """A directory whose upper was read to have no default ACL, none set through the
        mount since (Overlay.setxattr, removexattr clear it): a create in it need not ask
        again (Namespace._default_acl)."""
        return bool(self._flags & _NO_DACL)

    @no_default_acl.setter
    def no_default_acl(self, value: bool) -> None:
        self._set(_NO_DACL, value)

    @property
    def missed(self) -> bool:
        """A directory in which a LOOKUP found nothing: where one name is missing, more are
        looked for (a PATH search, an import scan), so its lookups go through the lowers'
        index (lookup.resolve) whatever the layer count."""
        return bool(self._flags & _MISSED)

    @missed.setter
    def missed(self, value: bool) -> None:
        self._set(_MISSED, value)

    @property
    def opens(self) -> int:
        """Open handles (files and directories) of the node: it stays in the table while any."""
        return self._flags >> _OPENS

    @opens.setter
    def opens(self, value: int) -> None:
        self._flags = self._flags & _FLAGS | value << _OPENS

    def _set(self, flag: int, value: bool) -> None:
        self._flags = self._flags | flag if value else self._flags & ~flag

    @property
    def version(self) -> int:
        """A directory's listing version, bumped on every change of its entries."""
        assert isinstance(self._extra, int)
        return self._extra

    @version.setter
    def version(self, value: int) -> None:
        assert isinstance(self._extra, int)
        self._extra = value

    @property
    def aliases(self) -> list[tuple[Node, bytes]] | None:
        """A non-directory's names, once it has more than one."""
        return None if isinstance(self._extra, int) else self._extra

    @aliases.setter
    def aliases(self, value: list[tuple[Node, bytes]] | None) -> None:
        assert not isinstance(self._extra, int)
        self._extra = value

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
        self._fsid = {dev: i for i, dev in enumerate(devs) if i < 128}
        self.writable = writable  # a stack with an upper: lower hard links are per name
        # node id -> node; a node whose id is its key is found by identity here too, entered
        # under the key's own object (typed Key, not int: mypyc would box a second int)
        self.nodes: dict[Key, Node] = {}
        # key -> node, for the named nodes whose id is not their key (few)
        self._others: dict[Key, Node] = {}
        self._peak = 0  # most nodes the maps held since they were last rebuilt
        self._spare = itertools.count(SPARE_IDS)
        # upper identity of a file copied up in this mount -> its node's key and origin, so
        # that a node forgotten and looked up again keeps its identity and st_ino
        self.copied_up: dict[RealId, tuple[Key, RealId | None]] = {}

    def statistics(self) -> dict[str, int]:
        return {"nodes": len(self.nodes), "copied_up": len(self.copied_up)}

    def ident(self, dev: int, ino: int) -> RealId:
        """The identity of real object (DEV, INO): on the stack's filesystems, the xino inode
        number it shows (see st_ino), which can serve as its node id too."""
        fsid = self._fsid.get(dev)
        if fsid is not None and ino < (1 << XINO_SHIFT):
            return ino | (fsid << XINO_SHIFT)
        return ((dev + 1) << 64) | ino

    def st_ino(self, rid: RealId) -> int:
        """The st_ino users see for identity RID (xino-style when several fs)."""
        if rid < SPARE_IDS:
            return rid  # the xino number itself (see ident)
        ino = rid & _INO_MASK
        if len(self._devs) <= 1:
            return ino
        fsid = len(self._devs)  # an object off the stack's filesystems, or one with no index
        if ino < (1 << XINO_SHIFT) and fsid < 128:
            return ino | (fsid << XINO_SHIFT)
        return ino  # does not fit: show it unmapped rather than invent a number

    def get(self, node_id: int) -> Node:
        node = self.nodes.get(node_id)
        if node is None:
            raise OSError(2, "stale node id")  # the kernel asked for a forgotten node
        return node

    def find(self, key: Key) -> Node | None:
        """The named node of identity KEY."""
        node = self.nodes.get(key)  # a tuple key is never a node id
        if node is not None and node.key == key and node.name:
            return node
        return self._others.get(key)

    def add(self, node: Node, node_id: int | None = None) -> Node:
        """Give NODE an id (its key if free, NODE_ID for the root) and enter it."""
        key = node.key
        # not narrowed to int by an if: compiled, key would be unboxed there and boxed anew
        own = node_id is None and isinstance(key, int) and ROOT_ID < key < SPARE_IDS
        if own and key not in self.nodes:
            node.id = cast(int, key)
            self.nodes[key] = node  # the same int object: no second one per node
        else:
            node_id = next(self._spare) if node_id is None else node_id
            node.id = node_id
            self.nodes[node_id] = node
            if node_id != key:
                self._others[key] = node
        self._peak = max(self._peak, len(self.nodes))
        return node

    def compact(self) -> None:
        """Rebuild the maps once they hold a quarter of their peak: a dict never gives back
        its table (a million nodes: ~40 MB) as entries go; a new one is sized to what is
        left. Amortised: each rebuild follows at least 3x its size in removals."""
        if self._peak > 4096 and len(self.nodes) < self._peak // 4:
            self.nodes = dict(self.nodes)
            self._others = dict(self._others)
            self._peak = len(self.nodes)

    def unhash(self, node: Node) -> None:
        """NODE has no name left: lookups no longer find it by identity; it keeps its id."""
        if self._others.get(node.key) is node:
            del self._others[node.key]

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
            if self._others.get(node.key) is node:
                del self._others[node.key]

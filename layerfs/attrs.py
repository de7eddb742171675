"""Value types the engine hands to its front ends: attributes of a merged object, the caller.

Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

from layerfs import _sys


class Caller(NamedTuple):
    """Who asks: the credentials new objects are created with.

    A NamedTuple, as Attr: one is built per MKNOD, SETATTR and a non-root caller's WRITE, and a
    frozen dataclass's __init__ (an object.__setattr__ per field) cost 3-4 times as much.
    """

    uid: int = 0
    gid: int = 0
    umask: int = 0o022
    pid: int = 0
    # supplementary groups; None: not read yet, read from /proc when a check needs them (a
    # setgid file outside the caller's own group: rare, and the read costs more than a request)
    groups: frozenset[int] | None = None
    # the mount's id mapping of groups read later (IdMap.caller: stored ids), None: as read
    store_gid: Callable[[int], int] | None = None
    # CAP_FSETID, decided by the caller's own uid, not the stored one IdMap.caller puts in
    # UID (an id-mapped mount's root is stored as another id); None: UID is its own
    privileged: bool | None = None

    @property
    def keeps_priv(self) -> bool:
        """Whether the caller keeps setuid/setgid bits on a write, truncate or ACL change
        (CAP_FSETID: we take uid 0); others' are cleared by the daemon (kill_suid)."""
        return self.uid == 0 if self.privileged is None else self.privileged

    @property
    def kill_priv(self) -> Caller | None:
        """The writer whose writes the daemon must clear setuid/setgid for (Handle.kill_priv):
        this caller, or None when it keeps them."""
        return None if self.keeps_priv else self

    def in_group(self, gid: int) -> bool:
        """Whether GID is the caller's group or one of its supplementary groups."""
        if gid == self.gid:
            return True
        groups = self.groups
        if groups is None:
            groups = _sys.sup_groups(self.pid)
            if self.store_gid is not None:
                groups = frozenset(map(self.store_gid, groups))
        return gid in groups


class Attr(NamedTuple):
    """The attributes of a merged object: its node id, and its stat as users see it.

    A NamedTuple, not a dataclass: one is built per readdirplus entry, and tuple
    construction is several times cheaper than a frozen dataclass's __init__.
    """

    id: int
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blksize: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def from_stat(cls, node_id: int, ino: int, st: os.stat_result, nlink: int | None) -> Attr:
        # tuple.__new__ as the NamedTuple's own __new__ calls it, without that Python
        # frame: ~2k instructions less an Attr compiled (docs/benchmarks.md, session 16
        # untar3); the fields in their order above
        return tuple.__new__(cls, (
            node_id,
            ino,
            st.st_mode,
            st.st_nlink if nlink is None else nlink,
            st.st_uid,
            st.st_gid,
            st.st_rdev,
            st.st_size,
            st.st_blksize,
            st.st_blocks,
            st.st_atime_ns,
            st.st_mtime_ns,
            st.st_ctime_ns,
        ))  # fmt: skip


class SetAttr(NamedTuple):
    """The changes of one setattr request; None means unchanged. A NamedTuple: one per
    SETATTR (see Caller)."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None

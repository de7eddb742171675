"""Id mapping (fuse-overlayfs ``uidmapping=``/``gidmapping=``, ``squash_to_uid=``/``gid=``).

A range ``S:K:N`` shows an object stored in the layers with id S+i as owned by id K+i, and
stores a caller's (or a chown's) id K+i as S+i: images keep their own ids on disk while the
container's processes, whose user namespace maps them onto K..K+N-1, see them as theirs. An id
outside every range shows as, and is stored as, the overflow id 65534, as the kernel does for
ids a user namespace does not map; an owner's or group's is answered as ``(uid_t)-1`` (NO_ID),
which the kernel's FUSE shows as 65534 owned by nobody (IdMap.attr). ``squash_to_*`` shows
every object owned by one id.

A file capability (``security.capability``) names the root id it is valid for (a v3's
``rootid``; a v2's is 0): that id is mapped too, as a kernel idmapped mount maps it
(``cap_inode_getsecurity``, ``cap_convert_nscap``), so that a capability set in a container is
stored for the container's root, not for the host id that root is.

The named user and group entries of a POSIX ACL (``system.posix_acl_access``/``_default``) are
mapped both ways as a kernel idmapped mount maps them (``ovl_idmap_posix_acl`` on a read,
``vfs_set_acl`` through the layer's idmap on a set), in place (the kernel keeps the order).
Where the kernel and layerfs part: a stored entry outside every range reads as ``(uid_t)-1``
through the kernel, an entry that matches nobody, which FUSE cannot pass back (its
``posix_acl_from_xattr`` refuses an invalid id: the read would fail with EINVAL); it is left
out of the value shown, which then grants and refuses every caller what the kernel's does
(shown as the overflow id, it granted user 65534 the entry's permissions). A set entry
outside every range is refused with EINVAL, as the kernel refuses it.

The engine works in stored ids; the Overlay facade translates at its edge.
Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import dataclasses
import errno
import struct
from collections.abc import Sequence

from layerfs import acl
from layerfs.attrs import Attr, Caller
from layerfs.config import IdMapping, MountConfig

OVERFLOW_ID = 65534
NO_ID = 0xFFFF_FFFF  # (uid_t)-1: the kernel's FUSE makes it INVALID_UID, owned by nobody

# struct vfs_cap_data / vfs_ns_cap_data (linux/capability.h): magic_etc, 2 x (permitted,
# inheritable), and v3's rootid
_CAP_REVISION_MASK = 0xFF000000
_CAP_REVISION_2 = 0x02000000
_CAP_REVISION_3 = 0x03000000
_CAP_FLAGS_EFFECTIVE = 0x000001
_CAP_V2_SIZE, _CAP_V3_SIZE = 20, 24


def _cap_parts(value: bytes) -> tuple[int, bytes, int] | None:
    """(effective flag, the capability sets, root id) of a v2 or v3 VALUE; None otherwise."""
    if len(value) not in (_CAP_V2_SIZE, _CAP_V3_SIZE):
        return None
    (magic,) = struct.unpack_from("<I", value)
    revision = magic & _CAP_REVISION_MASK
    if len(value) == _CAP_V2_SIZE and revision == _CAP_REVISION_2:
        return magic & _CAP_FLAGS_EFFECTIVE, value[4:20], 0
    if len(value) == _CAP_V3_SIZE and revision == _CAP_REVISION_3:
        return magic & _CAP_FLAGS_EFFECTIVE, value[4:20], struct.unpack_from("<I", value, 20)[0]
    return None


def _unmapped(mappings: Sequence[IdMapping], stored: int) -> bool:
    """Whether MAPPINGS (not empty) map no range over STORED."""
    return bool(mappings) and not any(m.inner <= stored < m.inner + m.count for m in mappings)


def _shown(mappings: Sequence[IdMapping], stored: int) -> int:
    for m in mappings:
        if m.inner <= stored < m.inner + m.count:
            return m.outer + stored - m.inner
    return OVERFLOW_ID


def _stored_or_none(mappings: Sequence[IdMapping], shown: int) -> int | None:
    for m in mappings:
        if m.outer <= shown < m.outer + m.count:
            return m.inner + shown - m.outer
    return None


def _stored(mappings: Sequence[IdMapping], shown: int) -> int:
    stored = _stored_or_none(mappings, shown)
    return OVERFLOW_ID if stored is None else stored


@dataclasses.dataclass(frozen=True, slots=True)
class IdMap:
    uids: tuple[IdMapping, ...] = ()
    gids: tuple[IdMapping, ...] = ()
    squash_uid: int | None = None
    squash_gid: int | None = None

    @classmethod
    def of(cls, config: MountConfig) -> IdMap:
        return cls(config.uid_mappings, config.gid_mappings, config.squash_to_uid,
                   config.squash_to_gid)  # fmt: skip

    @property
    def active(self) -> bool:
        squash = self.squash_uid is not None or self.squash_gid is not None
        return bool(self.uids or self.gids) or squash

    def show_uid(self, stored: int) -> int:
        if self.squash_uid is not None:
            return self.squash_uid
        return _shown(self.uids, stored) if self.uids else stored

    def show_gid(self, stored: int) -> int:
        if self.squash_gid is not None:
            return self.squash_gid
        return _shown(self.gids, stored) if self.gids else stored

    def store_uid(self, shown: int) -> int:
        return _stored(self.uids, shown) if self.uids else shown

    def store_gid(self, shown: int) -> int:
        return _stored(self.gids, shown) if self.gids else shown

    def cap_shown(self, value: bytes) -> bytes:
        """A stored ``security.capability`` as the kernel reads it through an idmapped mount
        (cap_inode_getsecurity, a reader of the initial namespace): its root id shown through
        the mapping; a v2 if that is 0, else a v3 for that id. A root id no range maps is
        refused with EOVERFLOW, as the kernel refuses it (no id of the reader's namespace
        owns it); shown as the overflow id, it was valid in a namespace whose root is 65534."""
        parts = _cap_parts(value) if self.uids else None
        if parts is None:
            return value
        effective, sets, root = parts
        if _unmapped(self.uids, root):
            raise OSError(errno.EOVERFLOW, "capability of an unmapped root id")
        shown = _shown(self.uids, root)
        if shown == 0:
            return struct.pack("<I", _CAP_REVISION_2 | effective) + sets
        return struct.pack("<I", _CAP_REVISION_3 | effective) + sets + struct.pack("<I", shown)

    def cap_stored(self, value: bytes) -> bytes:
        """A ``security.capability`` set through the mount as the kernel stores it through an
        idmapped mount (cap_convert_nscap): always a v3, for the stored id of the root the
        writer named (a v2's: 0, the writer's own namespace's root); one for a root id no
        range maps is refused with EINVAL, as the kernel refuses it."""
        parts = _cap_parts(value) if self.uids else None
        if parts is None:
            return value
        effective, sets, root = parts
        stored = _stored_or_none(self.uids, root)
        if stored is None:
            raise OSError(errno.EINVAL, "capability for an unmapped root id")
        return struct.pack("<I", _CAP_REVISION_3 | effective) + sets + struct.pack("<I", stored)

    def _acl_entries(self, value: bytes) -> list[tuple[int, int, int]] | None:
        """VALUE's ACL entries when this mount maps ids and VALUE is an ACL; else None (the
        value passes as it is)."""
        if not (self.uids or self.gids):
            return None
        try:
            return acl.parse(value)
        except ValueError:
            return None

    def acl_shown(self, value: bytes) -> bytes:
        """A stored ACL xattr VALUE as the mount shows it: named entries' ids mapped, an
        entry for an id outside every range left out (it matches nobody, as the kernel's
        INVALID_UID entry; the mask stays, so the group class is cut as before); a value
        that is no ACL as it is."""
        entries = self._acl_entries(value)
        if entries is None:
            return value
        out = []
        for tag, perm, ident in entries:
            ranges = self.uids if tag == acl.USER else self.gids if tag == acl.GROUP else ()
            if not ranges:
                out.append((tag, perm, ident))
            elif not _unmapped(ranges, ident):
                out.append((tag, perm, _shown(ranges, ident)))
        return acl.serialise(out)

    def acl_stored(self, value: bytes) -> bytes:
        """An ACL xattr VALUE set through the mount as the layers keep it: named entries' ids
        mapped back. OSError EINVAL for an id outside every range, as a kernel idmapped
        mount refuses it (measured on 6.18: setxattr of such an ACL through kernel
        overlayfs over idmapped layers); a value that is no ACL is left to the upper."""
        entries = self._acl_entries(value)
        if entries is None:
            return value
        out = []
        for tag, perm, ident in entries:
            ranges = self.uids if tag == acl.USER else self.gids if tag == acl.GROUP else ()
            if ranges:
                stored = _stored_or_none(ranges, ident)
                if stored is None:
                    raise OSError(errno.EINVAL, "ACL entry for an id outside every mapping")
                ident = stored
            out.append((tag, perm, ident))
        return acl.serialise(out)

    def attr(self, a: Attr) -> Attr:
        """A as the mount shows it; an owner or group outside every range as ``(uid_t)-1``,
        which the kernel's FUSE takes as INVALID_UID (INVALID_GID), as a kernel idmapped
        mount shows such an id: stat shows the overflow id 65534, and nobody owns the file
        (the user whose id 65534 is gets the other bits; root no DAC override). Shown as a
        plain 65534, that user owned every such file (read, wrote, chmodded it)."""
        uid = self.show_uid(a.uid)
        if uid == OVERFLOW_ID and self.squash_uid is None and _unmapped(self.uids, a.uid):
            uid = NO_ID
        gid = self.show_gid(a.gid)
        if gid == OVERFLOW_ID and self.squash_gid is None and _unmapped(self.gids, a.gid):
            gid = NO_ID
        return a._replace(uid=uid, gid=gid)

    def caller(self, c: Caller) -> Caller:
        """C in stored ids: the owner its new objects get, the groups its checks use."""
        if not (self.uids or self.gids):
            return c
        return c._replace(
            uid=self.store_uid(c.uid),
            gid=self.store_gid(c.gid),
            # groups not read yet stay so: Caller.in_group maps them if it reads them
            groups=None if c.groups is None else frozenset(map(self.store_gid, c.groups)),
            store_gid=self.store_gid,
            privileged=c.keeps_priv,  # its own uid's, not the stored one's
        )

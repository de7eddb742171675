"""POSIX ACL inheritance for new objects, on the xattr form of an ACL.

With FUSE_POSIX_ACL the kernel enforces ACLs (read through GETXATTR of
``system.posix_acl_access`` and cached) but leaves the creation side to the filesystem: it
sends the requested mode unmasked with the caller's umask, and the new object must get its
parent's default ACL, as posix_acl_create does (fs/posix_acl.c). Upper objects are built in the
workdir, where the upper filesystem inherits nothing, so the ACLs are computed here.

A chmod and a setxattr of an ACL need nothing here: they reach the real upper inode, whose
filesystem keeps mode and ACL in step itself (posix_acl_chmod, posix_acl_update_mode).

Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import errno
import stat
import struct
from dataclasses import dataclass

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"

_VERSION = 2  # POSIX_ACL_XATTR_VERSION
_HEADER, _ENTRY = struct.Struct("<I"), struct.Struct("<HHI")
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def parse(value: bytes) -> list[tuple[int, int, int]]:
    """The (tag, perm, id) entries of an ACL in xattr form; ValueError if malformed."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise ValueError("bad ACL size")
    if _HEADER.unpack_from(value)[0] != _VERSION:
        raise ValueError("bad ACL version")
    return list(_ENTRY.iter_unpack(value[_HEADER.size :]))


def serialise(entries: list[tuple[int, int, int]]) -> bytes:
    return _HEADER.pack(_VERSION) + b"".join(_ENTRY.pack(*e) for e in entries)


def create_masq(
    entries: list[tuple[int, int, int]], mode: int
) -> tuple[list[tuple[int, int, int]], int, bool]:
    """posix_acl_create_masq: the default ACL ENTRIES cut down by the requested MODE.

    Return (the new object's access ACL, its mode, whether the ACL says more than the mode).
    """
    perms = mode & 0o777
    out = []
    not_equiv = False
    group_obj = mask = -1
    for i, (tag, perm, ident) in enumerate(entries):
        if tag == USER_OBJ:
            perm &= (perms >> 6) & 7
            perms &= (perm << 6) | ~0o700
        elif tag in (USER, GROUP):
            not_equiv = True
        elif tag == GROUP_OBJ:
            group_obj = i
        elif tag == OTHER:
            perm &= perms & 7
            perms &= perm | ~0o007
        elif tag == MASK:
            mask = i
            not_equiv = True
        else:
            raise ValueError("bad ACL tag")
        out.append((tag, perm, ident))
    which = mask if mask >= 0 else group_obj
    if which < 0:
        raise ValueError("ACL without a group entry")
    tag, perm, ident = out[which]
    perm &= (perms >> 3) & 7
    perms &= (perm << 3) | ~0o070
    out[which] = (tag, perm, ident)
    return out, (mode & ~0o777) | (perms & 0o777), not_equiv


@dataclass(frozen=True, slots=True)
class NewAcls:
    """What a new object gets: its mode, and the ACL xattrs to set on it (None: none)."""

    mode: int
    access: bytes | None = None
    default: bytes | None = None


def plain_mode(mode: int, umask: int) -> int:
    """``inherit(None, MODE, UMASK).mode``, without the NewAcls (a frozen dataclass: ~4k
    instructions a create compiled): a new object's mode where its directory has no default
    ACL. Symlinks take no umask."""
    return mode if stat.S_ISLNK(mode) else mode & ~umask


def inherit(parent_default: bytes | None, mode: int, umask: int) -> NewAcls:
    """The mode and ACLs of a new object of MODE (type bits included) created with UMASK in a
    directory whose default ACL is PARENT_DEFAULT (posix_acl_create). Symlinks take neither."""
    if stat.S_ISLNK(mode):
        return NewAcls(mode)
    try:
        entries = parse(parent_default) if parent_default is not None else []
        if not entries:  # none (an empty one reads as none too)
            return NewAcls(plain_mode(mode, umask))
        access, new_mode, not_equiv = create_masq(entries, mode)
    except ValueError:  # as the kernel's posix_acl_from_xattr: a bad ACL is an error
        raise OSError(errno.EIO, "malformed default ACL") from None
    return NewAcls(
        new_mode,
        serialise(access) if not_equiv else None,
        parent_default if stat.S_ISDIR(mode) else None,
    )

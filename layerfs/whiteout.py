"""The whiteout and opaque codec: every dialect read, the kernel's written.

Read, in any layer: a whiteout is a char device 0/0 (overlayfs), a ``.wh.NAME`` file (OCI/aufs),
or a zero-size regular file carrying an ``overlay.whiteout`` xattr. A directory is opaque with
``overlay.opaque=y`` (trusted or user), ``user.fuseoverlayfs.opaque``, or a ``.wh..wh..opq``
entry inside it. ``.wh.*`` names never appear in the merged view.

Kernel analogue: fs/overlayfs/util.c (ovl_is_whiteout, ovl_path_is_opaque...).
Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import stat

from layerfs import _sys, xattrs

WH_PREFIX = b".wh."
OPQ_MARKER = b".wh..wh..opq"


def is_chardev_whiteout(st_mode: int, st_rdev: int) -> bool:
    return stat.S_ISCHR(st_mode) and st_rdev == 0


def is_whiteout_at(dirfd: int, name: bytes, st_mode: int, st_rdev: int, st_size: int) -> bool:
    """True if the object NAME (already lstat'ed) is a whiteout in the kernel or xattr dialect."""
    if stat.S_ISCHR(st_mode):
        return st_rdev == 0
    if stat.S_ISREG(st_mode) and st_size == 0:
        return any(_sys.getxattr_at(dirfd, name, a) is not None for a in xattrs.WHITEOUT)
    return False


def redirect_of(dirfd: int, name: bytes) -> bytes | None:
    for attr in xattrs.REDIRECT:
        value = _sys.getxattr_at(dirfd, name, attr)
        if value:
            return value
    return None


def has_oci_whiteout(dirfd: int, name: bytes) -> bool:
    """True if DIRFD holds ``.wh.NAME`` (a name over 251 bytes cannot have one)."""
    if len(name) + len(WH_PREFIX) > 255:
        return False
    return _sys.lstat_at_or_none(dirfd, WH_PREFIX + name) is not None

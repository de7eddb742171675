"""Overlay-private xattr namespaces: which names are ours, and which the merged view shows.

Kernel analogue: fs/overlayfs/xattrs.c (ovl_is_private_xattr).
Must not import: pyfuse3, trio.
"""

from __future__ import annotations

PRIVATE_PREFIXES = (b"trusted.overlay.", b"user.overlay.", b"user.fuseoverlayfs.")

OPAQUE = (b"trusted.overlay.opaque", b"user.overlay.opaque", b"user.fuseoverlayfs.opaque")
WHITEOUT = (b"trusted.overlay.whiteout", b"user.overlay.whiteout")
REDIRECT = (b"trusted.overlay.redirect", b"user.overlay.redirect")

# What layerfs writes in the upper (trusted.*: the form kernel overlayfs reads by default).
OPAQUE_W = b"trusted.overlay.opaque"
REDIRECT_W = b"trusted.overlay.redirect"


def is_private(name: bytes) -> bool:
    """True for the overlay bookkeeping xattrs that never appear in the merged view."""
    return name.startswith(PRIVATE_PREFIXES)


def visible(names: list[bytes]) -> list[bytes]:
    return [n for n in names if not n.startswith(PRIVATE_PREFIXES)]


def copy_up_set(names: list[bytes]) -> list[bytes]:
    """The xattrs a copy-up carries over: everything the user could see (capabilities included)."""
    return visible(names)

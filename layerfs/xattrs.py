"""Overlay-private xattr namespaces: which names are ours, and which the merged view shows.

Kernel analogue: fs/overlayfs/xattrs.c (ovl_is_private_xattr).
Must not import: pyfuse3, trio.
"""

from __future__ import annotations

PRIVATE_PREFIXES = (b"trusted.overlay.", b"user.overlay.", b"user.fuseoverlayfs.")

OPAQUE = (b"trusted.overlay.opaque", b"user.overlay.opaque", b"user.fuseoverlayfs.opaque")
WHITEOUT = (b"trusted.overlay.whiteout", b"user.overlay.whiteout")
REDIRECT = (b"trusted.overlay.redirect", b"user.overlay.redirect")
METACOPY = (b"trusted.overlay.metacopy", b"user.overlay.metacopy")
METACOPY_SET = frozenset(METACOPY)

# What layerfs writes in the upper (trusted.*: the form kernel overlayfs reads by default).
OPAQUE_W = b"trusted.overlay.opaque"
REDIRECT_W = b"trusted.overlay.redirect"
METACOPY_W = b"trusted.overlay.metacopy"


# Escaping (kernel 6.7+, ovl_xattr_escape): a user's own "trusted.overlay.X" is stored in the
# upper as "trusted.overlay.overlay.X", and shown again without the extra "overlay.".
ESCAPE_PREFIX = b"trusted.overlay."
ESCAPED_PREFIX = b"trusted.overlay.overlay."


def to_real(name: bytes) -> bytes:
    """The name under which the user's xattr NAME is stored in a layer."""
    if name.startswith(ESCAPE_PREFIX):
        return ESCAPED_PREFIX + name[len(ESCAPE_PREFIX) :]
    return name


def to_user(real: bytes) -> bytes | None:
    """The name a layer's xattr REAL shows as, or None when it is overlay bookkeeping."""
    if real.startswith(ESCAPED_PREFIX):
        return ESCAPE_PREFIX + real[len(ESCAPED_PREFIX) :]
    if real.startswith(PRIVATE_PREFIXES):
        return None
    return real


def is_private(name: bytes) -> bool:
    """True for the overlay bookkeeping xattrs that never appear in the merged view."""
    return name.startswith(PRIVATE_PREFIXES)


def visible(names: list[bytes]) -> list[bytes]:
    """The user's names for a layer's xattrs REAL (bookkeeping dropped, escapes undone)."""
    return [u for u in map(to_user, names) if u is not None]


def copy_up_set(names: list[bytes]) -> list[bytes]:
    """The real xattrs a copy-up carries over: all the user can see (capabilities included),
    under their stored (escaped) names."""
    return [n for n in names if to_user(n) is not None]

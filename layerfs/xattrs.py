"""Overlay-private xattr namespaces: which names are ours, and which the merged view shows.

Kernel analogue: fs/overlayfs/xattrs.c (ovl_is_private_xattr).
Must not import: pyfuse3, trio.
"""

from __future__ import annotations

from dataclasses import dataclass

PRIVATE_PREFIXES = (b"trusted.overlay.", b"user.overlay.", b"user.fuseoverlayfs.")

OPAQUE = (b"trusted.overlay.opaque", b"user.overlay.opaque", b"user.fuseoverlayfs.opaque")
WHITEOUT = (b"trusted.overlay.whiteout", b"user.overlay.whiteout")
REDIRECT = (b"trusted.overlay.redirect", b"user.overlay.redirect")
METACOPY = (b"trusted.overlay.metacopy", b"user.overlay.metacopy")
METACOPY_SET = frozenset(METACOPY)

ORIGIN = (b"trusted.overlay.origin", b"user.overlay.origin")


@dataclass(frozen=True, slots=True)
class Names:
    """The overlay xattrs of one namespace: what layerfs writes in the upper (and escapes).

    ``trusted.overlay.*`` by default, as kernel overlayfs; ``user.overlay.*`` with ``userxattr``
    (kernel ``-o userxattr``), the only form a user namespace may write: ``trusted.*`` needs
    CAP_SYS_ADMIN in the initial one. Both namespaces are always read.
    """

    prefix: bytes

    @property
    def opaque(self) -> bytes:
        return self.prefix + b"opaque"

    @property
    def redirect(self) -> bytes:
        return self.prefix + b"redirect"

    @property
    def metacopy(self) -> bytes:
        return self.prefix + b"metacopy"

    @property
    def whiteout(self) -> bytes:
        return self.prefix + b"whiteout"

    @property
    def origin(self) -> bytes:
        return self.prefix + b"origin"

    @property
    def impure(self) -> bytes:
        return self.prefix + b"impure"

    @property
    def escaped(self) -> bytes:
        """Where a user's own ``PREFIX.X`` is stored (kernel 6.7+, ovl_xattr_escape)."""
        return self.prefix + b"overlay."


TRUSTED = Names(b"trusted.overlay.")
USER = Names(b"user.overlay.")


def names_for(userxattr: bool) -> Names:
    return USER if userxattr else TRUSTED


# What layerfs writes in the upper by default (the store's extraction writes these too).
OPAQUE_W = TRUSTED.opaque
REDIRECT_W = TRUSTED.redirect
METACOPY_W = TRUSTED.metacopy

# Escaping (kernel 6.7+, ovl_xattr_escape): a user's own "trusted.overlay.X" is stored in the
# upper as "trusted.overlay.overlay.X", and shown again without the extra "overlay."; with
# userxattr the same holds for "user.overlay.X" (and "trusted.overlay.X" is the user's own,
# stored as is: kernel ovl_is_escaped_xattr/ovl_is_own_xattr look at one namespace only).
ESCAPE_PREFIX = TRUSTED.prefix
ESCAPED_PREFIX = TRUSTED.escaped


def to_real(name: bytes, names: Names = TRUSTED) -> bytes:
    """The name under which the user's xattr NAME is stored in a layer written with NAMES."""
    if name.startswith(names.prefix):
        return names.escaped + name[len(names.prefix) :]
    return name


def to_user(real: bytes) -> bytes | None:
    """The name a layer's xattr REAL shows as, or None when it is overlay bookkeeping.

    Escaped names of both namespaces are undone: layerfs reads both, whichever it writes.
    """
    for ns in (TRUSTED, USER):
        if real.startswith(ns.escaped):
            return ns.prefix + real[len(ns.escaped) :]
    if real.startswith(PRIVATE_PREFIXES):
        return None
    return real


def user_may_name(name: bytes, names: Names = TRUSTED) -> bool:
    """True unless NAME is overlay bookkeeping the user cannot get or set on a mount written
    with NAMES: the other namespace's overlay xattrs and fuse-overlayfs' (its own escape)."""
    return not is_private(name) or name.startswith(names.prefix)


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

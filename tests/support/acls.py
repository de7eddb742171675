"""POSIX ACLs in their xattr form (linux/posix_acl_xattr.h), written and read by the tests.

Independent of ``layerfs.acl``, the code under test: a version word (2), then one
``(tag, perm, id)`` entry of 8 bytes each. ``acl("u::rw,u:1000:r,g::r,m::rw,o::")`` spells
one as ``setfacl`` does (the entries in the order given: the kernel keeps the order of a
mapped ACL, so specs write them in the order the kernel checks).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

ACCESS, DEFAULT = b"system.posix_acl_access", b"system.posix_acl_default"
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF  # ACL_UNDEFINED_ID: the id of the entries that name none

Entry = tuple[int, int, int]
_TAGS = {("u", False): USER_OBJ, ("u", True): USER, ("g", False): GROUP_OBJ,
         ("g", True): GROUP, ("m", False): MASK, ("o", False): OTHER}  # fmt: skip
_LETTERS = {v: k[0] for k, v in _TAGS.items()}


def _perm(text: str) -> int:
    return (4 if "r" in text else 0) | (2 if "w" in text else 0) | (1 if "x" in text else 0)


def entries(text: str) -> list[Entry]:
    """``u::rw,u:1000:r,g::r,g:50:rx,m::rw,o::`` as (tag, perm, id) entries."""
    out = []
    for part in text.split(","):
        letter, ident, perm = part.split(":")
        tag = _TAGS[(letter, bool(ident))]
        out.append((tag, _perm(perm), int(ident) if ident else UNDEFINED_ID))
    return out


def encode(ents: Sequence[Entry]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in ents)


def acl(text: str) -> bytes:
    """TEXT (see ``entries``) as an xattr value."""
    return encode(entries(text))


def decode(value: bytes) -> str:
    """An xattr value as ``entries`` spells it (ids as numbers, as ``getfacl -n``); a value
    that is no ACL as its bytes."""
    body = value[4:]
    if len(value) < 4 or struct.unpack_from("<I", value)[0] != 2 or len(body) % 8:
        return repr(value)
    parts = []
    for tag, perm, ident in struct.iter_unpack("<HHI", body):
        letter = _LETTERS.get(tag, f"?{tag}")
        who = str(ident) if tag in (USER, GROUP) else ("" if ident == UNDEFINED_ID else f"!{ident}")
        rwx = "".join(c if perm & b else "-" for c, b in (("r", 4), ("w", 2), ("x", 1)))
        parts.append(f"{letter}:{who}:{rwx}")
    return ",".join(parts)

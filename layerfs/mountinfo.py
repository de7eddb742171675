"""The mount table of this mount namespace (/proc/self/mountinfo), read as bytes.

One reader for the places that ask it: ``layerfs umount`` (is it a layerfs mount?), the
daemon (its mount's device, for the readahead), the store (is an upper still mounted?), the
fork server (where the cgroup hierarchies are), and the tests' and benchmarks' mount hygiene.

Must not import: pyfuse3, trio, logging (``layerfs umount`` stays light).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

_ESCAPE = re.compile(rb"\\([0-7]{3})")


class Mount(NamedTuple):
    """One entry: DEV (``major:minor``), POINT (unescaped), FSTYPE, and SUPER_OPTIONS as the
    table has them (split on ``,``, then unescape each value)."""

    dev: bytes
    point: bytes
    fstype: bytes
    super_options: bytes


def unescape(field: bytes) -> bytes:
    """Undo the table's octal escapes (space, tab, newline, backslash)."""
    return _ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), field)


def mounts(table: str = "/proc/self/mountinfo") -> Iterator[Mount]:
    """The table's entries in order (of two on one point, the later is on top). OSError when
    the table cannot be read. TABLE: another namespace's, as /proc/PID/mountinfo."""
    with open(table, "rb") as fh:
        for line in fh:
            head, sep, tail = line.partition(b" - ")
            fields, rest = head.split(), tail.split()
            if not sep or len(fields) < 5 or not rest:
                continue
            yield Mount(fields[2], unescape(fields[4]), rest[0], rest[2] if len(rest) > 2 else b"")

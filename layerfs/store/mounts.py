"""Which live mounts use an upper directory (so that ``commit`` can refuse a running one).

Kernel overlayfs shows ``upperdir=`` in its super options in ``/proc/self/mountinfo``; a
FUSE mount (layerfs) does not, so an upper mounted by ``layerfs mount --image`` is found by
the merged directory its record names.

Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import os


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \\ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_using(upper: str, merged: str | None = None) -> list[str]:
    """Mount points of live mounts whose upper is ``upper`` (kernel overlayfs), or FUSE
    mounts on ``merged`` (the mount point a ``layerfs mount --image`` recorded)."""
    upper = os.path.realpath(upper)
    merged = os.path.realpath(merged) if merged else None
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(rest) < 3:
            continue
        point, fstype, opts = _unescape(fields[4]), rest[0], rest[2]
        uppers = [_unescape(o[9:]) for o in opts.split(",") if o.startswith("upperdir=")]
        fuse_on_merged = fstype.startswith("fuse") and point == merged
        if (fstype == "overlay" and upper in uppers) or fuse_on_merged:
            found.append(point)
    return found

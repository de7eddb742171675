"""Which live mounts use an upper directory (so that ``commit`` can refuse a running one).

Kernel overlayfs shows ``upperdir=`` in its super options in ``/proc/self/mountinfo``; a
FUSE mount (layerfs) does not, so an upper mounted by ``layerfs mount --image`` is found by
the merged directory its record names.

Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import os

from layerfs import mountinfo


def mounts_using(upper: str, merged: str | None = None) -> list[str]:
    """Mount points of live mounts whose upper is ``upper`` (kernel overlayfs), or FUSE
    mounts on ``merged`` (the mount point a ``layerfs mount --image`` recorded)."""
    upper = os.path.realpath(upper)
    merged = os.path.realpath(merged) if merged else None
    found = []
    try:
        table = list(mountinfo.mounts())
    except OSError:
        return []
    for m in table:
        point = os.fsdecode(m.point)
        opts = m.super_options.split(b",")
        uppers = [
            os.fsdecode(mountinfo.unescape(o[9:])) for o in opts if o.startswith(b"upperdir=")
        ]
        fuse_on_merged = m.fstype.startswith(b"fuse") and point == merged
        if (m.fstype == b"overlay" and upper in uppers) or fuse_on_merged:
            found.append(point)
    return found

"""Big READs of cached data are served on the trio thread (layerfs.files: Files.read).

A READ of files.BIG_IO bytes or more used to go to a worker thread, so that a read waiting
for the disk would not hold up the other requests. From the page cache the hop cost more than
the read (~0.4 ms against ~0.1 ms a MiB), and a new daemon's first one started the thread:
2.6 ms of the first READ of a container start. Now only a read whose data is not all in the
page cache (cachestat(2)) goes to a thread, counted as ``reads_on_thread`` in the daemon's
statistics; the data read is the same either way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support.mounts import Layout, subject_named

from layerfs import _sys, files

pytestmark = pytest.mark.fuse

BIG = 3 * files.BIG_IO + 4096 + 17  # several big READs, the last one short (the file's end)


def _on_thread(mnt: Path) -> int:
    stats: dict[str, int] = json.loads(os.getxattr(mnt, "trusted.layerfs.statistics"))
    return stats["reads_on_thread"]


def _evict(path: Path) -> None:
    """Drop PATH's clean pages from the page cache (written back first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_direct(path: Path) -> bytes:
    """PATH's bytes, read in big requests: FUSE's page cache for the file dropped first."""
    _evict(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _is_cached(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _sys.cached(fd, 0, path.stat().st_size)
    finally:
        os.close(fd)


def test_cached_reads_stay_on_the_trio_thread(tmp_path: Path) -> None:
    layout = Layout.create(tmp_path / "fs", 1)
    lower = layout.lowers[0] / "big"
    data = os.urandom(BIG)
    lower.write_bytes(data)
    if not _is_cached(lower):
        pytest.skip("cachestat(2) does not answer here (Linux 6.5+)")
    with layout.mount(subject_named("layerfs")) as m:
        assert _read_direct(m.mnt / "big") == data  # the lower file is in the page cache
        assert _on_thread(m.mnt) == 0
        _evict(lower)
        assert not _is_cached(lower)
        assert _read_direct(m.mnt / "big") == data  # from the disk: on a worker thread
        assert _on_thread(m.mnt) >= 1

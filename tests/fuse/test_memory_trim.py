"""The daemon gives back the memory of big I/O once it stops (layerfs.files: Files._big_io_done).

A READ or WRITE of files.BIG_IO bytes or more (on a worker thread, or for a READ of cached
data on the trio thread) leaves glibc holding the buffer's memory for later allocations (1 MiB
a READ, in that thread's malloc arena) unless told to trim. The daemon trims once big I/O
has stopped for files.TRIM_AFTER and counts it (``memory_trims`` in its statistics); small I/O
never does; nor does a WRITE the compiled raw path answers (LAYERFS_LOOP=craw: written from
its request buffer, no Python buffer made). What a trim gives back is measured in the
benchmarks (the ``pss`` row), not here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from support.mounts import Layout, subject_named

from layerfs import files, fusehooks, ops

pytestmark = pytest.mark.fuse

WATCHDOG = 60.0  # seconds for a trim that is due 0.1 s after the I/O (a loaded host)
BIG = 2 << 20  # read and written in requests of files.BIG_IO or more


def _stats(mnt: Path) -> dict[str, int]:
    return dict(json.loads(os.getxattr(mnt, "trusted.layerfs.statistics")))


def _trims(mnt: Path) -> int:
    return _stats(mnt)["memory_trims"]


def _in_c() -> bool:
    """Whether a WRITE pyfuse3 would not wait on is answered in C (LAYERFS_LOOP=craw, built)."""
    loop = os.environ.get("LAYERFS_LOOP") or ops.DEFAULT_LOOP
    return loop == "craw" and fusehooks.craw_module() is not None


def _wait_for_trims(mnt: Path, n: int) -> int:
    deadline = time.monotonic() + WATCHDOG
    while (got := _trims(mnt)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def test_trims_after_big_io_only(tmp_path: Path) -> None:
    assert BIG >= 2 * files.BIG_IO
    layout = Layout.create(tmp_path / "fs", 1)
    (layout.lowers[0] / "small").write_bytes(b"s" * 4096)
    (layout.lowers[0] / "big").write_bytes(bytes(range(256)) * (BIG // 256))
    with layout.mount(subject_named("layerfs")) as m:
        assert (m.mnt / "small").read_bytes() == b"s" * 4096
        with open(m.mnt / "small", "ab") as f:
            f.write(b"t" * 4096)
        time.sleep(10 * files.TRIM_AFTER)
        assert _trims(m.mnt) == 0  # small reads and writes: nothing kept, nothing to trim
        assert (m.mnt / "big").read_bytes() == bytes(range(256)) * (BIG // 256)
        after_read = _wait_for_trims(m.mnt, 1)
        assert after_read >= 1  # one per pause: a loaded host may pause between the READs
        threaded = _stats(m.mnt)["writes_on_thread"]
        fd = os.open(m.mnt / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            assert os.write(fd, b"w" * BIG) == BIG  # one big WRITE or more
        finally:
            os.close(fd)
        if _in_c() and _stats(m.mnt)["writes_on_thread"] == threaded:
            # answered by the compiled raw path from its request buffer: no Python buffer
            # was made, nothing to give back
            time.sleep(10 * files.TRIM_AFTER)
            assert _trims(m.mnt) == after_read
        else:
            assert _wait_for_trims(m.mnt, after_read + 1) > after_read
        assert (m.mnt / "new").read_bytes() == b"w" * BIG

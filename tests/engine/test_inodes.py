"""Engine tier: the inode table on real directories (no FUSE)."""

from __future__ import annotations

import sys
from pathlib import Path

from layerfs.inodes import ROOT_ID

from ._stack import make_stack, overlay


def test_forget_gives_the_tables_back(tmp_path: Path) -> None:
    """Once the kernel forgot most nodes, the id and identity maps shrink: a dict keeps its
    table at its peak size otherwise (a million nodes: two tables of ~40 MB)."""
    low, up, work, mnt = make_stack(tmp_path)
    for i in range(20_000):
        (low / f"f{i}").touch()
    ov = overlay(low, up, work, mnt)
    try:
        ids = [ov.lookup(ROOT_ID, b"f%d" % i).id for i in range(20_000)]
        peak = sys.getsizeof(ov.table.nodes) + sys.getsizeof(ov.table._by_key)
        ov.forget([(i, 1) for i in ids[:19_000]])
        after = sys.getsizeof(ov.table.nodes) + sys.getsizeof(ov.table._by_key)
        assert len(ov.table.nodes) == 1_001  # the root and the 1,000 not forgotten
        assert after < peak / 4, (peak, after)
        # the survivors are still found by id and by identity
        for i in range(19_000, 20_000):
            node = ov.table.get(ids[i])
            assert ov.table.find(node.key) is node
            assert ov.lookup(ROOT_ID, b"f%d" % i).id == ids[i]
    finally:
        ov.close()

"""Engine tier: the inode table on real directories (no FUSE)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from layerfs._sys import RENAME_EXCHANGE
from layerfs.attrs import Caller
from layerfs.inodes import ROOT_ID
from layerfs.overlay import Overlay

from ._stack import make_stack, overlay

ROOT = Caller(0, 0, 0o022, 1)


def listing(ov: Overlay, ino: int) -> list[bytes]:
    """Read directory INO to the end, as the kernel does, counting the lookups it takes."""
    fh = ov.opendir(ino)
    try:
        names = []
        for name, node, _attr, _next in ov.readdir(fh, 0):
            if node is not None and name not in (b".", b".."):
                node.nlookup += 1
            names.append(name)
        return sorted(names)
    finally:
        ov.releasedir(fh)


def forget_dir(ov: Overlay, ino: int) -> None:
    """Forget directory INO and every child the kernel holds, children first."""
    children = [n for n in ov.table.nodes.values() if n.parent is ov.table.get(ino)]
    ov.forget([(n.id, n.nlookup) for n in children] + [(ino, ov.table.get(ino).nlookup)])


def test_forget_gives_the_tables_back(tmp_path: Path) -> None:
    """Once the kernel forgot most nodes, the id and identity maps shrink: a dict keeps its
    table at its peak size otherwise (a million nodes: two tables of ~40 MB)."""
    low, up, work, mnt = make_stack(tmp_path)
    for i in range(20_000):
        (low / f"f{i}").touch()
    ov = overlay(low, up, work, mnt)
    try:
        ids = [ov.lookup(ROOT_ID, b"f%d" % i).id for i in range(20_000)]
        peak = sys.getsizeof(ov.table.nodes) + sys.getsizeof(ov.table._others)
        ov.forget([(i, 1) for i in ids[:19_000]])
        after = sys.getsizeof(ov.table.nodes) + sys.getsizeof(ov.table._others)
        assert len(ov.table.nodes) == 1_001  # the root and the 1,000 not forgotten
        assert after < peak / 4, (peak, after)
        # the survivors are still found by id and by identity
        for i in range(19_000, 20_000):
            node = ov.table.get(ids[i])
            assert ov.table.find(node.key) is node
            assert ov.lookup(ROOT_ID, b"f%d" % i).id == ids[i]
    finally:
        ov.close()


async def test_forgotten_directory_lists_afresh(tmp_path: Path) -> None:
    """A directory forgotten and looked up again may get its node id back; a listing cached
    under that id before must not be served for it (its versions start over)."""
    low, up, work, mnt = make_stack(tmp_path)
    (low / "d").mkdir()
    (low / "d" / "a").touch()
    ov = overlay(low, up, work, mnt)
    try:
        d = ov.lookup(ROOT_ID, b"d").id
        fh, _ = await ov.create(d, b"new", 0o100644, os.O_WRONLY, ROOT)
        ov.release(fh)
        assert listing(ov, d) == [b".", b"..", b"a", b"new"]
        listing(ov, d)  # the second listing may come from the cache
        forget_dir(ov, d)
        d = ov.lookup(ROOT_ID, b"d").id
        await ov.unlink(d, b"new")
        assert listing(ov, d) == sorted([b".", b"..", *os.listdir(bytes(low / "d"))])
    finally:
        ov.close()


async def test_exchanged_new_directory_hides_the_lowers(tmp_path: Path) -> None:
    """A directory made in a new (pure upper) one is not opaque; exchanged with a lower
    directory of another parent, it lands where the lowers hold its new name. ovl_rename
    marks it opaque; unmarked, it merged those lowers and shared its lower origin (and node)
    with the redirected directory that left: fsstress saw the node moved under itself (a
    cycle of parents; now ESTALE) and listings whose entries then failed lstat."""
    low, up, work, mnt = make_stack(tmp_path)
    (low / "usr" / "lib").mkdir(parents=True)
    (low / "usr" / "lib" / "libc.so").touch()
    ov = overlay(low, up, work, mnt)
    try:
        await ov.mkdir(ROOT_ID, b"new", 0o755, ROOT)
        new_id = ov.lookup(ROOT_ID, b"new").id
        await ov.mkdir(new_id, b"sub", 0o755, ROOT)
        fh, _ = await ov.create(ov.lookup(new_id, b"sub").id, b"f", 0o100644, os.O_WRONLY, ROOT)
        ov.release(fh)
        await ov.rename(new_id, b"sub", ROOT_ID, b"usr", RENAME_EXCHANGE)
        moved = ov.lookup(new_id, b"sub")  # the lower usr, redirected
        usr = ov.lookup(ROOT_ID, b"usr")  # the new directory
        assert moved.id != usr.id and moved.ino != usr.ino
        assert listing(ov, usr.id) == [b".", b"..", b"f"]
        assert listing(ov, moved.id) == [b".", b"..", b"lib"]
        assert ov.lookup(ov.lookup(moved.id, b"lib").id, b"libc.so")
        assert ov.table.get(moved.id).path() == (b"new", b"sub")
        assert ov.table.get(usr.id).path() == (b"usr",)
    finally:
        ov.close()

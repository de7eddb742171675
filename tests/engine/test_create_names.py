"""Engine tier: a new name checked free and placed from one look at the upper
(Namespace._free_name): over each kind of whiteout, taken names, and names whose lookup fails."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio

from layerfs.config import MountConfig
from layerfs.inodes import ROOT_ID
from layerfs.overlay import Overlay

from ._stack import make_stack, overlay
from .test_copyup import ROOT, check_upper

REG = stat.S_IFREG | 0o644


def _mknod(ov: Overlay, name: bytes) -> None:
    trio.run(ov.mknod, ROOT_ID, name, REG, 0, ROOT)


@pytest.mark.parametrize("oci", [False, True], ids=["char-whiteout", "wh-file"])
def test_create_over_a_whiteout(tmp_path: Path, oci: bool) -> None:
    """A name removed from a lower is free again: the new file replaces the whiteout (char
    0/0 by exchange, or ``.wh.NAME`` removed after), and shows the new object."""
    low, up, work, mnt = make_stack(tmp_path)
    (low / "n").write_text("lower\n")
    (low / "d").mkdir()
    (low / "d" / "x").write_text("x\n")
    ov = overlay(low, up, work, mnt)
    try:
        ov.ns.mknod_whiteouts = not oci
        for name in (b"n", b"d"):
            if name == b"d":
                trio.run(ov.unlink, ov.lookup(ROOT_ID, b"d").id, b"x")
                trio.run(ov.rmdir, ROOT_ID, b"d")
            else:
                trio.run(ov.unlink, ROOT_ID, b"n")
            with pytest.raises(FileNotFoundError):
                ov.lookup(ROOT_ID, name)
        _mknod(ov, b"n")
        attr = trio.run(ov.mkdir, ROOT_ID, b"d", 0o755, ROOT)
        assert stat.S_ISREG(os.lstat(up / "n").st_mode)
        assert not (up / ".wh.n").exists() and not (up / ".wh.d").exists()
        assert stat.S_ISREG(ov.lookup(ROOT_ID, b"n").mode)
        assert stat.S_ISDIR(attr.mode)
        assert os.listdir(up / "d") == []  # opaque: the lower's x stays hidden
        d = ov.lookup(ROOT_ID, b"d").id
        with pytest.raises(FileNotFoundError):
            ov.lookup(d, b"x")
        check_upper(up, work)
    finally:
        ov.close()


def test_taken_names(tmp_path: Path) -> None:
    """EEXIST for a name in the upper or in a lower; a name that only a lower below a lower
    whiteout has is free."""
    root = tmp_path
    top, bottom, up, work, mnt = (root / n for n in ("top", "bottom", "upper", "work", "mnt"))
    for p in (top, bottom, up, work, mnt):
        p.mkdir()
    (bottom / "hidden").write_text("b\n")
    os.mknod(top / "hidden", stat.S_IFCHR, 0)  # a whiteout in the upper lower layer
    (bottom / "low").write_text("b\n")
    (up / "upper").write_text("u\n")
    cfg = MountConfig(
        lowers=(str(top), str(bottom)), upper=str(up), workdir=str(work), mountpoint=str(mnt)
    )
    ov = Overlay(cfg.validate())
    try:
        for name in (b"low", b"upper"):
            with pytest.raises(FileExistsError):
                _mknod(ov, name)
        _mknod(ov, b"hidden")
        assert stat.S_ISREG(os.lstat(up / "hidden").st_mode)
        assert ov.lookup(ROOT_ID, b"hidden").size == 0
        check_upper(up, work)
    finally:
        ov.close()


def test_a_name_whose_lookup_fails_answers_the_lookups_error(tmp_path: Path) -> None:
    """A name whose lookup fails (a metacopy upper file on a metacopy=off mount: EPERM, as
    the kernel refuses to follow it) is not EEXIST to a create, as the kernel looks up first."""
    low, up, work, mnt = make_stack(tmp_path)
    (low / "m").write_text("data\n")
    (up / "m").write_bytes(b"")
    os.setxattr(up / "m", "trusted.overlay.metacopy", b"")
    ov = overlay(low, up, work, mnt)
    try:
        with pytest.raises(PermissionError):
            ov.lookup(ROOT_ID, b"m")
        with pytest.raises(PermissionError):
            _mknod(ov, b"m")
    finally:
        ov.close()


def test_oci_whiteouts_written_after_mknod_is_refused_still_hide(tmp_path: Path) -> None:
    """A directory this mount made (a copy-up, a mkdir) holds no ``.wh.NAME``, so its failed
    lookups do not look for one (Node.no_oci_whiteouts); once the upper refuses mknod and
    whiteouts become ``.wh.NAME`` files, that no longer holds: they hide what they remove."""
    low, up, work, mnt = make_stack(tmp_path)
    (low / "d").mkdir()
    (low / "d" / "x").write_text("lower\n")
    ov = overlay(low, up, work, mnt)
    try:
        d = ov.lookup(ROOT_ID, b"d").id
        trio.run(ov.mknod, d, b"new", REG, 0, ROOT)  # copies d up
        trio.run(ov.mkdir, ROOT_ID, b"made", 0o755, ROOT)
        made = ov.lookup(ROOT_ID, b"made").id
        assert ov.table.get(d).no_oci_whiteouts and ov.table.get(made).no_oci_whiteouts
        ov.ns.mknod_whiteouts = False  # as when the upper refuses mknod
        assert not ov.table.get(d).no_oci_whiteouts
        trio.run(ov.unlink, d, b"x")
        assert os.path.exists(up / "d" / ".wh.x")
        with pytest.raises(FileNotFoundError):
            ov.lookup(d, b"x")
        trio.run(ov.mknod, d, b"x", REG, 0, ROOT)  # over the .wh.x: it goes
        assert not os.path.exists(up / "d" / ".wh.x")
        assert ov.lookup(d, b"x").size == 0
        trio.run(ov.mkdir, ROOT_ID, b"later", 0o755, ROOT)
        assert not ov.table.get(ov.lookup(ROOT_ID, b"later").id).no_oci_whiteouts
        check_upper(up, work)
    finally:
        ov.close()

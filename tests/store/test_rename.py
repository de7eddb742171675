"""Renamed directories: an upper with overlay redirects (kernel overlayfs ``redirect_dir=on``,
and layerfs, which writes them the same way) commits to a layer that mounts back to the tree
the container saw."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.mounts import layerfs_available, mount_kernel, mount_layerfs

from layerfs.store.commit import commit
from layerfs.store.diff import changes
from layerfs.store.store import Store
from store.ocitools import E, snapshot, write_image

pytestmark = pytest.mark.kernel_overlay

BASE = [
    [
        E("usr", "d", mode=0o755),
        E("usr/bin", "d", mode=0o755),
        E("usr/bin/a", data=b"a", mode=0o755),
        E("usr/bin/b", data=b"b"),
        E("usr/bin/sub", "d", mode=0o750, uid=5),
        E("usr/bin/sub/deep", data=b"deep"),
        E("var", "d", mode=0o755),
        E("var/cache", "d"),
        E("var/cache/x", data=b"x"),
        E("var/cache/sub", "d", mode=0o700),
        E("var/cache/sub/z", data=b"z"),
    ],
    [E("usr/bin/c", data=b"c from layer 2"), E("usr/bin/.wh.b"), E("var/cache/y", data=b"y")],
]

MOUNTERS = {"kernel": mount_kernel, "layerfs": mount_layerfs}


@pytest.fixture(params=sorted(MOUNTERS))
def mounter(request: pytest.FixtureRequest) -> str:
    if request.param == "layerfs" and (
        (why := layerfs_available()) or not os.path.exists("/dev/fuse")
    ):
        pytest.skip(why or "no /dev/fuse")
    return str(request.param)


def _rename_things(m: Path) -> None:
    os.rename(m / "usr/bin", m / "usr/tools")  # relative redirect
    (m / "usr/tools/a").write_bytes(b"changed a")
    (m / "usr/tools/c").unlink()
    (m / "usr/tools/sub/new").write_bytes(b"new in renamed subtree")
    os.rename(m / "var/cache", m / "moved")  # absolute redirect (another parent)
    (m / "usr/bin").mkdir()  # a new directory where the old one was
    (m / "usr/bin/fresh").write_bytes(b"fresh")


def test_commit_renamed_directories(store: Store, tmp_path: Path, mounter: str) -> None:
    write_image(tmp_path / "layout", BASE, tag="base")
    store.import_layout(str(tmp_path / "layout"))
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    with MOUNTERS[mounter](store.lowers("base"), upper, work, mnt):
        _rename_things(mnt)
        expected = snapshot(mnt)
    assert "usr/tools/sub/deep" in expected and "moved/x" in expected
    assert "usr/bin/a" not in expected and "var/cache" not in expected
    # The point of the test: the renames left redirects in the upper.
    for renamed in ("usr/tools", "moved"):
        assert any(x.endswith("overlay.redirect") for x in os.listxattr(upper / renamed))

    lines = {str(c) for c in changes(str(upper), store.lowers("base"))}
    assert {"A /usr/tools", "D /var/cache", "A /moved", "A /usr/tools/sub/new"} <= lines
    # Every name below a renamed directory is new, from the upper or from the lower part:
    # all are A, as podman diff and a tree comparison have them.
    for top in ("usr/tools", "moved"):
        below = {f"A /{p}" for p in expected if p.startswith(top + "/")}
        assert below <= lines, below - lines
        assert {x for x in lines if x[2:].startswith(f"/{top}/")} == below

    commit(store, str(upper), "base", ("renamed",))
    ro = tmp_path / "ro"
    ro.mkdir()
    with mount_kernel(store.lowers("renamed"), None, None, ro):
        assert snapshot(ro) == expected


def test_diff_directory_renamed_onto_removed_directory(
    store: Store, tmp_path: Path, mounter: str
) -> None:
    """A directory renamed onto the name of a removed lower directory: every name below it is
    A, also a lower subdirectory whose name the removed directory never had (it was listed
    C, the parent of its own added children: found by the commit property test)."""
    write_image(tmp_path / "layout", BASE, tag="base")
    store.import_layout(str(tmp_path / "layout"))
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    with MOUNTERS[mounter](store.lowers("base"), upper, work, mnt):
        before = snapshot(mnt)
        for p in ("usr/bin/sub/deep", "usr/bin/sub", "usr/bin/a", "usr/bin/c"):
            (os.rmdir if p.endswith("sub") else os.unlink)(mnt / p)
        os.rmdir(mnt / "usr/bin")
        os.rename(mnt / "var/cache", mnt / "usr/bin")
        expected = snapshot(mnt)
    assert "usr/bin/sub/z" in expected and "usr/bin/sub/z" not in before
    assert any(x.endswith("overlay.redirect") for x in os.listxattr(upper / "usr/bin"))

    lines = {str(c) for c in changes(str(upper), store.lowers("base"))}
    below = {f"A /{p}" for p in expected if p.startswith("usr/bin/")}
    assert {x for x in lines if x[2:].startswith("/usr/bin/")} == below
    assert {"A /usr/bin", "D /var/cache", "C /usr"} <= lines

    commit(store, str(upper), "base", ("renamed",))
    ro = tmp_path / "ro"
    ro.mkdir()
    with mount_kernel(store.lowers("renamed"), None, None, ro):
        assert snapshot(ro) == expected

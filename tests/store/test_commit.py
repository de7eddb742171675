"""Commit and diff: an upper written by kernel overlayfs becomes a layer that mounts back to
the same tree, and ``diff`` lists exactly the changes made."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import pytest

from layerfs.errors import LayerfsError
from layerfs.store import cli
from layerfs.store.commit import commit, write_layer_blob
from layerfs.store.diff import changes
from layerfs.store.store import Store
from store.ocitools import E, snapshot, write_image
from store.overlay import kernel_overlay

BASE = [
    [
        E("etc", "d", mode=0o755),
        E("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"),
        E("etc/hosts", data=b"127.0.0.1 localhost\n"),
        E("var", "d", mode=0o755),
        E("var/cache", "d", mode=0o755),
        E("var/cache/a", data=b"a"),
        E("var/cache/b", data=b"b"),
        E("usr", "d", mode=0o755),
        E("usr/bin", "d", mode=0o755),
        E("usr/bin/tool", data=b"#!/bin/sh\n", mode=0o755),
        E("usr/bin/tool2", "h", link="usr/bin/tool"),
    ],
    [E("etc/hosts", data=b"127.0.0.1 localhost base2\n"), E("opt", "d"), E("opt/x", data=b"x")],
]


def _make_changes(merged: Path) -> None:
    (merged / "etc/passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/:\n")
    (merged / "etc/hosts").unlink()
    shutil.rmtree(merged / "var/cache")
    (merged / "var/cache").mkdir()  # now opaque in the upper
    (merged / "var/cache/c").write_bytes(b"c")
    (merged / "new").mkdir()
    (merged / "new/file").write_bytes(os.urandom(100000))
    os.link(merged / "new/file", merged / "new/hardlink")
    os.symlink("../etc/passwd", merged / "new/sym")
    os.chmod(merged / "usr/bin/tool", 0o700)
    os.setxattr(merged / "new/file", "user.note", b"kept")
    os.mkfifo(merged / "new/fifo")
    shutil.rmtree(merged / "opt")


pytestmark = pytest.mark.kernel_overlay


def test_commit_round_trip_and_diff(store: Store, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_image(layout, BASE, tag="base")
    store.import_layout(str(layout))
    upper, work = tmp_path / "upper", tmp_path / "work"
    with kernel_overlay(store.lowers("base"), tmp_path / "m1", upper, work) as merged:
        _make_changes(merged)
        expected = snapshot(merged)

    got = {str(c) for c in changes(str(upper), store.lowers("base"))}
    assert got == {
        "C /etc",
        "C /etc/passwd",
        "D /etc/hosts",
        "C /var",
        "D /var/cache",  # replaced by a new (opaque) directory, as podman diff says
        "A /var/cache/c",
        "A /new",
        "A /new/file",
        "A /new/hardlink",
        "A /new/sym",
        "A /new/fifo",
        "C /usr/bin/tool",
        "C /usr/bin",
        "D /opt",
    } - {"C /usr/bin"}  # a chmod changes the file, not its directory

    into = tmp_path / "out"
    rec = commit(store, str(upper), "base", ("child",), into=str(into), message="test")
    assert len(rec.layers) == 3
    with kernel_overlay(store.lowers("child"), tmp_path / "m2") as merged:
        assert snapshot(merged) == expected
    assert store.verify("child") == {d: [] for d in rec.diff_ids}

    # The written layout imports into a fresh store, giving the same tree again.
    other = Store(str(tmp_path / "store2"))
    other.import_layout(f"{into}:child")
    with kernel_overlay(other.lowers("child"), tmp_path / "m3") as merged:
        assert snapshot(merged) == expected


def test_commit_layer_uses_oci_whiteouts(store: Store, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_image(layout, BASE, tag="base")
    store.import_layout(str(layout))
    upper, work = tmp_path / "upper", tmp_path / "work"
    with kernel_overlay(store.lowers("base"), tmp_path / "m", upper, work) as merged:
        _make_changes(merged)
    blob = write_layer_blob(str(upper), str(tmp_path / "layer.tar"), "none")
    with tarfile.open(blob.path) as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert "etc/.wh.hosts" in members and members["etc/.wh.hosts"].isreg()
    assert "var/cache/.wh..wh..opq" in members
    assert ".wh.opt" in members
    assert members["new/hardlink"].islnk() or members["new/file"].islnk()
    assert members["new/file"].pax_headers.get("SCHILY.xattr.user.note") == "kept"
    assert not any("trusted.overlay" in k for m in members.values() for k in m.pax_headers)
    assert blob.tar_size == os.path.getsize(blob.path)


def test_commit_cost_follows_changes(store: Store, tmp_path: Path) -> None:
    big = [E("big", data=os.urandom(8 << 20))]
    write_image(tmp_path / "layout", [big], tag="base")
    store.import_layout(str(tmp_path / "layout"))
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "small").write_bytes(b"tiny")
    rec = commit(store, str(upper), "base", ("child",))
    assert rec.layers[-1].size < 4096


def test_diff_without_lowers_and_cli(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    upper = tmp_path / "upper"
    (upper / "d").mkdir(parents=True)
    (upper / "d/f").write_bytes(b"1")
    os.mknod(upper / "gone", 0o020000, os.makedev(0, 0))
    assert cli.main(["diff", "--store", store.root, str(upper)]) == 1  # A or C? unknown
    assert capsys.readouterr().out == ""
    assert cli.main(["diff", "--store", store.root, "--lowers", "", str(upper)]) == 0
    assert capsys.readouterr().out.splitlines() == ["A /d", "A /d/f", "D /gone"]


def test_commit_refuses_metacopy_upper(store: Store, tmp_path: Path) -> None:
    write_image(tmp_path / "layout", [[E("f", data=b"1")]], tag="base")
    store.import_layout(str(tmp_path / "layout"))
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "f").write_bytes(b"")
    os.setxattr(upper / "f", "trusted.overlay.metacopy", b"")
    with pytest.raises(LayerfsError, match="metacopy"):
        commit(store, str(upper), "base", ("child",))
    assert [r.manifest_digest for r in store.images()] == [store.resolve("base").manifest_digest]
    assert os.listdir(Path(store.root) / "tmp") == []


def test_commit_cli_zstd(store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("zstandard", reason="zstd layers need the zstandard package")
    write_image(tmp_path / "layout", [[E("f", data=b"1")]], tag="base")
    store.import_layout(str(tmp_path / "layout"))
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "g").write_bytes(b"2")
    s = ["--store", store.root]
    args = ["commit", *s, str(upper), "--image", "base", "--tag", "z", "--compression", "zstd"]
    assert cli.main(args) == 0
    rec = store.resolve("z")
    assert rec.layers[-1].media_type.endswith("+zstd")
    top = Path(store.lowers("z")[0])
    assert (top / "g").read_bytes() == b"2"


def test_diff_prints_names_as_bytes(tmp_path: Path) -> None:
    import subprocess
    import sys

    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / os.fsdecode(b"caf\xe9")).write_bytes(b"latin-1 name")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "layerfs.store.cli",
            "diff",
            "--lowers",
            "",
            str(upper),
        ],
        capture_output=True,
        check=True,
    )
    assert r.stdout == b"A /caf\xe9\n"

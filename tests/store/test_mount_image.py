"""``layerfs mount --image REF``: the main CLI mounts an image from the store, and concurrent
imports into one store serialise on its lock and both land."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.mounts import layerfs_available

from layerfs.store.store import Store
from store.ocitools import E, write_image
from store.overlay import layerfs_image_mount

LAYERS = [
    [E("etc", "d", mode=0o755), E("etc/a", data=b"from layer 1"), E("etc/b", data=b"b")],
    [E("etc/a", data=b"from layer 2"), E("etc/.wh.b")],
]


@pytest.mark.fuse
def test_mount_image_cli(store: Store, tmp_path: Path) -> None:
    if why := layerfs_available():
        pytest.skip(why)
    write_image(tmp_path / "layout", LAYERS, tag="img")
    store.import_layout(str(tmp_path / "layout"))
    with layerfs_image_mount(store.root, "img", tmp_path) as (mnt, upper):
        assert (mnt / "etc/a").read_bytes() == b"from layer 2"
        assert not (mnt / "etc/b").exists()
        (mnt / "etc/c").write_bytes(b"new")
    assert (upper / "etc/c").read_bytes() == b"new"
    # The store's layers are lowers: never written through a mount.
    assert store.verify("img") == {d: [] for d in store.resolve("img").diff_ids}


def test_concurrent_imports(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    shared = [E("big", data=os.urandom(2 << 20))]
    for i in range(3):
        write_image(tmp_path / f"l{i}", [shared, [E(f"own{i}", data=b"x")]], tag=f"t{i}")
    cli = [sys.executable, "-m", "layerfs.store.cli", "image", "import", "--store", store.root]
    procs = [
        subprocess.Popen([*cli, str(tmp_path / f"l{i}")], stderr=subprocess.PIPE) for i in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert sorted(store.tags()) == ["t0", "t1", "t2"]
    assert sorted(store.layer_users().values()) == [1, 1, 1, 3]
    assert os.listdir(Path(store.root) / "tmp") == []
    for i in range(3):
        assert store.verify(f"t{i}") == {d: [] for d in store.resolve(f"t{i}").diff_ids}

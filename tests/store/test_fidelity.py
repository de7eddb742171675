"""What real layouts showed (issue 19): each test builds the case with the tool that writes it
(umoci, GNU tar) and compares with what that tool, or skopeo, makes of it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from support.mounts import layerfs_available

from layerfs.store import cli
from layerfs.store.store import Store
from store.ocitools import E, make_tar, write_image
from store.overlay import layerfs_image_mount

CLI = [sys.executable, "-m", "layerfs.store.cli"]
BASE = [
    E("data", "d", mode=0o700, uid=1000, gid=1000, mtime_ns=1_500_000_000_111_111_111),
    E("data/sub", "d", mode=0o750, uid=2000, gid=3000, mtime_ns=1_500_000_001_222_222_222),
    E("data/sub/old", data=b"old"),
    E("opt", "d", mode=0o711, uid=7, gid=8, mtime_ns=1_400_000_000_000_000_000),
]


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


def _run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{cmd}: {r.stdout}\n{r.stderr}"
    return r.stdout


def _meta(root: Path, rel: str) -> tuple[int, int, int, int]:
    st = os.lstat(root / rel)
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns


@pytest.mark.external
@pytest.mark.fuse
def test_implied_parents_keep_lower_metadata(tmp_path: Path) -> None:
    """A layer written by ``umoci raw add-layer`` from a tar holding only data/sub/newfile
    (and opt/x/new, whose opt/ exists below but x/ nowhere): mounted with ``layerfs mount
    --image``, data, data/sub and opt show the base's mode, owner and mtime, as in ``umoci
    unpack``'s tree (opt's mtime aside: see below); opt/x, which no layer has, is the
    documented 0755 root:root."""
    _need("umoci")
    if why := layerfs_available():
        pytest.skip(why)
    layout = tmp_path / "layout"
    write_image(layout, [BASE], tag="base")
    layer = tmp_path / "layer.tar"
    layer.write_bytes(make_tar([E("data/sub/newfile", data=b"new"), E("opt/x/new", data=b"n")]))
    _run(["umoci", "raw", "add-layer", "--image", f"{layout}:base", "--tag", "two", str(layer)])
    bundle = tmp_path / "bundle"
    _run(["umoci", "unpack", "--image", f"{layout}:two", str(bundle)])
    want = bundle / "rootfs"

    store = Store(str(tmp_path / "store"))
    assert cli.main(["image", "import", "--store", store.root, f"{layout}:two"]) == 0
    with layerfs_image_mount(store.root, "two", tmp_path) as (mnt, _):
        for rel in ("data", "data/sub"):
            assert _meta(mnt, rel) == _meta(want, rel), rel
        # umoci restores the mtime of an entry's parent only: making opt/x stamped opt with
        # the time of unpack. The tar says nothing of opt, so the base's mtime stays here.
        assert _meta(mnt, "opt")[:3] == _meta(want, "opt")[:3]
        assert _meta(mnt, "opt")[3] == 1_400_000_000_000_000_000
        assert (mnt / "data/sub/newfile").read_bytes() == b"new"
        assert (mnt / "data/sub/old").read_bytes() == b"old"
        mode, uid, gid, _ = _meta(mnt, "opt/x")
        assert (mode, uid, gid) == (0o755, 0, 0)


def test_explicit_entry_beats_lower(store: Store, layout: Path) -> None:
    """A directory the tar names itself keeps the tar's metadata, even after its children
    (which implied it first) were extracted."""
    top = [
        E("data/sub/newfile", data=b"new"),
        E("data/sub", "d", mode=0o701, uid=5, gid=6, mtime_ns=1_300_000_000_000_000_005),
    ]
    write_image(layout, [BASE, top], tag="t")
    store.import_layout(str(layout))
    top_dir = Path(store.lowers("t")[0])
    assert _meta(top_dir, "data/sub") == (0o701, 5, 6, 1_300_000_000_000_000_005)
    assert _meta(top_dir, "data")[:3] == (0o700, 1000, 1000)


SPARSE_SIZE = 100 << 30  # 100 GiB apparent
SPARSE_DATA = {0: b"head", 5 << 30: b"middle" * 1000, SPARSE_SIZE - 3: b"end"}


def _sparse_tar(tmp: Path, fmt: str) -> bytes:
    """A GNU tar ``--sparse`` archive (``gnu``: old GNU sparse headers; ``posix``: PAX sparse
    1.0) of one 100 GiB-apparent file holding a few bytes."""
    _need("tar")
    src = tmp / f"src-{fmt}"
    src.mkdir()
    with open(src / "big", "wb") as f:
        for off, data in SPARSE_DATA.items():
            f.seek(off)
            f.write(data)
    out = tmp / f"sparse-{fmt}.tar"
    _run(["tar", "--sparse", f"--format={fmt}", "-C", str(src), "-cf", str(out), "big"])
    return out.read_bytes()


@pytest.mark.external
@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_members_stay_sparse(store: Store, tmp_path: Path, fmt: str) -> None:
    """A 100 GiB-apparent member in a tar of a few KiB is extracted as a sparse file (same
    size and bytes, a few blocks), and ``--max-size`` refuses it with nothing left behind."""
    tar = _sparse_tar(tmp_path, fmt)
    assert len(tar) < 64 << 10
    layout = tmp_path / "layout"
    write_image(layout, [tar], tag="sparse")
    refused = subprocess.run(
        [*CLI, "image", "import", "--store", store.root, "--max-size", "1G", str(layout)],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 1
    assert "'big'" in refused.stderr and "limit" in refused.stderr, refused.stderr
    assert store.images() == []
    store.import_layout(str(layout))
    big = Path(store.lowers("sparse")[0]) / "big"
    st = os.stat(big)
    assert st.st_size == SPARSE_SIZE
    assert st.st_blocks * 512 < 1 << 20
    with open(big, "rb") as f:
        for off, data in SPARSE_DATA.items():
            f.seek(off)
            assert f.read(len(data)) == data
        f.seek(1 << 30)
        assert f.read(4096) == bytes(4096)
    assert store.verify("sparse") == {d: [] for d in store.resolve("sparse").diff_ids}
    with open(big, "r+b") as f:
        f.seek(3 << 30)
        f.write(b"x")
    assert [str(p) for ps in store.verify("sparse").values() for p in ps] == [
        "changed /big (digest, mtime)"
    ]


@pytest.mark.kernel_overlay  # needs root, to mount a small tmpfs
def test_full_disk_names_layer_and_entry(tmp_path: Path) -> None:
    """ENOSPC during an import names the layer and the tar entry (as umoci names the entry),
    and the store is left as it was."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        layout = tmp_path / "layout"
        write_image(layout, [[E("a", data=b"a"), E("usr/big", data=bytes(3 << 20))]])
        store = small / "store"
        r = subprocess.run(
            [*CLI, "image", "import", "--store", str(store), str(layout)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 1
        assert "layer sha256:" in r.stderr and "'usr/big'" in r.stderr, r.stderr
        assert "No space left on device" in r.stderr
        assert Store(str(store)).images() == []
        assert os.listdir(store / "tmp") == []
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)

"""What the store's commands say when the situation is not the happy path (issue 19 items 2,
3, 4 and 6): each runs the real command line and reads its exit status and words."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.mounts import mount_kernel

from layerfs.store.progress import Progress, human_size
from layerfs.store.store import Store
from store.ocitools import E, snapshot, write_image

CLI = [sys.executable, "-m", "layerfs.store.cli"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def test_ls_of_missing_store_fails(tmp_path: Path) -> None:
    r = _cli("image", "ls", "--store", str(tmp_path / "nonexistent"))
    assert r.returncode == 1
    assert "no layer store at" in r.stderr
    assert not (tmp_path / "nonexistent").exists()


def test_diff_without_image_refuses(store: Store, tmp_path: Path) -> None:
    """No --image, no --lowers, no record of the upper: refuse (A and C cannot be told apart)
    instead of printing everything as A with exit 0, as commit already does."""
    write_image(tmp_path / "layout", [[E("etc", "d"), E("etc/a", data=b"a")]], tag="img")
    store.import_layout(str(tmp_path / "layout"))
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc/a").write_bytes(b"changed")
    r = _cli("diff", "--store", store.root, str(upper))
    assert r.returncode == 1 and r.stdout == ""
    assert "--image" in r.stderr
    r = _cli("diff", "--store", store.root, "--image", "img", str(upper))
    assert r.returncode == 0
    assert "C /etc/a" in r.stdout.splitlines()


def test_inspect_into_closed_pipe_is_quiet(store: Store, tmp_path: Path) -> None:
    """``image inspect REF | head``: the output is larger than a pipe buffer, the reader goes
    away, and no "[Errno 32] Broken pipe" is printed."""
    # One small layer listed 600 times: the inspect JSON is well over 64 KiB.
    write_image(tmp_path / "layout", [[E("a", data=b"a")]] * 600, tag="many")
    store.import_layout(str(tmp_path / "layout"))
    cmd = " ".join([*CLI, "image", "inspect", "--store", store.root, "many"])
    r = subprocess.run(
        f"{cmd} | head -n 2", shell=True, capture_output=True, text=True, timeout=120
    )
    assert len(r.stdout.splitlines()) == 2
    assert "Broken pipe" not in r.stderr and "Errno" not in r.stderr, r.stderr


def test_reimport_says_tag_moved(store: Store, tmp_path: Path) -> None:
    write_image(tmp_path / "one", [[E("a", data=b"1")]], tag="app")
    write_image(tmp_path / "two", [[E("a", data=b"2")]], tag="app")
    first = _cli("image", "import", "--store", store.root, str(tmp_path / "one"))
    assert first.returncode == 0 and "moved" not in first.stderr
    again = _cli("image", "import", "--store", store.root, str(tmp_path / "one"))
    assert again.returncode == 0 and "moved" not in again.stderr
    second = _cli("image", "import", "--store", store.root, str(tmp_path / "two"))
    assert second.returncode == 0
    old = first.stdout.split()[0]
    assert f"tag app moved from {old[:19]}" in second.stderr


@pytest.mark.kernel_overlay
def test_commit_of_mounted_upper_refused(store: Store, tmp_path: Path) -> None:
    """An upper still mounted (kernel overlayfs here) is refused without --force."""
    write_image(tmp_path / "layout", [[E("a", data=b"a")]], tag="img")
    store.import_layout(str(tmp_path / "layout"))
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    args = ["commit", "--store", store.root, "--image", "img", str(upper)]
    with mount_kernel(store.lowers("img"), upper, work, mnt):
        (mnt / "b").write_bytes(b"b")
        r = _cli(*args, "--tag", "c1")
        assert r.returncode == 1
        assert "still mounted" in r.stderr and str(mnt) in r.stderr, r.stderr
        assert "c1" not in store.tags()
        r = _cli(*args, "--tag", "c2", "--force")
        assert r.returncode == 0, r.stderr
    r = _cli(*args, "--tag", "c3")
    assert r.returncode == 0, r.stderr


def test_progress_reaches_the_end() -> None:
    """A phase that ends within the throttle interval still shows 100%; small sizes are not
    "0.0 MiB"."""
    out = io.StringIO()
    p = Progress(out, enabled=True)
    p.start("layer 1/1 manifest", 3000)
    for done in (1000, 2000, 3000):
        p.update(done)
    assert out.getvalue().rsplit("\r", 1)[-1].endswith("(100%)")
    assert "2.9 KiB / 2.9 KiB" in out.getvalue()
    assert human_size(512) == "512 B" and human_size(12 << 10) == "12.0 KiB"


def _sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.external
def test_export_is_independent_of_the_store(store: Store, tmp_path: Path) -> None:
    """An exported layout shares no inode with the store: editing it leaves the store's blob
    intact, and a second export replaces the damaged blob (skopeo then copies it, checking
    every digest)."""
    if shutil.which("skopeo") is None:
        pytest.skip("needs skopeo")
    write_image(tmp_path / "layout", [[E("a", data=os.urandom(5000))]], tag="img")
    store.import_layout(str(tmp_path / "layout"))
    rec = store.resolve("img")
    out = tmp_path / "out"
    assert _cli("image", "export", "--store", store.root, "img", f"{out}:img").returncode == 0
    blob = out / "blobs/sha256" / rec.layers[0].digest[7:]
    st, sst = os.stat(blob), os.stat(store.blob_path(rec.layers[0].digest))
    assert (st.st_dev, st.st_ino) != (sst.st_dev, sst.st_ino) and st.st_nlink == 1
    with open(blob, "r+b") as f:
        f.seek(10)
        f.write(b"XXXX")
    assert _sha(Path(store.blob_path(rec.layers[0].digest))) == rec.layers[0].digest
    assert _cli("image", "export", "--store", store.root, "img", f"{out}:img").returncode == 0
    assert _sha(blob) == rec.layers[0].digest
    r = subprocess.run(
        ["skopeo", "copy", f"oci:{out}:img", f"oci:{tmp_path / 'copy'}:img"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.external
def test_docker_archive_imports_as_skopeo_reads_it(store: Store, tmp_path: Path) -> None:
    """A docker-archive (as ``docker save`` and ``podman save --format docker-archive`` write
    it; skopeo writes the same) imports to the image skopeo reads from it: the same config
    (digest), diffIDs and trees as the OCI layout it was made from, under its RepoTags."""
    if shutil.which("skopeo") is None:
        pytest.skip("needs skopeo")
    layers = [
        [E("etc", "d"), E("etc/a", data=os.urandom(3000)), E("etc/b", data=b"b", mode=0o600)],
        [E("etc/.wh.b"), E("etc/c", data=b"c", uid=7)],
    ]
    write_image(tmp_path / "layout", layers, tag="img")
    oci = Store(str(tmp_path / "oci-store"))
    want = oci.import_layout(str(tmp_path / "layout"))
    archive = tmp_path / "img.tar"
    subprocess.run(
        ["skopeo", "copy", f"oci:{tmp_path / 'layout'}:img", f"docker-archive:{archive}:x/y:1"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    for arg in (str(archive), f"docker-archive:{archive}:x/y:1"):
        r = _cli("image", "import", "--store", store.root, arg)
        assert r.returncode == 0, r.stderr
    (got,) = store.images()
    # Without a tag the archive's RepoTags (skopeo writes the name normalised), with one, it.
    assert store.tags_of(got.manifest_digest) == ["docker.io/x/y:1", "x/y:1"]
    assert got.diff_ids == want.diff_ids
    assert got.config_digest == want.config_digest
    for mine, theirs in zip(store.lowers("x/y:1"), oci.lowers("img"), strict=True):
        # (whiteouts are stamped when made: times come with the diffIDs checked above)
        assert snapshot(mine, times=False) == snapshot(theirs, times=False)
    assert store.verify("x/y:1") == {d: [] for d in got.diff_ids}
    r = _cli("image", "import", "--store", store.root, f"{archive}:nope:1")
    assert r.returncode == 1 and "no image 'nope:1' (has: docker.io/x/y:1)" in r.stderr

"""End to end: containerd 1.6 (Debian's) with layerfs-snapshotter as its proxy snapshotter.

One private containerd and snapshotter for the whole test (tests/snapshotter/_containerd.py),
an OCI archive built here around Debian's static busybox with whiteouts, an opaque directory,
hard links, owners and modes, imported with ``ctr image import``. Compared against containerd's
own overlayfs snapshotter on the same image: the image as a container sees it, and after
writes, deletes, renames and an opaque directory made inside the container (tar archives
written to a bind-mounted file, read member by member: names, types, modes, owners, mtimes,
link targets, content), and the owners a user-namespaced container sees (``--remap-labels``:
the mapping labels reach mount.layerfs) against overlayfs's chowned copy. Then: the
container's root is fuse.layerfs; Usage; a detached
container survives restarts of containerd and of the snapshotter; ``ctr image rm --sync``
leaves no snapshot, directory, mount or daemon; an unpack through the FUSE mount (kernel
extract off) gives what the kernel overlay unpack gave."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.oci_image import MTIME, add_tree, oci_archive, write_layout
from e2e.podman_env import find_static_busybox, make_busybox_rootfs

from ._containerd import NAMESPACE, Containerd, daemons_using, fstype_of, mounts_under

IMAGE = "docker.io/library/layerfs-snap-e2e:1"

# What the container does: the image as seen, then changes, then the result.
SCRIPT = """set -e
cd /
tar -c -f /out/before.tar bin etc base
echo new > base/written.txt
rm base/keep.txt
rm -r base/deldir
mv base/mvdir base/moved
mv base/rename_src.txt base/renamed.txt
rm -r base/olddir2
mkdir base/olddir2
echo o > base/olddir2/o
echo app >> base/mod.txt
chmod 600 base/mod.txt
chown 1:1 base/mod.txt
ln base/link_src base/link_hard
echo more >> base/hard_a
tar -c -f /out/after.tar bin etc base
"""

USERNS_SCRIPT = """set -e
stat -c '%u %g %n' /base/keep.txt /base/owned /base/l2dir > /out/ids
echo x > /base/new
chown 7:8 /base/mod.txt
stat -c '%u %g %n' /base/new /base/mod.txt >> /out/ids
"""


def _member(tar: tarfile.TarFile, name: str, *, data: bytes | None = None, **kw: object) -> None:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.mode = MTIME, 0, 0, 0o755 if data is None else 0o644
    if data is None:
        info.type = tarfile.DIRTYPE
    for k, v in kw.items():
        setattr(info, k, v)
    if data is not None and info.type == tarfile.REGTYPE:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def _layers(busybox: Path, tmp: Path) -> list[bytes]:
    rootfs = tmp / "rootfs"
    make_busybox_rootfs(rootfs, busybox)
    (rootfs / "out").mkdir()
    base = io.BytesIO()
    with tarfile.open(fileobj=base, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add_tree(tar, rootfs)
        _member(tar, "base")
        for name in ("keep.txt", "del.txt", "mod.txt", "rename_src.txt", "link_src"):
            _member(tar, f"base/{name}", data=name.encode())
        _member(tar, "base/owned", data=b"o", uid=1000, gid=1001, mode=0o4750)
        _member(tar, "base/hard_a", data=b"hard")
        _member(tar, "base/hard_b", type=tarfile.LNKTYPE, linkname="base/hard_a")
        _member(tar, "base/sym", type=tarfile.SYMTYPE, linkname="keep.txt")
        _member(tar, "base/fifo", type=tarfile.FIFOTYPE, mode=0o600)
        for d in ("deldir", "deldir/y", "mvdir", "mvdir/g", "olddir", "olddir2", "sticky"):
            _member(tar, f"base/{d}", mode=0o1777 if d == "sticky" else 0o755)
        for f in ("deldir/x", "deldir/y/z", "mvdir/f", "mvdir/g/h", "olddir/a", "olddir2/b"):
            _member(tar, f"base/{f}", data=f.encode())
    top = io.BytesIO()
    with tarfile.open(fileobj=top, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _member(tar, "base", mode=0o755)
        _member(tar, "base/.wh.del.txt", data=b"")
        _member(tar, "base/olddir", mode=0o750)
        _member(tar, "base/olddir/.wh..wh..opq", data=b"")
        _member(tar, "base/olddir/new", data=b"new in an opaque dir")
        _member(tar, "base/mod.txt", data=b"modified in layer 2\n")
        _member(tar, "base/l2dir", mode=0o700, uid=5, gid=6)
        _member(tar, "base/l2dir/f", data=b"f", mode=0o640)
    return [base.getvalue(), top.getvalue()]


def _archive(tmp: Path) -> Path:
    busybox = find_static_busybox()
    if busybox is None:
        pytest.skip("needs busybox-static (scripts/setup.sh)")
    layout = tmp / "layout"
    write_layout(layout, _layers(busybox, tmp), "1")
    return oci_archive(layout, tmp / "image.tar", IMAGE)


def _assert_same_listings(ref_dir: Path, got_dir: Path, since: float) -> None:
    """The container's tree before and after the script, as tarred into each directory."""
    for name in ("before.tar", "after.tar"):
        ref, got = _listing(ref_dir / name, since), _listing(got_dir / name, since)
        assert got == ref, {
            k: (ref.get(k), got.get(k)) for k in ref.keys() | got.keys() if ref.get(k) != got.get(k)
        }


def _listing(path: Path, since: float) -> dict[str, tuple[object, ...]]:
    """A tar archive member by member; mtimes of things the container changed (they differ by
    the seconds between the two runs) become "changed"."""
    out: dict[str, tuple[object, ...]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            content = b""
            if m.isfile():
                f = tar.extractfile(m)
                assert f is not None
                content = f.read()
            mtime: object = "changed" if m.mtime >= since else m.mtime
            out[m.name] = (
                m.type, m.mode, m.uid, m.gid, mtime, m.linkname, m.size,
                hashlib.sha256(content).hexdigest(),
            )  # fmt: skip
    return out


def _run_script(cd: Containerd, snapshotter: str, name: str, out: Path) -> None:
    out.mkdir()
    cd.ctr(
        "run", "--rm", "--snapshotter", snapshotter,
        "--mount", f"type=bind,src={out},dst=/out,options=rbind:rw",
        IMAGE, name, "sh", "-c", SCRIPT,
    )  # fmt: skip


@pytest.fixture
def containerd() -> Iterator[Containerd]:
    if os.geteuid() != 0:
        pytest.skip("containerd end-to-end needs root")
    for tool in ("containerd", "ctr", "runc", "mount.fuse3"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (scripts/setup.sh)")
    tmp = Path(tempfile.mkdtemp(prefix="layerfs-snap-e2e-"))
    tmp.chmod(0o711)  # runc in a user namespace must reach the rootfs under state/
    cd = Containerd(tmp)
    try:
        yield cd
    except BaseException:
        print(cd.logs())
        raise
    finally:
        cd.teardown()
        shutil.rmtree(tmp, ignore_errors=True)


def _layerfs_state(cd: Containerd) -> tuple[list[str], list[str], list[str], list[str]]:
    snaps = cd.ctr("snapshots", "--snapshotter", "layerfs", "ls").stdout.splitlines()[1:]
    dirs = sorted(p.name for p in (cd.snap_root / "snapshots").iterdir())
    mounts = [m for m in mounts_under(cd.tmp) if "snapshotter" in m]
    return snaps, dirs, mounts, daemons_using(cd.snap_root)


def _settle_empty(cd: Containerd) -> tuple[list[str], list[str], list[str], list[str]]:
    deadline = time.monotonic() + 20
    while True:
        state = _layerfs_state(cd)
        if not any(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.fuse
@pytest.mark.kernel_overlay
@pytest.mark.external
@pytest.mark.timeout(600)
def test_containerd_end_to_end(containerd: Containerd) -> None:
    cd, tmp = containerd, containerd.tmp
    start = time.time() - 1
    archive = _archive(tmp)
    cd.start_snapshotter()
    cd.start_containerd()

    # unpack (kernel overlay extract mounts) and the reference on overlayfs
    cd.ctr("image", "import", "--snapshotter", "layerfs", str(archive))
    snaps = cd.ctr("snapshots", "--snapshotter", "layerfs", "ls").stdout
    assert snaps.count("Committed") == 2, snaps
    _run_script(cd, "overlayfs", "ref", tmp / "ref")
    _run_script(cd, "layerfs", "subject", tmp / "subject")
    _assert_same_listings(tmp / "ref", tmp / "subject", start)
    ref = _listing(tmp / "ref/after.tar", start)
    assert "base/olddir/new" in ref and "base/olddir/a" not in ref  # the image had its opaque dir

    # a user-namespaced container: ctr --remap-labels hands the mapping to the snapshotter as
    # labels and mount.layerfs shows the image's ids shifted; overlayfs gets a chowned copy
    # (ctr without --remap-labels). Inside, both must show the ids the image stores.
    seen = {}
    for snapshotter, remap in (("overlayfs", ()), ("layerfs", ("--remap-labels",))):
        out = tmp / f"userns-{snapshotter}"
        out.mkdir()
        out.chmod(0o777)
        cd.ctr(
            "run", "--rm", "--snapshotter", snapshotter, *remap,
            "--uidmap", "0:100000:65536", "--gidmap", "0:200000:65536",
            "--mount", f"type=bind,src={out},dst=/out,options=rbind:rw",
            IMAGE, f"userns-{snapshotter}", "sh", "-c", USERNS_SCRIPT,
        )  # fmt: skip
        seen[snapshotter] = (out / "ids").read_text()
    assert seen["layerfs"] == seen["overlayfs"], seen
    assert seen["layerfs"].splitlines()[:3] == [
        "0 0 /base/keep.txt", "1000 1001 /base/owned", "5 6 /base/l2dir",
    ], seen  # fmt: skip

    # a detached container: its root is fuse.layerfs, Usage sees its writes
    cd.ctr(
        "run", "-d", "--snapshotter", "layerfs", IMAGE, "long",
        "sh", "-c", "head -c 300000 /dev/zero > /written; echo ok > /ready; sleep 1000",
    )  # fmt: skip
    rootfs = tmp / "state/io.containerd.runtime.v2.task" / NAMESPACE / "long/rootfs"
    deadline = time.monotonic() + 30
    while not (rootfs / "ready").exists():
        assert time.monotonic() < deadline, "the container did not start"
        time.sleep(0.1)
    assert fstype_of(str(rootfs)) == "fuse.layerfs"
    usage = cd.ctr("snapshots", "--snapshotter", "layerfs", "usage", "long").stdout
    name, size, unit, inodes = usage.splitlines()[1].split()
    # the upper holds its root, /written and /ready (ctr prints sizes in KiB)
    assert (name, unit, inodes) == ("long", "KiB", "3") and float(size) >= 300_000 / 1024, usage

    # the container outlives a restart of containerd and of the snapshotter (now with the
    # FUSE unpack path: kernel extract off)
    cd.stop_containerd()
    assert cd.stop_snapshotter() == 0
    assert (rootfs / "written").stat().st_size == 300_000
    cd.start_snapshotter("--kernel-extract", "off")
    cd.start_containerd()
    tasks = cd.ctr("task", "ls").stdout
    assert "long" in tasks and "RUNNING" in tasks, tasks
    assert (rootfs / "ready").read_text() == "ok\n"
    cd.ctr("task", "kill", "-s", "KILL", "long")
    deadline = time.monotonic() + 30
    while "RUNNING" in cd.ctr("task", "ls").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    cd.ctr("task", "rm", "long")
    cd.ctr("container", "rm", "long")

    # garbage collection: no snapshot, directory, mount or daemon of ours is left
    cd.ctr("image", "rm", "--sync", IMAGE)
    assert _settle_empty(cd) == ([], [], [], [])

    # unpack through FUSE mounts gives what the kernel overlay unpack gave
    cd.ctr("image", "import", "--snapshotter", "layerfs", str(archive))
    _run_script(cd, "layerfs", "fuse-unpack", tmp / "fuse-unpack")
    _assert_same_listings(tmp / "ref", tmp / "fuse-unpack", start)
    cd.ctr("image", "rm", "--sync", IMAGE)
    assert _settle_empty(cd) == ([], [], [], [])

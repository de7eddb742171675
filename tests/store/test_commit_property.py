"""Property: whatever a container does (through kernel overlayfs), committing its upper gives
an image that mounts to the tree the container saw, and ``diff`` agrees with a comparison of
the trees before and after."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from support.mounts import layerfs_available, mount_kernel, mount_layerfs

from layerfs.store.commit import commit
from layerfs.store.diff import changes
from layerfs.store.store import Store
from store.ocitools import E, snapshot, write_image

pytestmark = [pytest.mark.kernel_overlay, pytest.mark.slow]

BASE = [
    [
        E("d1", "d", mode=0o755),
        E("d1/f1", data=b"one"),
        E("d1/f2", data=b"two", uid=1000),
        E("d1/sub", "d", mode=0o750),
        E("d1/sub/f3", data=b"three"),
        E("d2", "d", mode=0o755),
        E("d2/f4", data=b"four"),
        E("d2/link", "l", link="f4"),
        E("top", data=b"top"),
    ],
    [E("d1/.wh.f2"), E("d3", "d"), E("d3/f5", data=b"five"), E("d2/f4", data=b"four v2")],
]

NAMES = [
    "d1",
    "d2",
    "d3",
    "d1/f1",
    "d1/sub",
    "d1/sub/f3",
    "d2/f4",
    "d2/link",
    "d3/f5",
    "top",
    "new",
    "d1/new",
    "d2/newdir",
    "d3/sub2",
]

OPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "write",
                "append",
                "unlink",
                "rmtree",
                "mkdir",
                "rename",
                "chmod",
                "chown",
                "symlink",
                "link",
                "xattr",
                "replace_dir",
            ]
        ),
        st.sampled_from(NAMES),
        st.sampled_from(NAMES),
    ),
    min_size=1,
    max_size=12,
)


def _apply(m: Path, op: str, a: str, b: str) -> None:
    pa, pb = m / a, m / b
    try:
        if op == "write":
            pa.write_bytes(b"written " + a.encode())
        elif op == "append":
            with open(pa, "ab") as f:
                f.write(b"+")
        elif op == "unlink":
            pa.unlink()
        elif op == "rmtree":
            shutil.rmtree(pa)
        elif op == "mkdir":
            pa.mkdir()
        elif op == "rename":
            os.rename(pa, pb)
        elif op == "chmod":
            if not pa.is_symlink():
                os.chmod(pa, 0o701)
        elif op == "chown":
            os.chown(pa, 123, 456, follow_symlinks=False)
        elif op == "symlink":
            os.symlink(b, pa)
        elif op == "link":
            os.link(pa, pb, follow_symlinks=False)
        elif op == "xattr":
            os.setxattr(pa, "user.prop", b"value", follow_symlinks=False)
        elif op == "replace_dir":
            shutil.rmtree(pa)
            pa.mkdir()
            (pa / "inside").write_bytes(b"opaque now")
    except OSError:
        pass  # the operation does not apply to this tree: the container would see an error


MOUNTERS = {"kernel": mount_kernel, "layerfs": mount_layerfs}


@pytest.fixture(params=sorted(MOUNTERS))
def mounter(request: pytest.FixtureRequest) -> str:
    """Who runs the container: kernel overlayfs, or layerfs (whose upper must be the same)."""
    if request.param == "layerfs":
        why = layerfs_available() or (None if os.path.exists("/dev/fuse") else "no /dev/fuse")
        if why:
            pytest.skip(why)
    return str(request.param)


@given(ops=OPS)
@example(  # found by hypothesis: a directory renamed onto a deleted lower directory of the
    # same name (d3); its lower subdirectory 'sub' was reported C, though /d3/sub is new
    ops=[
        ("rmtree", "d3", "d1/f1"),
        ("rename", "d1", "d3"),
        ("append", "d1", "d1/sub"),
        ("unlink", "d2", "d3"),
        ("unlink", "d1/sub/f3", "d3/sub2"),
        ("unlink", "d1/new", "top"),
        ("link", "d3/f5", "d3/f5"),
        ("rmtree", "d1/f1", "d2/newdir"),
    ]
)
@example(  # found by hypothesis: a directory renamed onto a deleted file's name; its lower
    # subdirectory was listed as A and again as C (the parent of its own A child)
    ops=[("unlink", "top", ""), ("rename", "d1", "top"), ("chmod", "top", "")]
)
@example(  # found by hypothesis: a file changed, then its directory renamed under a new one
    ops=[
        ("append", "d1/sub/f3", "new"),
        ("replace_dir", "d2", "top"),
        ("rename", "d1/sub", "d2/newdir"),
        ("unlink", "d2/newdir/f3", ""),
        ("write", "d2/newdir/f3", ""),
    ]
)
def test_commit_reproduces_container_tree(mounter: str, ops: list[tuple[str, str, str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        store = Store(str(tmp / "store"))
        write_image(tmp / "layout", BASE, tag="base")
        store.import_layout(str(tmp / "layout"))
        upper, work, mnt = tmp / "upper", tmp / "work", tmp / "mnt"
        for d in (upper, work, mnt):
            d.mkdir()
        with mount_kernel(store.lowers("base"), None, None, mnt):
            before = snapshot(mnt)
        with MOUNTERS[mounter](store.lowers("base"), upper, work, mnt):
            for op in ops:
                _apply(mnt, *op)
            after = snapshot(mnt)
        commit(store, str(upper), "base", ("child",))
        with mount_kernel(store.lowers("child"), None, None, mnt):
            assert snapshot(mnt) == after

        for change in changes(str(upper), store.lowers("base")):
            path = os.fsdecode(change.path)[1:]
            if change.kind == "A":
                assert path in after, change
            elif change.kind == "D":
                # Gone, or a directory replaced by a new (opaque) one.
                assert path in before, change
                assert path not in after or after[path][0] == stat.S_IFDIR, change
            else:
                assert path in before and path in after, change
        # Everything that differs is reported (A/C/D, or below an added/removed directory).
        reported = {os.fsdecode(c.path)[1:] for c in changes(str(upper), store.lowers("base"))}
        # A name that is new (below a renamed directory too) is reported itself.
        for path in set(after) - set(before):
            assert path in reported, path
        for path in set(before) ^ set(after) | {
            p for p in before if p in after and before[p] != after[p]
        }:
            parents = [path.rsplit("/", i)[0] for i in range(path.count("/") + 1)]
            if before.get(path, (0,))[0] == after.get(path, (0,))[0] == 0o040000:
                continue  # directory metadata, as Docker's rules allow
            assert any(p in reported for p in parents), path

"""Layer extraction: OCI whiteouts into overlay form, metadata kept, hostile paths refused."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from layerfs.errors import LayerfsError
from layerfs.store.store import Store
from store.conftest import store_is_empty
from store.ocitools import MTIME_NS, E, write_image

# A valid VFS_CAP_REVISION_2 value: cap_net_bind_service permitted and effective.
CAP = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


def _only_layer(store: Store, ref: str = "latest") -> Path:
    (lower,) = store.lowers(ref)
    return Path(lower)


def test_whiteouts_become_overlay_form(store: Store, layout: Path) -> None:
    write_image(
        layout,
        [
            [E("a", "d", mode=0o755), E("a/keep"), E("a/gone"), E("b", "d", mode=0o755)],
            [E("a/.wh.gone"), E("b/.wh..wh..opq"), E("b/new", data=b"x")],
        ],
    )
    store.import_layout(str(layout))
    top, bottom = (Path(p) for p in store.lowers("latest"))
    wh = os.lstat(top / "a" / "gone")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert not (top / "a" / ".wh.gone").exists()
    assert os.getxattr(top / "b", "trusted.overlay.opaque") == b"y"
    assert not os.path.lexists(top / "b" / ".wh..wh..opq")
    assert (top / "b" / "new").read_bytes() == b"x"
    assert (bottom / "a" / "gone").is_file()


def test_metadata_is_kept(store: Store, layout: Path) -> None:
    big = os.urandom(3 << 20)
    write_image(
        layout,
        [
            [
                E("bin", "d", mode=0o755, uid=1, gid=2),
                E("bin/su", data=b"#!", mode=0o4755, uid=0, gid=0),
                E("bin/cap", data=b"c", xattrs={"security.capability": CAP}),
                E("bin/big", data=big, uid=1000, gid=1001, mode=0o600),
                E("bin/link", "h", link="bin/big"),
                E("bin/sym", "l", link="../etc/nowhere", uid=7, gid=8),
                E("dev", "d", mode=0o755),
                E("dev/null", "c", mode=0o666, dev=(1, 3)),
                E("dev/sda", "b", mode=0o660, dev=(8, 0)),
                E("dev/fifo", "p", mode=0o620),
                E("data", "d", mode=0o1777, xattrs={"user.comment": b"hello"}),
            ]
        ],
    )
    store.import_layout(str(layout))
    root = _only_layer(store)
    su = os.lstat(root / "bin/su")
    assert stat.S_IMODE(su.st_mode) == 0o4755
    assert su.st_mtime_ns == MTIME_NS
    assert os.getxattr(root / "bin/cap", "security.capability") == CAP
    b = os.lstat(root / "bin/big")
    assert (b.st_uid, b.st_gid, stat.S_IMODE(b.st_mode), b.st_nlink) == (1000, 1001, 0o600, 2)
    assert (root / "bin/big").read_bytes() == big
    assert os.lstat(root / "bin/link").st_ino == b.st_ino
    sym = os.lstat(root / "bin/sym")
    assert os.readlink(root / "bin/sym") == "../etc/nowhere"
    assert (sym.st_uid, sym.st_gid, sym.st_mtime_ns) == (7, 8, MTIME_NS)
    d = os.lstat(root / "bin")
    assert (d.st_uid, d.st_gid, d.st_mtime_ns) == (1, 2, MTIME_NS)
    null = os.lstat(root / "dev/null")
    assert (
        stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    )
    assert stat.S_ISBLK(os.lstat(root / "dev/sda").st_mode)
    assert stat.S_ISFIFO(os.lstat(root / "dev/fifo").st_mode)
    data = os.lstat(root / "data")
    assert stat.S_IMODE(data.st_mode) == 0o1777
    assert os.getxattr(root / "data", "user.comment") == b"hello"


def test_missing_parents_created_and_later_entries_replace(store: Store, layout: Path) -> None:
    write_image(
        layout,
        [[E("x/y/z", data=b"1"), E("x/y/z", data=b"2"), E("w", "d"), E("w", data=b"now a file")]],
    )
    store.import_layout(str(layout))
    root = _only_layer(store)
    assert (root / "x/y/z").read_bytes() == b"2"
    assert (root / "w").read_bytes() == b"now a file"


def test_smuggled_overlay_xattrs_are_dropped(store: Store, layout: Path) -> None:
    write_image(layout, [[E("d", "d", xattrs={"trusted.overlay.opaque": b"y"})]])
    store.import_layout(str(layout))
    root = _only_layer(store)
    assert "trusted.overlay.opaque" not in os.listxattr(root / "d")


HOSTILE = {
    "dotdot": [E("../escape", data=b"x")],
    "dotdot-inner": [E("a", "d"), E("a/../../escape", data=b"x")],
    "absolute": [E("/etc/escape", data=b"x")],
    "through-symlink": [E("evil", "l", link="/tmp"), E("evil/escape", data=b"x")],
    "through-relative-symlink": [E("d", "d"), E("d/up", "l", link=".."), E("d/up/x", data=b"x")],
    "hardlink-dotdot": [E("h", "h", link="../../etc/passwd")],
    "hardlink-through-symlink": [E("evil", "l", link="/etc"), E("h", "h", link="evil/passwd")],
    "whiteout-through-symlink": [E("evil", "l", link="/tmp"), E("evil/.wh.x")],
    "opaque-through-symlink": [E("evil", "l", link="/tmp"), E("evil/.wh..wh..opq")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_path_traversal_refused_and_nothing_left(
    store: Store, layout: Path, tmp_path: Path, case: str
) -> None:
    # A good layer first, so a partly done import would show.
    write_image(layout, [[E("ok", data=b"fine")], HOSTILE[case]])
    before = sorted(os.listdir("/tmp"))
    with pytest.raises(LayerfsError) as err:
        store.import_layout(str(layout))
    assert "escape" not in os.listdir(tmp_path)
    assert "x" not in os.listdir("/tmp") or "x" in before
    assert store_is_empty(store), str(err.value)

"""What an image archive may hold when it is unpacked (store._unpack_archive): files,
directories and links that stay inside (a docker-archive links a repeated layer.tar to the
first); a link or a name leaving the directory refuses the whole archive, on every Python
(tarfile's ``data`` filter from 3.11.4, the store's own check before)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from layerfs.store import oci, store


def _archive(path: Path, members: list[tuple[str, bytes | None, str | None]]) -> Path:
    """NAME with DATA (a file), or a symlink to TARGET, or a hard link to =TARGET."""
    with tarfile.open(path, "w") as tf:
        for name, data, target in members:
            info = tarfile.TarInfo(name)
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                assert target is not None
                hard = target.startswith("=")
                info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
                info.linkname = target[1:] if hard else target
                tf.addfile(info)
    return path


def test_links_inside_are_unpacked(tmp_path: Path) -> None:
    a = _archive(
        tmp_path / "a.tar",
        [("l1/layer.tar", b"x", None), ("l2/layer.tar", None, "../l1/layer.tar"),
         ("l3/layer.tar", None, "=l1/layer.tar")],
    )  # fmt: skip
    dest = tmp_path / "out"
    dest.mkdir()
    store._unpack_archive(str(a), str(dest))
    assert (dest / "l2/layer.tar").read_bytes() == b"x"
    assert (dest / "l3/layer.tar").read_bytes() == b"x"


@pytest.mark.parametrize(
    "members",
    [
        [("../evil", b"x", None)],
        [("up", None, "../..")],
        [("d/up", None, "../../outside")],
        [("abs", None, "/etc/passwd")],
        [("hard", None, "=../outside")],
    ],
    ids=[
        "dotdot-name",
        "symlink-up",
        "nested-symlink-up",
        "symlink-abs",
        "hard-up",
    ],
)
def test_a_member_leaving_the_directory_refuses_the_archive(
    tmp_path: Path, members: list[tuple[str, bytes | None, str | None]]
) -> None:
    a = _archive(tmp_path / "a.tar", members)
    dest = tmp_path / "deep" / "out"
    dest.mkdir(parents=True)
    with pytest.raises(oci.OciError):
        store._unpack_archive(str(a), str(dest))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "deep"]


def test_an_absolute_name_stays_inside(tmp_path: Path) -> None:
    """Refused by the store's check, made relative by tarfile's filter: never written at /."""
    a = _archive(tmp_path / "a.tar", [("/layerfs-test-absolute-name", b"x", None)])
    dest = tmp_path / "out"
    dest.mkdir()
    try:
        store._unpack_archive(str(a), str(dest))
    except oci.OciError:
        pass
    assert not Path("/layerfs-test-absolute-name").exists()

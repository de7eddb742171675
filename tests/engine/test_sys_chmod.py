"""``_sys.chmod_at``: fchmodat2 (AT_SYMLINK_NOFOLLOW) where the kernel has it, an lstat and a
chmod elsewhere; both must answer every case alike and leave the same modes: a file, a
directory (by name and as itself), a symlink (left alone, its target too), a dangling one,
and the errors."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs import _sys

CASES = [b"f", b"d", b".", b"l", b"dangling", b"nope", b"f/x"]


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    (tmp_path / "f").write_bytes(b"")
    (tmp_path / "d").mkdir()
    (tmp_path / "l").symlink_to("f")
    (tmp_path / "dangling").symlink_to("gone")
    for p in ("f", "d"):
        os.chmod(tmp_path / p, 0o640)
    os.chmod(tmp_path, 0o750)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield tmp_path, fd
    os.close(fd)


def _chmod(fd: int, name: bytes, mode: int) -> object:
    try:
        return _sys.chmod_at(fd, name, mode)
    except OSError as e:
        return type(e), e.errno


def _modes(root: Path) -> dict[str, int]:
    return {p: os.lstat(root / p).st_mode for p in ("", "f", "d", "l", "dangling")}


@pytest.mark.parametrize("name", CASES)
def test_fchmodat2_answers_as_lstat_and_chmod(
    tree: tuple[Path, int], name: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _sys.FCHMODAT2:
        pytest.skip("no fchmodat2 on this kernel: the lstat and chmod are the only path")
    root, fd = tree
    fast = _chmod(fd, name, 0o604), _modes(root)
    for p, mode in _modes(root).items():  # back as before
        if not stat.S_ISLNK(mode):
            os.chmod(root / p, 0o750 if p == "" else 0o640)
    monkeypatch.setattr(_sys, "FCHMODAT2", False)
    assert fast == (_chmod(fd, name, 0o604), _modes(root))


def test_chmod_at_results(tree: tuple[Path, int]) -> None:
    """What the cases do, so that two paths agreeing on nothing would fail."""
    root, fd = tree
    _sys.chmod_at(fd, b"f", 0o600)
    _sys.chmod_at(fd, b"l", 0o777)  # the symlink left alone, and its target
    _sys.chmod_at(fd, b".", 0o700)
    assert stat.S_IMODE(os.lstat(root / "f").st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(root).st_mode) == 0o700
    with pytest.raises(FileNotFoundError):
        _sys.chmod_at(fd, b"nope", 0o600)
    with pytest.raises(NotADirectoryError):
        _sys.chmod_at(fd, b"f/x", 0o600)

"""The dirfd-relative xattr reads: getxattrat/listxattrat where the kernel has them, the
/proc/self/fd path elsewhere; both must answer every case alike (values and listings past the
first buffer, the directory itself, symlinks not followed, errors)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from layerfs import _sys

CASES = [
    (b"f", b"user.small"),
    (b"f", b"user.big"),  # past the first 256-byte buffer
    (b"f", b"trusted.overlay.metacopy"),  # an empty value
    (b"f", b"user.none"),  # absent: ENODATA
    (b"", b"user.dir"),  # the directory itself
    (b"", b"user.none"),
    (b"l", b"user.small"),  # the symlink's own (none), not its target's
    (b"nope", b"user.small"),  # ENOENT
    (b"f/x", b"user.small"),  # ENOTDIR
]


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[int]:
    (tmp_path / "f").write_bytes(b"")
    (tmp_path / "l").symlink_to("f")
    os.setxattr(tmp_path / "f", "user.small", b"v")
    os.setxattr(tmp_path / "f", "user.big", b"b" * 3000)
    os.setxattr(tmp_path / "f", "trusted.overlay.metacopy", b"")
    os.setxattr(tmp_path, "user.dir", b"d")
    for i in range(20):  # a listing past the first buffer too
        os.setxattr(tmp_path, f"user.name{i:040d}", b"")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def _answer(call: Callable[[], object]) -> object:
    try:
        return call()
    except OSError as e:
        return type(e), e.errno


@pytest.mark.parametrize("name,attr", CASES)
def test_xattr_at_answers_as_the_proc_path(
    tree: int, name: bytes, attr: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _sys.XATTR_AT:
        pytest.skip("no getxattrat/listxattrat on this kernel: the /proc path is the only one")
    calls: list[Callable[[], object]] = [
        lambda: _sys.getxattr_at(tree, name, attr),
        lambda: _sys.getxattr_or_none_at(tree, name, attr),
        lambda: _sys.listxattr_at(tree, name),
    ]
    fast = [_answer(c) for c in calls]
    monkeypatch.setattr(_sys, "XATTR_AT", False)
    assert fast == [_answer(c) for c in calls]


def test_xattr_at_values(tree: int) -> None:
    """What the cases hold, so that two paths agreeing on nothing would fail."""
    assert _sys.getxattr_or_none_at(tree, b"f", b"user.big") == b"b" * 3000
    assert _sys.getxattr_or_none_at(tree, b"f", b"user.none") is None
    assert _sys.getxattr_or_none_at(tree, b"", b"user.dir") == b"d"
    assert _sys.getxattr_at(tree, b"l", b"user.small") is None
    assert len(_sys.listxattr_at(tree, b"")) == 21
    assert set(_sys.listxattr_at(tree, b"f")) >= {b"user.small", b"user.big"}
    with pytest.raises(FileNotFoundError):
        _sys.getxattr_or_none_at(tree, b"nope", b"user.small")

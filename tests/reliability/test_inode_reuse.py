"""Upper inode numbers are reused by the filesystem: a new object must never inherit the node of
a deleted one that the kernel still remembers.

Found by the crash workload: ``mkdir d; rmdir d; create c`` gives ``c`` the inode number ``d``
had on ext4/tmpfs, and opening ``c`` for write failed with EISDIR. Each case repeats, as the
kernel forgets nodes at its own pace.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._helpers import layerfs_daemon, needs_root

pytestmark = [pytest.mark.fuse, needs_root]

REPEAT = 20


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    lower, upper, work, m = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for p in (lower, upper, work, m):
        p.mkdir()
    with layerfs_daemon([lower], upper, work, m):
        yield m


def test_file_after_rmdir(mnt: Path) -> None:
    failures = []
    for i in range(REPEAT):
        os.mkdir(mnt / "d")
        os.rmdir(mnt / "d")
        (mnt / "c").write_bytes(b"")
        try:
            with open(mnt / "c", "ab") as fh:
                fh.write(b"x")
        except OSError as e:
            failures.append((i, e.strerror))
        os.unlink(mnt / "c")
    assert not failures, f"open for append of a new file after rmdir failed: {failures}"


def test_dir_after_unlink(mnt: Path) -> None:
    failures = []
    for i in range(REPEAT):
        (mnt / "c").write_bytes(b"file")
        os.unlink(mnt / "c")
        os.mkdir(mnt / "d")
        try:
            (mnt / "d" / "inner").write_bytes(b"inner")
            assert os.listdir(mnt / "d") == ["inner"]
            os.unlink(mnt / "d" / "inner")
        except OSError as e:
            failures.append((i, e.strerror))
        os.rmdir(mnt / "d")
    assert not failures, f"a new directory after unlink failed: {failures}"


def test_file_after_unlink_with_open_handle(mnt: Path) -> None:
    failures = []
    for i in range(REPEAT):
        (mnt / "old").write_bytes(b"old content")
        fd = os.open(mnt / "old", os.O_RDONLY)
        try:
            os.unlink(mnt / "old")
            (mnt / "new").write_bytes(b"new")
            got = ((mnt / "new").read_bytes(), os.pread(fd, 100, 0), os.fstat(fd).st_nlink)
            if got != (b"new", b"old content", 0):
                failures.append((i, got))
        finally:
            os.close(fd)
        os.unlink(mnt / "new")
    assert not failures, failures

"""A full upper filesystem (issue 3): ENOSPC reaches the writer, the daemon lives on, the lower
view stays intact, and nothing partial is left in the upper or the workdir.

The upper and workdir share an 8 MiB tmpfs; the lower (elsewhere) has a 32 MiB file that cannot
be copied up into it.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash

from layerfs.files import WRITERS_IDLE

from ._helpers import fd_count, layerfs_daemon, needs_root, tmpfs

pytestmark = [pytest.mark.fuse, needs_root]

BIG = 32 << 20


def _digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 << 20):
            h.update(chunk)
    out: str = h.hexdigest()
    return out


def _upper_files(upper: Path) -> dict[str, int]:
    return {
        os.path.relpath(os.path.join(d, n), upper): os.lstat(os.path.join(d, n)).st_size
        for d, _dirs, files in os.walk(upper)
        for n in files
    }


def _append(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


def test_full_upper_gives_enospc_and_keeps_serving(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    (lower / "dir").mkdir(parents=True)
    (lower / "dir" / "big").write_bytes(os.urandom(BIG))
    (lower / "small").write_bytes(b"small lower file\n")
    lower_digest = _digest(lower / "dir" / "big")
    mnt = tmp_path / "merged"
    mnt.mkdir()
    with tmpfs(tmp_path / "small-fs", "8m") as fs:
        upper, work = fs / "upper", fs / "work"
        upper.mkdir()
        work.mkdir()
        with layerfs_daemon([lower], upper, work, mnt) as d:
            # 1. Copy-up of a file larger than the upper filesystem.
            err = None
            try:
                fd = os.open(mnt / "dir" / "big", os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, b"x")
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                err = e.errno
            assert err == errno.ENOSPC, f"expected ENOSPC, got {err and errno.errorcode[err]}"
            assert d.alive(), d.log_text()
            assert os.listdir(work / "work") == [], "a failed copy-up left its temp file"
            assert not (upper / "dir" / "big").exists()
            # The daemon answers, and the merged view still shows the lower file, whole.
            assert sorted(os.listdir(mnt)) == ["dir", "small"]
            assert (mnt / "dir" / "big").stat().st_size == BIG
            assert _digest(mnt / "dir" / "big") == lower_digest
            # The error path leaks nothing: fds stay put over many failed copy-ups.
            fds = fd_count(d.pid)
            for _ in range(30):
                with pytest.raises(OSError) as exc:
                    _append(mnt / "dir" / "big")  # the first write copies up, not the open
                assert exc.value.errno == errno.ENOSPC
            assert fd_count(d.pid) <= fds + 2
            assert os.listdir(work / "work") == []

            # 2. Writes into a new upper file until the disk is full: ENOSPC from write/fsync.
            err = None
            written = 0
            fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                chunk = b"f" * (1 << 20)
                while written < 64 << 20:
                    written += os.write(fd, chunk)
                os.fsync(fd)
            except OSError as e:
                err = e.errno
            finally:
                try:
                    os.close(fd)
                except OSError as e:
                    err = err or e.errno
            assert err == errno.ENOSPC
            assert d.alive(), d.log_text()
            # What write() said it wrote is what the file holds.
            assert (mnt / "filler").stat().st_size == written == (upper / "filler").stat().st_size

            # 3. A small copy-up fails too while the disk is full, and works once space is freed.
            with pytest.raises(OSError) as exc, open(mnt / "small", "ab") as fh:
                fh.write(b"x" * (1 << 20))
                fh.flush()
                os.fsync(fh.fileno())
            assert exc.value.errno == errno.ENOSPC
            os.unlink(mnt / "filler")
            with open(mnt / "small", "ab") as fh:
                fh.write(b"appended\n")
            assert (mnt / "small").read_bytes() == b"small lower file\nappended\n"
            assert d.alive()
            assert os.listdir(work / "work") == []
            # Nothing partial in the upper: only complete copies and new files.
            files = _upper_files(upper)
            assert "dir/big" not in files
            assert files.get("small") == len(b"small lower file\nappended\n")
        assert not d.alive()
        assert d.proc.returncode == 0, d.log_text()
        assert "Traceback" not in d.log_text(), d.log_text()


def _remount_read_only(fs: Path) -> None:
    """Remount FS read-only. The daemon keeps the files it has just created or written open
    for writing until WRITERS_IDLE has passed without a write (layerfs.files), and the kernel
    refuses (EBUSY) meanwhile: retry for a few times that long, no more."""
    deadline = time.monotonic() + 20 * WRITERS_IDLE
    while True:
        done = subprocess.run(["mount", "-o", "remount,ro", str(fs)], capture_output=True)
        if done.returncode == 0:
            return
        assert time.monotonic() < deadline, done.stderr
        time.sleep(WRITERS_IDLE / 4)


def test_upper_failing_read_only_reaches_the_caller(tmp_path: Path) -> None:
    """The upper filesystem turns read-only under a live mount (as after an I/O error with
    errors=remount-ro): every change fails with the upper's error, reads go on, the daemon
    lives, and changes work again once the upper is writable."""
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "f").write_bytes(b"lower\n")
    mnt = tmp_path / "merged"
    mnt.mkdir()
    with tmpfs(tmp_path / "upper-fs", "8m") as fs:
        upper, work = fs / "upper", fs / "work"
        upper.mkdir()
        work.mkdir()
        with layerfs_daemon([lower], upper, work, mnt) as d:
            (mnt / "before").write_bytes(b"x")
            _remount_read_only(fs)
            try:
                failures = {}
                attempts: list[tuple[str, Callable[[], object]]] = [
                    ("copy-up", lambda: _append(mnt / "f")),
                    ("create", lambda: (mnt / "new").write_bytes(b"x")),
                    ("write", lambda: _append(mnt / "before")),
                    ("mkdir", lambda: os.mkdir(mnt / "dir")),
                    ("unlink", lambda: os.unlink(mnt / "f")),
                    ("chmod", lambda: os.chmod(mnt / "f", 0o600)),
                ]
                for what, fn in attempts:
                    try:
                        fn()
                    except OSError as e:
                        failures[what] = e.errno
                assert failures == dict.fromkeys(failures, errno.EROFS), failures
                assert sorted(failures) == sorted(
                    ["copy-up", "create", "write", "mkdir", "unlink", "chmod"]
                )
                assert (mnt / "f").read_bytes() == b"lower\n"
                assert sorted(os.listdir(mnt)) == ["before", "f"]
                assert d.alive()
            finally:
                subprocess.run(["mount", "-o", "remount,rw", str(fs)], check=True)
            with open(mnt / "f", "ab") as fh:
                fh.write(b"upper\n")
            assert (upper / "f").read_bytes() == b"lower\nupper\n"
            assert os.listdir(work / "work") == []
        assert d.proc.returncode == 0
        assert "Traceback" not in d.log_text(), d.log_text()

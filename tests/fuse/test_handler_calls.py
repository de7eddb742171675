"""What a handler costs the daemon in syscalls, counted with strace: a WRITE in opens (and that
the daemon keeps no file of the upper open for writing once writes stop), a SETATTR of a mode
and a failed lookup in stats.

Without OPEN requests a WRITE names a node, not an open file: the daemon writes through the
node's descriptor, the one MKNOD created the file with (a new regular file of its own), or
the one the first write opened (through the O_PATH check of ``_sys.open_data``), and closes
those once no write has come for ``files.WRITERS_IDLE``. The files left on disk are the same
either way (the differential suites compare them with the kernel's, ``held-write`` with a
descriptor held across renames): only these counts see the difference.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from support.mounts import mount_layerfs
from support.strace import Strace

from layerfs import _sys
from layerfs.files import WRITERS_IDLE

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed"),
]

FILES = 12
OPENS = "openat"  # the calls os.open makes


def _opens(calls: list[str]) -> list[str]:
    """The opens among CALLS (strace also shows calls it has no name for, getxattrat)."""
    return [c for c in calls if "openat(" in c]


def _stack(tmp_path: Path) -> dict[str, Path]:
    d = {n: tmp_path / n for n in ("lower", "upper", "work", "merged")}
    for p in d.values():
        p.mkdir()
    (d["lower"] / "dir").mkdir()
    (d["lower"] / "dir" / "old").write_bytes(b"lower\n")
    return d


def _write(path: Path, flags: int, data: bytes, times: int) -> None:
    fd = os.open(path, os.O_WRONLY | flags, 0o644)
    try:
        for _ in range(times):
            os.write(fd, data)
    finally:
        os.close(fd)


def _write_fds_in(pid: int, top: Path) -> list[str]:
    """The daemon's descriptors open for writing on files below TOP."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            flags = int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split()[3], 8)
        except (FileNotFoundError, ProcessLookupError):
            continue  # closed meanwhile
        if target.startswith(f"{top}/") and flags & os.O_ACCMODE != os.O_RDONLY:
            found.append(target)
    return found


def test_writes_after_a_create_open_nothing(tmp_path: Path) -> None:
    """Creating a file and writing it twice (tar writes a 4 KiB member that straddles two of
    its records in two calls) opens one file in the daemon: the new file, O_CREAT|O_EXCL.
    Before, MKNOD made it with mknodat and each WRITE opened it twice (O_PATH, then the
    reopen through /proc): no open at the MKNOD, four at the WRITEs."""
    d = _stack(tmp_path)
    with mount_layerfs([d["lower"]], d["upper"], d["work"], d["merged"]) as m:
        assert m.proc is not None
        _write(m.mnt / "dir" / "first", os.O_CREAT | os.O_EXCL, b"x", 1)  # the copy-up of dir
        tracer = Strace(m.proc.pid, tmp_path / "strace.out", OPENS)
        try:
            for i in range(FILES):
                _write(m.mnt / "dir" / f"f{i}", os.O_CREAT | os.O_EXCL, b"y" * 2048, 2)
        finally:
            calls = _opens(tracer.stop())
        for i in range(FILES):
            assert (m.mnt / "dir" / f"f{i}").read_bytes() == b"y" * 4096
    assert len(calls) == FILES, calls
    assert all("O_CREAT|O_EXCL" in c and "O_RDWR" in c for c in calls), calls
    for i in range(FILES):
        assert (d["upper"] / "dir" / f"f{i}").read_bytes() == b"y" * 4096


def test_later_writes_of_a_file_open_nothing(tmp_path: Path) -> None:
    """A copied-up file's first write opens it for writing (through the O_PATH check); the
    writes that follow within WRITERS_IDLE use that descriptor. Before, each write opened
    it (and closed it again)."""
    d = _stack(tmp_path)
    with mount_layerfs([d["lower"]], d["upper"], d["work"], d["merged"]) as m:
        assert m.proc is not None
        old = m.mnt / "dir" / "old"
        os.stat(old)
        tracer = Strace(m.proc.pid, tmp_path / "strace.out", OPENS)
        try:
            for n in range(1, 5):  # the first copies the file up
                _write(old, os.O_APPEND, b"%d\n" % n, 1)
        finally:
            calls = _opens(tracer.stop())
        assert old.read_bytes() == b"lower\n1\n2\n3\n4\n"
    for_writing = [c for c in calls if "/proc/self/fd/" in c and ("O_RDWR" in c or "O_WRONLY" in c)]
    assert len(for_writing) == 1, calls
    assert (d["upper"] / "dir" / "old").read_bytes() == b"lower\n1\n2\n3\n4\n"


def test_no_upper_file_stays_open_for_writing(tmp_path: Path) -> None:
    """Once writes stop, the daemon closes the descriptors it wrote through (a held one
    keeps the upper filesystem from being remounted read-only): within a few WRITERS_IDLE
    none is left open for writing on the upper, and the statistics count none."""
    d = _stack(tmp_path)
    with mount_layerfs([d["lower"]], d["upper"], d["work"], d["merged"]) as m:
        assert m.proc is not None
        for i in range(FILES):
            _write(m.mnt / "dir" / f"f{i}", os.O_CREAT | os.O_EXCL, b"z", 1)
        _write(m.mnt / "dir" / "old", os.O_APPEND, b"z", 1)
        deadline = time.monotonic() + 20 * WRITERS_IDLE
        while (left := _write_fds_in(m.proc.pid, d["upper"])) and time.monotonic() < deadline:
            time.sleep(WRITERS_IDLE / 4)
        assert left == []
        stats = json.loads(os.getxattr(m.mnt, "trusted.layerfs.statistics"))
        assert stats["node_write_fds"] == 0
        assert (m.mnt / "dir" / "f0").read_bytes() == b"z"  # reads reopen read-only
        assert _write_fds_in(m.proc.pid, d["upper"]) == []


@pytest.mark.skipif(not _sys.FCHMODAT2, reason="no fchmodat2 on this kernel")
def test_chmod_of_an_upper_file_stats_once(tmp_path: Path) -> None:
    """A SETATTR of a mode is one fchmodat2 (AT_SYMLINK_NOFOLLOW) and the reply's lstat of
    the file. Before, the lstat that kept symlinks out came first: two and an fchmodat."""
    d = _stack(tmp_path)
    with mount_layerfs([d["lower"]], d["upper"], d["work"], d["merged"]) as m:
        assert m.proc is not None
        f = m.mnt / "dir" / "new"
        _write(f, os.O_CREAT | os.O_EXCL, b"n", 1)
        tracer = Strace(m.proc.pid, tmp_path / "strace.out", "newfstatat,fchmodat")
        try:
            for mode in (0o600, 0o640, 0o604):
                os.chmod(f, mode)
        finally:
            calls = tracer.stop()
        assert os.stat(f).st_mode & 0o777 == 0o604
    assert not [c for c in calls if "fchmodat(" in c], calls
    assert len([c for c in calls if "syscall_0x1c4(" in c or "fchmodat2(" in c]) == 3, calls
    assert len([c for c in calls if "newfstatat(" in c and '"new"' in c]) == 3, calls
    assert os.stat(d["upper"] / "dir" / "new").st_mode & 0o777 == 0o604


def test_failed_lookups_in_a_directory_made_here_stat_once(tmp_path: Path) -> None:
    """A failed lookup in an upper directory looks for NAME, then for ``.wh.NAME``
    (fuse-overlayfs' whiteout) where one may be: in a directory the upper held at mount, not
    in one this mount made (mkdir, or the copy-up of a lower one), which holds none while
    whiteouts are char devices. Before, every miss stat'ed ``.wh.NAME`` too."""
    d = _stack(tmp_path)
    (d["upper"] / "old").mkdir()
    with mount_layerfs([d["lower"]], d["upper"], d["work"], d["merged"]) as m:
        assert m.proc is not None
        os.mkdir(m.mnt / "made")
        _write(m.mnt / "dir" / "new", os.O_CREAT | os.O_EXCL, b"n", 1)  # copies dir up
        tracer = Strace(m.proc.pid, tmp_path / "strace.out", "newfstatat")
        try:
            for sub in ("made", "dir", "old"):
                for i in range(FILES):
                    assert not os.path.lexists(m.mnt / sub / f"missing{i}")
        finally:
            calls = tracer.stop()
    looked = [c for c in calls if '"missing' in c]
    whiteouts = [c for c in calls if '".wh.missing' in c]
    assert len(looked) == 3 * FILES, calls
    assert len(whiteouts) == FILES, calls  # "old"'s only

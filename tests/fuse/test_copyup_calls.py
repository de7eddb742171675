"""The calls a copy-up makes once and then remembers, counted with strace on the daemon.

A `chmod -R` of lower files is one copy-up per file; what the kernel keeps in an inode flag or
a superblock (the parent is already ``impure``, the upper cannot reflink) layerfs keeps in its
nodes and its copy-up engine, so that only the first file pays for finding it out. The files
left on disk are the same either way (the differential suites compare them with the
kernel's): only these counts see the difference.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from support.mounts import mount_layerfs
from support.strace import Strace, traced_layerfs

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed"),
]

FILES = 12
XATTR_CALLS = "setxattr,fsetxattr,lsetxattr,getxattr,fgetxattr,lgetxattr"


def _stack(tmp_path: Path) -> dict[str, Path]:
    d = {n: tmp_path / n for n in ("lower", "upper", "work", "merged")}
    for p in d.values():
        p.mkdir()
    for sub in ("dir", "dir2"):
        (d["lower"] / sub).mkdir()
        for i in range(FILES):
            (d["lower"] / sub / f"f{i}").write_bytes(b"data %d\n" % i * (i + 1))
    return d


def _chmod_all(m: Path) -> None:
    for sub in ("dir", "dir2"):
        os.chmod(m / sub, 0o775)
        for i in range(FILES):
            os.chmod(m / sub / f"f{i}", 0o664)


def test_impure_marked_once_per_directory(tmp_path: Path) -> None:
    """Each upper directory that receives copied-up entries is marked ``overlay.impure`` with
    one call, by its first copy-up: the root (for dir, dir2), dir and dir2. Without the node's
    flag every copy-up tried again (a refused create, then a read of the value)."""
    d = _stack(tmp_path)
    with traced_layerfs(d, XATTR_CALLS) as (mnt, lines):
        _chmod_all(mnt)
    calls = [ln for ln in lines if "overlay.impure" in ln]
    assert len(calls) == 3, calls
    for p in (d["upper"], d["upper"] / "dir", d["upper"] / "dir2"):
        assert os.getxattr(p, "trusted.overlay.impure") == b"y"


def test_impure_mark_found_once_after_remount(tmp_path: Path) -> None:
    """An upper directory marked by an earlier mount is found marked once (the create refused,
    the value read), then remembered."""
    d = _stack(tmp_path)
    with mount_layerfs([d["lower"]], d["upper"], d["work"], d["merged"]):
        os.chmod(d["merged"] / "dir" / "f0", 0o600)
    with traced_layerfs(d, XATTR_CALLS, listed="dir") as (mnt, lines):
        for i in range(1, FILES):
            os.chmod(mnt / "dir" / f"f{i}", 0o600)
    calls = [ln for ln in lines if "overlay.impure" in ln]
    assert len(calls) == 2, calls
    assert "EEXIST" in calls[0]


def test_refused_reflink_asked_once(tmp_path: Path) -> None:
    """An upper whose filesystem cannot reflink (ext4, tmpfs) refuses FICLONE once; the copy-ups
    after it go straight to copy_file_range. One that can clones every file (xfs, btrfs)."""
    d = _stack(tmp_path)
    with traced_layerfs(d, "ioctl") as (mnt, lines):
        _chmod_all(mnt)
    clones = [ln for ln in lines if "FICLONE" in ln]
    refused = [ln for ln in clones if "= -1" in ln]
    assert len(refused) <= 1, clones
    assert len(clones) in (1, 2 * FILES), clones  # refused once, or cloned each time
    for i in range(FILES):
        assert (d["upper"] / "dir" / f"f{i}").read_bytes() == b"data %d\n" % i * (i + 1)


def test_copy_up_that_never_waits_dups_no_fd(tmp_path: Path) -> None:
    """A copy-up that does not wait (small files, fsync=volatile: no worker thread) works in
    the layers' cached directory fds; only one that waits takes duplicates (engine test
    test_copy_up_keeps_its_directories_across_a_wait). Two dups and two closes per file
    before."""
    d = _stack(tmp_path)
    with traced_layerfs(d, "fcntl,dup,dup2,dup3", options=["fsync=volatile"]) as (mnt, lines):
        _chmod_all(mnt)
    dups = [ln for ln in lines if "DUPFD" in ln or "dup" in ln]
    # os.scandir dups the fd of each directory it lists (dir and dir2, looked up): no more
    assert len(dups) <= 2, dups
    assert (d["upper"] / "dir2" / "f3").read_bytes() == b"data 3\n" * 4


def test_chmod_of_lower_file_made_on_the_copy(tmp_path: Path) -> None:
    """chmod of a lower regular file is made on its copy before the copy is linked in: no
    chmod by name afterwards (which needed an lstat first, to never follow a symlink, and
    another after for the reply). Directories are still changed after their copy-up."""
    d = _stack(tmp_path)
    with traced_layerfs(d, "chmod,fchmod,fchmodat") as (mnt, calls):
        _chmod_all(mnt)
        shown = [os.stat(mnt / "dir" / f"f{i}").st_mode for i in range(FILES)]
    # not copies; fchmodat2 (_sys.chmod_at, Linux 6.6+) is syscall_0x1c4 to an older strace,
    # which shows its arguments as numbers (copies are chmod'ed through their descriptor)
    fchmodat2 = ("fchmodat2(", "syscall_0x1c4(")
    by_name = [
        ln
        for ln in calls
        if ("fchmodat(" in ln and "#lfs." not in ln) or any(c in ln for c in fchmodat2)
    ]
    assert len(by_name) == 2, calls  # dir and dir2
    for i, mode in enumerate(shown):
        assert mode == os.lstat(d["upper"] / "dir" / f"f{i}").st_mode == 0o100664


def test_chmod_copy_up_sets_owner_and_mode_only_where_needed(tmp_path: Path) -> None:
    """A chmod'ed lower file's copy gets its mode once, from the chmod (the lower's mode before
    it was overwritten at once), and no fchown where a new file has the lower's owner already
    (root's files, to a root daemon); a file of another owner still gets its owner. The
    copies' owner, mode and setuid bit are the kernel's (the differential suites compare
    them); here only the calls are counted: 2 fchmod per file and 1 fchown before."""
    d = _stack(tmp_path)
    other = d["lower"] / "dir" / "theirs"
    other.write_bytes(b"x" * 100)
    os.chown(other, 1234, 5678)
    os.chmod(other, 0o4755)
    with traced_layerfs(d, "chown,fchown,fchmod") as (mnt, calls):
        _chmod_all(mnt)
        os.chmod(mnt / "dir" / "theirs", 0o4750)
    fchmods = [ln for ln in calls if "fchmod(" in ln]
    fchowns = [ln for ln in calls if "fchown(" in ln]
    assert len(fchmods) == 2 * FILES + 1, calls
    assert len(fchowns) == 1 and "1234, 5678" in fchowns[0], calls
    st = os.lstat(d["upper"] / "dir" / "theirs")
    assert (st.st_uid, st.st_gid, st.st_mode) == (1234, 5678, 0o104750)
    for i in range(FILES):
        st = os.lstat(d["upper"] / "dir2" / f"f{i}")
        assert (st.st_uid, st.st_gid, st.st_mode) == (0, 0, 0o100664)


def _chmod_each_traced(d: dict[str, Path], calls: str) -> list[str]:
    """chmod 0664 of every file of dir and dir2 with the daemon's CALLS traced, both
    directories copied up and listed before the trace (no copy-up of them, no lookup later)."""
    with mount_layerfs([d["lower"]], d["upper"], d["work"], d["merged"]) as m:
        assert m.proc is not None
        for sub in ("dir", "dir2"):
            os.chmod(m.mnt / sub, 0o775)
            os.listdir(m.mnt / sub)
        tracer = Strace(m.proc.pid, d["merged"].parent / "strace.out", calls)
        try:
            for sub in ("dir", "dir2"):
                for i in range(FILES):
                    os.chmod(m.mnt / sub / f"f{i}", 0o664)
        finally:
            lines = tracer.stop()
    return lines


def test_copy_up_stats_the_lower_once(tmp_path: Path) -> None:
    """A regular file's copy-up takes the lower's stat from the O_PATH descriptor it opens
    the data through (the check that it is a regular file), not from an lstat by name
    before it, and the copy's stat for the reply is the fstat of its descriptor once linked
    in: the names of the chmod'ed files are never stat'ed; twice each before session 11,
    once (the upper copy's lstat) before session 16."""
    d = _stack(tmp_path)
    calls = _chmod_each_traced(d, "stat,lstat,newfstatat,statx")
    named = [ln for ln in calls if any(f'"f{i}"' in ln for i in range(FILES))]
    assert named == [], calls
    for sub in ("dir", "dir2"):
        for i in range(FILES):
            assert os.lstat(d["upper"] / sub / f"f{i}").st_mode == 0o100664


def test_utime_copy_up_sets_the_times_once(tmp_path: Path) -> None:
    """utime (both times) of a lower file sets its copy's times once, the new ones (not the
    lower's first); the other utimensat is the parent's times put back. 3 calls before."""
    d = _stack(tmp_path)
    with mount_layerfs([d["lower"]], d["upper"], d["work"], d["merged"]):
        os.chmod(d["merged"] / "dir", 0o775)  # the parent copied up before the trace
    with traced_layerfs(d, "utime,utimes,utimensat,futimesat", listed="dir") as (mnt, calls):
        os.utime(mnt / "dir" / "f3", ns=(1_000_000_123, 2_000_000_456))
    assert len([ln for ln in calls if "utime" in ln]) == 2, calls
    st = os.lstat(d["upper"] / "dir" / "f3")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)


def test_copy_up_reads_the_lower_xattrs_through_its_data(tmp_path: Path) -> None:
    """A regular file's xattrs are listed and read through the descriptor its data is copied
    from (flistxattr, fgetxattr), not by name (listxattrat through ctypes, or the
    /proc/self/fd path): one call each, no path to resolve. The copies keep them."""
    d = _stack(tmp_path)
    os.setxattr(d["lower"] / "dir" / "f2", "user.kept", b"v2")
    # (listxattrat, getxattrat, _sys's by name where the kernel has them (6.13+), are
    # unnamed to strace 6.1: not traced; before, no f*xattr call was made at all)
    calls = _chmod_each_traced(d, "listxattr,llistxattr,flistxattr,getxattr,lgetxattr,fgetxattr")
    listed = [ln for ln in calls if "listxattr" in ln]
    assert len(listed) == 2 * FILES and all("flistxattr(" in ln for ln in listed), calls
    read = [ln for ln in calls if "user.kept" in ln and "listxattr" not in ln]
    assert len(read) == 1 and "fgetxattr(" in read[0], calls
    assert os.getxattr(d["upper"] / "dir" / "f2", "user.kept") == b"v2"

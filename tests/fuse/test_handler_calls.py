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
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
from support.mounts import IDMAP_OPTIONS, mount_layerfs, write_fds_in
from support.strace import Strace

from layerfs import _sys
from layerfs.files import WRITERS_IDLE

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed"),
]

FILES = 12
OPENS = "openat"  # the calls os.open makes


# What the dirty-page gauge (layerfs.dirty) reads, at most every INTERVAL while writes come:
# counters in /proc and /sys, whose reads depend on how long the writes take, not on them.
# Its files only: any other open of /proc (a write's reopen through /proc/self/fd, a
# caller's /proc/PID/status) is the requests' own, counted.
_GAUGE = re.compile(r'openat\(AT_FDCWD, "/(?:sys/|proc/(?:vmstat|self/cgroup|self/mountinfo)")')


def _opens(calls: list[str]) -> list[str]:
    """The opens among CALLS (strace also shows calls it has no name for, getxattrat), not
    the gauge's readings."""
    return [c for c in calls if "openat(" in c and not _GAUGE.search(c)]


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


def _requests(mnt: Path, op: str) -> int:
    """How many OP requests the daemon at MNT has served (its statistics xattr)."""
    return int(json.loads(os.getxattr(mnt, "trusted.layerfs.statistics")).get(f"req_{op}", 0))


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
        while (left := write_fds_in(m.proc.pid, d["upper"])) and time.monotonic() < deadline:
            time.sleep(WRITERS_IDLE / 4)
        assert left == []
        stats = json.loads(os.getxattr(m.mnt, "trusted.layerfs.statistics"))
        assert stats["node_write_fds"] == 0
        assert (m.mnt / "dir" / "f0").read_bytes() == b"z"  # reads reopen read-only
        assert write_fds_in(m.proc.pid, d["upper"]) == []


@pytest.mark.skipif(not _sys.FCHMODAT2, reason="no fchmodat2 on this kernel")
def test_chmod_of_an_upper_file_stats_once(tmp_path: Path) -> None:
    """A SETATTR of a mode of an upper file the daemon holds no descriptor of is one
    fchmodat2 (AT_SYMLINK_NOFOLLOW) and the reply's lstat of the file. Before, the lstat that
    kept symlinks out came first: two and an fchmodat."""
    d = _stack(tmp_path)
    (d["upper"] / "top").write_bytes(b"upper")  # never written through the mount: no descriptor
    with mount_layerfs([d["lower"]], d["upper"], d["work"], d["merged"]) as m:
        assert m.proc is not None
        f = m.mnt / "top"
        os.stat(f)
        tracer = Strace(m.proc.pid, tmp_path / "strace.out", "newfstatat,fchmodat")
        try:
            for mode in (0o600, 0o640, 0o604):
                os.chmod(f, mode)
        finally:
            calls = tracer.stop()
        assert os.stat(f).st_mode & 0o777 == 0o604
    assert not [c for c in calls if "fchmodat(" in c], calls
    assert len([c for c in calls if "syscall_0x1c4(" in c or "fchmodat2(" in c]) == 3, calls
    assert len([c for c in calls if "newfstatat(" in c and '"top"' in c]) == 3, calls
    assert os.stat(d["upper"] / "top").st_mode & 0o777 == 0o604


def test_one_time_set_alone_is_one_call(tmp_path: Path) -> None:
    """tar sets a file's mtime alone (utimensat, the atime UTIME_OMIT): the daemon's SETATTR
    passes UTIME_OMIT on (one utimensat, then the reply's lstat). Before, it lstat'ed first
    for the atime it kept: two lstats of the file a SETATTR."""
    d = _stack(tmp_path)
    (d["upper"] / "top").write_bytes(b"upper")
    with mount_layerfs([d["lower"]], d["upper"], d["work"], d["merged"]) as m:
        assert m.proc is not None
        f = m.mnt / "top"
        atime = os.stat(f).st_atime_ns
        tracer = Strace(m.proc.pid, tmp_path / "strace.out", "newfstatat,utimensat")
        try:
            for n in range(1, 4):
                subprocess.run(["touch", "-m", "-d", f"@{n * 1000}", str(f)], check=True)
        finally:
            calls = tracer.stop()
        st = os.stat(f)
        assert (st.st_atime_ns, st.st_mtime_ns) == (atime, 3000 * 10**9)
    assert len([c for c in calls if "utimensat(" in c and "UTIME_OMIT" in c]) == 3, calls
    assert len([c for c in calls if "newfstatat(" in c and '"top"' in c]) == 3, calls


def test_setattr_of_a_file_made_here_walks_no_path(tmp_path: Path) -> None:
    """An untarred file's owner, mode and mtime are set right after its data is written: the
    daemon sets them through the descriptor it created the file with (fchown, fchmod,
    futimens, and the reply's fstat), naming no path. Before: fchownat, fchmodat2 and
    utimensat by name, each with an lstat of the name."""
    d = _stack(tmp_path)
    with mount_layerfs([d["lower"]], d["upper"], d["work"], d["merged"]) as m:
        assert m.proc is not None
        _write(m.mnt / "dir" / "first", os.O_CREAT | os.O_EXCL, b"x", 1)  # the copy-up of dir
        calls_ = "newfstatat,fchownat,fchown,fchmod,fchmodat,utimensat"
        tracer = Strace(m.proc.pid, tmp_path / "strace.out", calls_)
        try:
            for i in range(FILES):
                f = m.mnt / "dir" / f"f{i}"
                _write(f, os.O_CREAT | os.O_EXCL, b"y", 1)
                os.chown(f, 1000, 1000)
                os.chmod(f, 0o640)
                subprocess.run(["touch", "-m", "-d", "@1000", str(f)], check=True)
        finally:
            calls = tracer.stop()
        for i in range(FILES):
            st = os.stat(m.mnt / "dir" / f"f{i}")
            assert (st.st_uid, st.st_mode & 0o777, st.st_mtime_ns) == (1000, 0o640, 1000 * 10**9)
    by_name = [c for c in calls if '"f' in c and ("fchownat(" in c or "utimensat(" in c)]
    assert not by_name and not [c for c in calls if "syscall_0x1c4(" in c], calls
    # the lstats of the names that found a file: at most the MKNOD's own (its reply)
    found = [c for c in calls if "newfstatat(" in c and '"f' in c and "ENOENT" not in c]
    assert len(found) <= FILES, found
    # (MKNOD makes the file with an fchown and an fchmod of its own, to the caller and 0600)
    assert len([c for c in calls if " fchown(" in c and ", 1000, 1000)" in c]) == FILES, calls
    assert len([c for c in calls if " fchmod(" in c and ", 0640)" in c]) == FILES, calls
    assert len([c for c in calls if "utimensat(" in c and "NULL" in c]) == FILES, calls
    for i in range(FILES):
        st = os.stat(d["upper"] / "dir" / f"f{i}")
        assert (st.st_uid, st.st_mode & 0o777, st.st_mtime_ns) == (1000, 0o640, 1000 * 10**9)


def test_capability_checks_of_a_file_made_here_read_nothing(tmp_path: Path) -> None:
    """The kernel asks for security.capability at a new file's first write and at each chown
    (its kill-priv checks). A file this mount made has none until a SETXATTR gives it one
    (Node.no_caps): the GETXATTRs are answered without a syscall. A lower file's is read once,
    its absence then known. Before: one getxattrat per GETXATTR."""
    d = _stack(tmp_path)
    with mount_layerfs([d["lower"]], d["upper"], d["work"], d["merged"]) as m:
        assert m.proc is not None
        for i in range(FILES):
            os.close(os.open(m.mnt / "dir" / f"f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        old = m.mnt / "dir" / "old"
        asked = _requests(m.mnt, "getxattr")
        tracer = Strace(m.proc.pid, tmp_path / "strace.out", "getxattr,lgetxattr,fgetxattr")
        try:
            for i in range(FILES):
                _write(m.mnt / "dir" / f"f{i}", 0, b"y", 1)
                os.chown(m.mnt / "dir" / f"f{i}", 1000, 1000)
            for _ in range(3):
                os.chown(old, 1000, 1000)
        finally:
            calls = tracer.stop()
        asked = _requests(m.mnt, "getxattr") - asked
    assert asked >= 2 * FILES + 3, asked  # the kernel did ask
    # getxattrat (syscall 464, unnamed by this strace), or getxattr through /proc
    reads = [c for c in calls if "syscall_0x1d0(" in c or "getxattr(" in c]
    assert len(reads) == 1, calls  # old's first chown


def test_failed_lookups_in_a_directory_made_here_stat_once(tmp_path: Path) -> None:
    """A failed lookup in an upper directory looks for NAME, then for ``.wh.NAME``
    (fuse-overlayfs' whiteout) where one may be: in a directory the upper held at mount, not
    in one this mount made (mkdir, or the copy-up of a lower one), which holds none while
    whiteouts are char devices. Before, every miss stat'ed ``.wh.NAME`` too. In a directory
    made here NAME is looked for by access(F_OK), which builds no stat and raises nothing
    on a miss (before, an lstat: every miss raised FileNotFoundError in the daemon); an
    UNLINK there names a file that exists, and lstats it alone."""
    d = _stack(tmp_path)
    (d["upper"] / "old").mkdir()
    with mount_layerfs([d["lower"]], d["upper"], d["work"], d["merged"]) as m:
        assert m.proc is not None
        os.mkdir(m.mnt / "made")
        _write(m.mnt / "dir" / "new", os.O_CREAT | os.O_EXCL, b"n", 1)  # copies dir up
        for i in range(FILES):
            _write(m.mnt / "made" / f"gone{i}", os.O_CREAT | os.O_EXCL, b"g", 1)
        tracer = Strace(m.proc.pid, tmp_path / "strace.out", "newfstatat,faccessat2,faccessat")
        try:
            for sub in ("made", "dir", "old"):
                for i in range(FILES):
                    assert not os.path.lexists(m.mnt / sub / f"missing{i}")
            for i in range(FILES):
                os.unlink(m.mnt / "made" / f"gone{i}")
        finally:
            calls = tracer.stop()
    stats = [c for c in calls if "newfstatat(" in c and '"missing' in c]
    access = [c for c in calls if "faccessat" in c and '"missing' in c]
    whiteouts = [c for c in calls if '".wh.missing' in c]
    assert len(stats) == FILES, calls  # "old"'s
    assert len(access) == 2 * FILES, calls
    assert len(whiteouts) == FILES, calls  # "old"'s only
    assert not [c for c in calls if "faccessat" in c and '"gone' in c], calls
    assert len([c for c in calls if "newfstatat(" in c and '"gone' in c]) >= FILES, calls


CREATING = "openat,mkdirat,mknodat,symlinkat,renameat2,fchown,fchownat,fchmod,fchmodat,getpid"


def _create_each_kind(dfd: int, prefix: str) -> None:
    for i in range(FILES):
        os.close(os.open(f"{prefix}f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd))
        os.mkdir(f"{prefix}d{i}", 0o755, dir_fd=dfd)
        os.mkfifo(f"{prefix}p{i}", 0o644, dir_fd=dfd)
        os.symlink("target", f"{prefix}s{i}", dir_fd=dfd)


def test_creates_by_the_daemons_own_ids_are_one_call(tmp_path: Path) -> None:
    """A create, mkdir, mknod or symlink by root, the daemon's own ids, is one call in the
    upper directory, as kernel overlayfs' ovl_create_upper: nothing built in the workdir
    (no temporary name, chown, chmod, rename), no getpid. A user's is built in the workdir,
    chowned and renamed into place. Before, root's were built too: a renameat2 each."""
    d = _stack(tmp_path)
    with mount_layerfs([d["lower"]], d["upper"], d["work"], d["merged"]) as m:
        assert m.proc is not None
        os.chmod(m.mnt / "dir", 0o777)  # copies dir up
        dfd = os.open(m.mnt / "dir", os.O_RDONLY | os.O_DIRECTORY)
        try:
            tracer = Strace(m.proc.pid, tmp_path / "strace.out", CREATING)
            try:
                _create_each_kind(dfd, "r")
            finally:
                root_calls = tracer.stop()
            tracer = Strace(m.proc.pid, tmp_path / "strace2.out", CREATING)
            try:
                pid = os.fork()
                if pid == 0:  # the descriptor reaches the mount past 0700 /tmp/pytest-of-root
                    code = 1
                    try:
                        os.setgroups([])
                        os.setgid(1000)
                        os.setuid(1000)
                        _create_each_kind(dfd, "u")
                        code = 0
                    finally:
                        os._exit(code)
                assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
            finally:
                user_calls = tracer.stop()
        finally:
            os.close(dfd)
        stats = json.loads(os.getxattr(m.mnt, "trusted.layerfs.statistics"))
    made = [c for c in root_calls if "openat(" in c and "O_CREAT" in c]
    made += [c for c in root_calls if c.split("(")[0].split()[-1] in ("mkdirat", "mknodat")]
    made += [c for c in root_calls if "symlinkat(" in c]
    assert len(made) == 4 * FILES and all('"r' in c for c in made), root_calls
    banned = ("renameat2(", "fchown(", "fchownat(", "fchmod(", "fchmodat(", "getpid(")
    assert not [c for c in root_calls if any(b in c for b in banned)], root_calls
    renames = [c for c in user_calls if "renameat2(" in c and "#lfs." in c]
    assert len(renames) == 4 * FILES, user_calls
    assert stats["ns_in_place"] == 4 * FILES and stats["ns_in_work"] == 4 * FILES, stats
    for p in ("r", "u"):
        uid = 0 if p == "r" else 1000
        for kind in "fdps":
            st = os.lstat(d["upper"] / "dir" / f"{p}{kind}0")
            assert (st.st_uid, st.st_gid) == (uid, uid)
            if kind != "s":
                assert stat.S_IMODE(st.st_mode) == (0o755 if kind == "d" else 0o644)


def _write_as(uid: int, where: Path, name: str, times: int) -> None:
    """Write NAME in WHERE TIMES times as UID (from inside WHERE: the user may not search the
    directories above it), a separate WRITE each."""
    pid = os.fork()
    if pid == 0:  # child: never return into the test runner
        code = 1
        try:
            os.chdir(where)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            fd = os.open(name, os.O_WRONLY | os.O_APPEND)
            for _ in range(times):
                os.write(fd, b"u")
            os.close(fd)
            code = 0
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0


def test_a_users_writes_read_no_groups(tmp_path: Path) -> None:
    """A WRITE by a user other than root may have to clear setgid, which depends on the
    writer's supplementary groups, but only for a setgid file outside the writer's own group:
    they are read from /proc/PID/status then (Caller.in_group), not at every write as before
    (a /proc read costs more than the rest of a small WRITE)."""
    d = _stack(tmp_path)
    with mount_layerfs([d["lower"]], d["upper"], d["work"], d["merged"]) as m:
        assert m.proc is not None
        f = m.mnt / "dir" / "shared"
        _write(f, os.O_CREAT | os.O_EXCL, b"r", 1)
        os.chmod(f, 0o666)
        tracer = Strace(m.proc.pid, tmp_path / "strace.out", OPENS)
        try:
            _write_as(1000, m.mnt / "dir", "shared", FILES)
        finally:
            calls = tracer.stop()
        assert f.read_bytes() == b"r" + b"u" * FILES
    assert not [c for c in calls if "/status" in c], calls


def _proc_reads(calls: list[str]) -> list[str]:
    """Opens and readlinks of another process's /proc files (/proc/PID/status, ns/user): a
    caller's groups or capabilities; not the daemon's own /proc/self/fd/N paths."""
    return [c for c in calls if re.search(r'"/proc/\d+/', c)]


def test_requests_on_an_id_mapped_mount_read_no_proc_files(tmp_path: Path) -> None:
    """On an id-mapped mount (uidmapping=, gidmapping=: rootless podman's) a request reads
    no /proc/PID file for its caller unless a setgid check needs the caller's groups: root's
    creates, mkdirs, symlinks, chmods, chowns, utimes and writes, and a user's writes to a
    file that is not setgid. Session 12's IdMap.caller read /proc/PID/status for every
    caller it mapped (found by reading, fixed in 19e87e7): this would have caught it. A
    user's write to a setgid file outside its group does read them (the control)."""
    d = _stack(tmp_path)
    with mount_layerfs(
        [d["lower"]], d["upper"], d["work"], d["merged"], options=IDMAP_OPTIONS
    ) as m:
        assert m.proc is not None
        os.chmod(m.mnt / "dir", 0o777)  # copies dir up
        shared = m.mnt / "dir" / "shared"
        _write(shared, os.O_CREAT | os.O_EXCL, b"r", 1)
        os.chmod(shared, 0o666)
        tracer = Strace(m.proc.pid, tmp_path / "strace.out", "openat,readlink,readlinkat")
        try:
            dfd = os.open(m.mnt / "dir", os.O_RDONLY | os.O_DIRECTORY)
            try:
                _create_each_kind(dfd, "r")
            finally:
                os.close(dfd)
            for i in range(FILES):
                f = m.mnt / "dir" / f"rf{i}"
                _write(f, 0, b"y", 2)
                os.chmod(f, 0o640)
                os.chown(f, 1000, 50)
                os.utime(f, ns=(1000, 1000))
            _write_as(1000, m.mnt / "dir", "shared", FILES)
        finally:
            calls = _proc_reads(tracer.stop())
        assert calls == [], calls
        sgid = m.mnt / "dir" / "sgid"
        _write(sgid, os.O_CREAT | os.O_EXCL, b"s", 1)
        os.chown(sgid, 0, 50)
        os.chmod(sgid, 0o2666)
        tracer = Strace(m.proc.pid, tmp_path / "strace2.out", "openat,readlink,readlinkat")
        try:
            _write_as(1000, m.mnt / "dir", "sgid", 1)
        finally:
            control = _proc_reads(tracer.stop())
        assert os.stat(sgid).st_mode & 0o7777 == 0o666  # cleared: 1000 is not in group 50
    assert any("/status" in c for c in control), control
    # stored through the mapping (IDMAP_UIDS, IDMAP_GIDS): root's (shown 0:0) as 2000:1000,
    # the chown's 1000:50 as 0:0
    st = os.stat(d["upper"] / "dir" / "rd0")
    assert (st.st_uid, st.st_gid) == (2000, 1000)
    st = os.stat(d["upper"] / "dir" / "rf0")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 0, 0o640)

"""kill -9 at every crash point of every mutating operation (issue 16, section 1).

For each scenario (lower layer, a few steps through a layerfs mount to make the upper, then one
operation), and for k = 1, 2, ...: fresh copies of the upper and workdir, a layerfs daemon told
to SIGKILL itself just before its k-th change to a filesystem (``LAYERFS_CRASH_AT=k``, an audit
hook in ``layerfs._sys.crash_at``), the operation, then ``layerfs umount`` of the dead mount.
A layerfs remount must show exactly the tree kernel overlayfs shows before the operation or the
one it shows after it, never one in between, and leave the workdir empty; kernel overlayfs
mounted on the same upper must show the same tree. The sweep ends at the first k the daemon
survives (the operation made fewer changes): that full run must show the after state too.

Why an in-process hook rather than strace: ``strace -e inject`` costs a ptrace stop per syscall
and seconds per run; the hook counts the calls the daemon makes through Python (every change
goes through an audited ``os`` call or an ``_sys`` wrapper), and the SIGKILL it sends itself is
a real kill -9 of the real daemon: nothing is buffered in userspace (writes go straight to the
upper), so the disk holds what a kill from outside at that instant would leave.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.mounts import mount_kernel
from support.snapshot import Snapshot, compare, fs_clock_ns, snapshot

from ._helpers import layerfs_daemon, needs_root

pytestmark = [pytest.mark.fuse, pytest.mark.kernel_overlay, needs_root]

MAX_POINTS = 60  # no operation here makes more changes; a sweep past it is a runaway
PARALLEL = 2
# A directory's link count is the kernel's business (1 when merged), and its mtime moves with
# every step in it (as under the kernel's overlay); what the operation times is compared only
# before it ran.
IGNORE = frozenset({"dir_mtime", "dir_nlink"})

Lower = Mapping[str, bytes | None]  # path -> file content, or None for a directory
Op = Callable[[Path], object]

_libc = ctypes.CDLL(None, use_errno=True)


def _exchange(a: Path, b: Path) -> None:
    if _libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), ctypes.c_uint(2)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _create(p: Path) -> None:
    os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))


def _append(p: Path) -> None:
    with open(p, "ab") as fh:
        fh.write(b"appended\n")


def _open_trunc(p: Path) -> None:
    os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))


def _fallocate(p: Path) -> None:
    fd = os.open(p, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, 1 << 20)
    finally:
        os.close(fd)


def _setxattr(p: Path) -> None:
    os.setxattr(p, "user.crash", b"v", follow_symlinks=False)


def _setgid_dir(m: Path) -> None:
    (m / "u").mkdir()
    os.chown(m / "u", 0, 50)
    os.chmod(m / "u", 0o2777)


def _default_acl_dir(m: Path) -> None:
    (m / "u").mkdir()
    subprocess.run(["setfacl", "-d", "-m", "u:1000:rwx", str(m / "u")], check=True)


def _as_user(uid: int, gid: int, rel: str) -> Op:
    """Create REL below the mount as UID:GID (no groups, umask 022): a user's new file,
    which the daemon (root) builds in the workdir and chowns. The child works from a
    descriptor of the mount root opened before it drops root: the test's directories above
    the mount (/tmp/pytest-of-root is 0700) are not searchable by the user."""

    def run(m: Path) -> None:
        dfd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
        pid = os.fork()
        if pid == 0:  # child: never return into the test runner
            code = 0
            try:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                os.umask(0o022)
                os.close(os.open(rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o664, dir_fd=dfd))
            except OSError as e:
                code = e.errno or 1
            finally:
                os._exit(code)
        os.close(dfd)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code:
            raise OSError(code, os.strerror(code))

    return run


def sh(*cmds: str) -> Op:
    """Steps through the mount: ``rm P``, ``rm -r P``, ``rm P/*``, ``mkdir P``, ``write P TEXT``."""

    def run(m: Path) -> None:
        for cmd in cmds:
            verb, *args = cmd.split()
            if verb == "rm" and args[0] == "-r":
                shutil.rmtree(m / args[1])
            elif verb == "rm" and args[0].endswith("/*"):
                for child in (m / args[0][:-2]).iterdir():
                    child.unlink()
            elif verb == "rm":
                (m / args[0]).unlink()
            elif verb == "mkdir":
                (m / args[0]).mkdir()
            elif verb == "write":
                (m / args[0]).write_bytes(args[1].encode())
            else:
                raise AssertionError(f"unknown step {cmd!r}")

    return run


@dataclass(frozen=True)
class Scenario:
    name: str
    lower: Lower
    pre: Op
    op: Op
    options: tuple[str, ...] = ()  # mount options, of layerfs and of the kernel's overlay alike
    # A metacopy file's data is filled in place: its mtime moves with the writes and is set
    # back after them, so a crash in between shows the fill's time (the content unchanged).
    mtime_may_move: bool = False


META = ("metacopy=on",)


BIG = bytes(range(256)) * 4096  # 1 MiB: a copy-up with data
F = {"f": b"f", "g": b"g"}
AB = {"a": None, "a/x": b"x", "b": None, "b/y": b"y"}

SCENARIOS = [
    # --- the two reproduced bugs of issue 16 ---
    Scenario(
        "rename_dir_over_dir_of_whiteouts",
        {"dst": None, "dst/f1": b"1", "dst/f2": b"2"},
        sh("rm dst/*", "mkdir src", "write src/new n"),
        lambda m: os.rename(m / "src", m / "dst"),
    ),
    Scenario(
        "rename_new_dir_over_whiteout",
        {"victim": None, "victim/a": b"a"},
        sh("rm -r victim", "mkdir newd"),
        lambda m: os.rename(m / "newd", m / "victim"),
    ),
    # --- rename ---
    Scenario("rename_lower_dir", AB, sh(), lambda m: os.rename(m / "a", m / "c")),
    Scenario("rename_lower_dir_across_dirs", AB, sh(), lambda m: os.rename(m / "a", m / "b/a")),
    Scenario(
        "rename_merged_dir_across_dirs",
        AB,
        sh("write a/new n", "rm a/x"),
        lambda m: os.rename(m / "a", m / "b/a"),
    ),
    Scenario(
        "rename_lower_dir_over_whiteout",
        AB,
        sh("rm -r b"),
        lambda m: os.rename(m / "a", m / "b"),
    ),
    Scenario(
        "rename_lower_dir_over_dir_of_whiteouts",
        AB,
        sh("rm b/y"),
        lambda m: os.rename(m / "a", m / "b"),
    ),
    Scenario(
        "rename_lower_dir_over_empty_lower_dir",
        {"a": None, "a/x": b"x", "c": None},
        sh(),
        lambda m: os.rename(m / "a", m / "c"),
    ),
    Scenario(
        "rename_upper_dir_into_lower_dir",
        {"d": None, "d/e": b"e"},
        sh("mkdir u", "write u/v v"),
        lambda m: os.rename(m / "u", m / "d/u"),
    ),
    Scenario("rename_lower_file", F, sh(), lambda m: os.rename(m / "f", m / "n")),
    Scenario("rename_lower_file_over_lower_file", F, sh(), lambda m: os.rename(m / "f", m / "g")),
    Scenario(
        "rename_lower_file_over_whiteout", F, sh("rm g"), lambda m: os.rename(m / "f", m / "g")
    ),
    Scenario(
        "rename_upper_file_over_lower_file",
        F,
        sh("write n n"),
        lambda m: os.rename(m / "n", m / "g"),
    ),
    Scenario(
        "rename_upper_file_over_whiteout",
        F,
        sh("rm g", "write n n"),
        lambda m: os.rename(m / "n", m / "g"),
    ),
    Scenario("exchange_lower_files", F, sh(), lambda m: _exchange(m / "f", m / "g")),
    Scenario("exchange_lower_dirs", AB, sh(), lambda m: _exchange(m / "a", m / "b")),
    Scenario(
        "exchange_upper_dir_and_lower_dir",
        AB,
        sh("mkdir u", "write u/v v"),
        lambda m: _exchange(m / "u", m / "b"),
    ),
    # --- removal ---
    Scenario("unlink_lower_file", F, sh(), lambda m: (m / "f").unlink()),
    Scenario(
        "unlink_copied_up_file",
        F,
        lambda m: os.chmod(m / "f", 0o600),
        lambda m: (m / "f").unlink(),
    ),
    Scenario("rmdir_lower_dir", {"d": None}, sh(), lambda m: (m / "d").rmdir()),
    Scenario(
        "rmdir_dir_of_whiteouts",
        {"d": None, "d/a": b"a", "d/b": b"b"},
        sh("rm d/*"),
        lambda m: (m / "d").rmdir(),
    ),
    Scenario(
        "rmdir_upper_dir",
        {"d": None},
        sh("mkdir u", "write u/f f", "rm u/f"),
        lambda m: (m / "u").rmdir(),
    ),
    # --- copy-up (parents first: a/b) ---
    Scenario(
        "copy_up_by_append",
        {"a": None, "a/b": None, "a/b/f": BIG},
        sh(),
        lambda m: _append(m / "a/b/f"),
    ),
    Scenario("copy_up_by_chmod", F, sh(), lambda m: os.chmod(m / "f", 0o600)),
    Scenario("copy_up_by_chown", F, sh(), lambda m: os.chown(m / "f", 1234, 5678)),
    Scenario("copy_up_by_truncate", {"f": BIG}, sh(), lambda m: os.truncate(m / "f", 1000)),
    Scenario("copy_up_by_setxattr", F, sh(), lambda m: _setxattr(m / "f")),
    Scenario("copy_up_by_utime", F, sh(), lambda m: os.utime(m / "f", (1, 2))),
    Scenario("copy_up_dir_by_chmod", AB, sh(), lambda m: os.chmod(m / "a", 0o700)),
    Scenario("copy_up_by_fallocate", F, sh(), lambda m: _fallocate(m / "f")),
    Scenario("copy_up_by_open_trunc", {"f": BIG}, sh(), lambda m: _open_trunc(m / "f")),
    # --- metacopy: metadata first, the data at the first write (filled in place) ---
    Scenario("metacopy_by_chmod", {"f": BIG}, sh(), lambda m: os.chmod(m / "f", 0o600), META),
    Scenario(
        "metacopy_fill_by_append",
        {"f": BIG},
        lambda m: os.chmod(m / "f", 0o600),
        lambda m: _append(m / "f"),
        META,
        mtime_may_move=True,
    ),
    Scenario(
        "metacopy_rename_across_dirs",
        {"f": BIG, "d": None},
        sh(),
        lambda m: os.rename(m / "f", m / "d/f"),
        META,
    ),
    # --- creation, in a lower directory and over a whiteout ---
    Scenario("create_in_lower_dir", AB, sh(), lambda m: _create(m / "a/n")),
    # root's new objects are made in place in one call (Namespace._as_made); a user's, a
    # setgid directory's as the user, a default ACL directory's are built in the workdir
    Scenario("create_in_upper_dir", AB, sh("mkdir u"), lambda m: _create(m / "u/n")),
    Scenario("create_in_setgid_dir", AB, _setgid_dir, lambda m: _create(m / "u/n")),
    Scenario("create_in_default_acl_dir", AB, _default_acl_dir, lambda m: _create(m / "u/n")),
    Scenario("create_as_user", AB, lambda m: os.chmod(m / "a", 0o777), _as_user(1000, 100, "a/n")),
    Scenario("create_as_user_in_setgid_dir", AB, _setgid_dir, _as_user(1000, 100, "u/n")),
    Scenario("mkdir_in_upper_dir", AB, sh("mkdir u"), lambda m: (m / "u/n").mkdir()),
    Scenario("mkdir_in_setgid_dir", AB, _setgid_dir, lambda m: (m / "u/n").mkdir()),
    Scenario("symlink_in_upper_dir", AB, sh("mkdir u"), lambda m: os.symlink("t", m / "u/n")),
    Scenario("mknod_in_upper_dir", AB, sh("mkdir u"), lambda m: os.mkfifo(m / "u/n", 0o640)),
    Scenario("create_over_whiteout", F, sh("rm f"), lambda m: _create(m / "f")),
    Scenario("mkdir_over_whiteout", AB, sh("rm -r a"), lambda m: (m / "a").mkdir()),
    Scenario("mkdir_in_lower_dir", AB, sh(), lambda m: (m / "a/n").mkdir()),
    Scenario("symlink_over_whiteout", F, sh("rm f"), lambda m: os.symlink("target", m / "f")),
    Scenario("mknod_over_whiteout", F, sh("rm f"), lambda m: os.mkfifo(m / "f", 0o640)),
    Scenario("link_lower_file", F, sh(), lambda m: os.link(m / "f", m / "l")),
    Scenario("link_over_whiteout", F, sh("rm g"), lambda m: os.link(m / "f", m / "g")),
]


def _make_lower(lower: Path, spec: Lower) -> None:
    lower.mkdir()
    for rel, content in spec.items():
        if content is None:
            (lower / rel).mkdir()
        else:
            (lower / rel).write_bytes(content)


def _copy(src: Path, dst: Path) -> None:
    """A copy keeping whiteouts, owners and trusted.overlay.* xattrs (cp -a as root)."""
    subprocess.run(["cp", "-a", "--", os.fspath(src), os.fspath(dst)], check=True)


def _disk_state(run: Path) -> tuple[object, ...]:
    """What a remount can see of a crashed run: the upper as stored (directory times and link
    counts aside, as in IGNORE) and whether the workdir holds leftovers."""
    snap = snapshot(run / "upper")
    rows = tuple(
        (p, e.kind, e.mode, e.uid, e.gid, e.size, e.target, e.digest, e.rdev, e.xattrs)
        + (() if e.kind == "dir" else (e.nlink, e.mtime_ns))
        for p, e in sorted(snap.entries.items())
    )
    return rows, tuple(snap.links), bool(os.listdir(run / "work" / "work"))


class Verdicts:
    """One verification per state left on disk, shared by the crash points (run in threads)
    that leave it: the first to reach a state checks it, the others wait for its verdict (the
    same layers make the same remount)."""

    def __init__(self) -> None:
        self.done = threading.Condition()
        self.verified: dict[object, str] = {}  # "": being checked

    def once(self, key: object, verify: Callable[[], str]) -> str:
        """The verdict on state KEY: VERIFY()'s, run here unless another point ran it."""
        with self.done:
            if key in self.verified:
                self.done.wait_for(lambda: self.verified[key] != "")
                return self.verified[key]
            self.verified[key] = ""  # ours to check
        state = "failed"
        try:
            state = verify()
        finally:
            with self.done:
                self.verified[key] = state
                self.done.notify_all()
        return state


@dataclass
class Sweep:
    """One scenario's crash points, run two at a time (the checks are mostly waiting)."""

    sc: Scenario
    tmp: Path
    lower: Path
    tpl: Path
    before: Snapshot
    after: Snapshot
    since_ns: int
    verdicts: Verdicts = field(default_factory=Verdicts)

    def match(self, snap: Snapshot) -> tuple[str, list[str]]:
        """Which reference state SNAP is ("before"/"after"), or "" and its differences."""
        ignore = IGNORE | {"file_mtime"} if self.sc.mtime_may_move else IGNORE
        d_before = compare(self.before, snap, ignore=ignore, since_ns=self.since_ns)
        if not d_before:
            return "before", []
        d_after = compare(self.after, snap, ignore=ignore, since_ns=self.since_ns)
        if not d_after:
            return "after", []
        return "", ["vs before:", *d_before, "vs after:", *d_after]

    def verify(self, k: int, run: Path) -> str:
        """Remount crashed run RUN (layerfs, then kernel overlayfs); the state both show."""
        upper, work, mnt = run / "upper", run / "work", run / "mnt"
        with layerfs_daemon([self.lower], upper, work, mnt, options=self.sc.options):
            assert os.listdir(work / "work") == [], "the remount must clean the workdir"
            state, diffs = self.match(snapshot(mnt))
        what = f"{self.sc.name}: crash before change {k}"
        assert state, f"{what}, layerfs remount:\n" + "\n".join(diffs)
        with mount_kernel([self.lower], upper, work, mnt, options=self.sc.options):
            kstate, diffs = self.match(snapshot(mnt))
        assert kstate == state, (
            f"{what}: layerfs shows {state}, kernel overlayfs on the same upper "
            f"{kstate or 'neither'}:\n" + "\n".join(diffs)
        )
        return state

    def point(self, k: int) -> str | None:
        """Crash before change K and check the remounts: the state shown, or None when the
        daemon made fewer than K changes (then the complete run must show the after state)."""
        run = self.tmp / f"k{k}"
        _copy(self.tpl, run)
        mnt = run / "mnt"
        mnt.mkdir()
        upper, work = run / "upper", run / "work"
        env = {"LAYERFS_CRASH_AT": str(k)}
        opts = self.sc.options
        with layerfs_daemon([self.lower], upper, work, mnt, options=opts, env=env) as d:
            err = _run_op(self.sc.op, mnt)
            if err == 0 and d.alive():
                state, diffs = self.match(snapshot(mnt))
                assert state == "after", f"{self.sc.name}: complete run:\n" + "\n".join(diffs)
                return None
            d.proc.wait(timeout=20)
            assert d.proc.returncode == -9, f"daemon exit {d.proc.returncode}:\n{d.log_text()}"
            assert err in (0, errno.ENOTCONN, errno.ECONNABORTED), f"op failed: {err}"
        # (the context's exit unmounted the dead daemon's mount, fusermount3 -u -z)
        state = self.verdicts.once(_disk_state(run), lambda: self.verify(k, run))
        shutil.rmtree(run)
        return state


def _run_op(op: Op, mnt: Path) -> int:
    """Run OP on the mount; 0, or the errno it failed with (the daemon died under it)."""
    try:
        op(mnt)
    except OSError as e:
        return e.errno or -1
    return 0


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_crash_at_every_point(tmp_path: Path, sc: Scenario) -> None:
    lower = tmp_path / "lower"
    _make_lower(lower, sc.lower)
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    (tpl / "upper").mkdir()
    (tpl / "work").mkdir()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with layerfs_daemon([lower], tpl / "upper", tpl / "work", mnt, options=sc.options):
        sc.pre(mnt)
    # The kernel's view of the same upper before and after the operation: the only two states
    # a crash may leave.
    ref = tmp_path / "ref"
    _copy(tpl, ref)
    since_ns = fs_clock_ns()
    with mount_kernel([lower], ref / "upper", ref / "work", mnt, options=sc.options):
        before = snapshot(mnt)
        sc.op(mnt)
        after = snapshot(mnt)
    sweep = Sweep(sc, tmp_path, lower, tpl, before, after, since_ns)
    assert sweep.match(after)[0] == "after" and sweep.match(before)[0] == "before"
    assert sweep.match(after) != sweep.match(before), "the operation changes nothing"

    seen: list[str] = []
    with ThreadPoolExecutor(PARALLEL) as pool:
        for k in range(1, MAX_POINTS + 1, PARALLEL):
            states = list(pool.map(sweep.point, range(k, k + PARALLEL)))
            seen += [s for s in states if s is not None]
            if None in states:
                break
        else:
            raise AssertionError(f"{sc.name}: still crashing after {MAX_POINTS} changes")
    assert seen, f"{sc.name}: the operation changed nothing on disk"
    states = len(sweep.verdicts.verified)
    print(f"{sc.name}: {len(seen)} crash points, {states} states on disk: {seen}")

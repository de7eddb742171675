"""``-o share=K`` (layerfs.share): one process serves up to K mounts of a key.

What these hold: K mounts made by ``mount.layerfs`` (and by ``layerfs mount``) are served by
one process, each answering as kernel overlayfs does on the same stack; the K+1st goes to
another process; unmounting one leaves the others serving and frees its room; a kill -9 of
the process takes its mounts (ENOTCONN) and nothing else; SIGTERM unmounts all its mounts;
the process exits with its last mount, leaving nothing behind; a user namespace's mounts
share a process of that namespace.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from compat.helpers import (
    USERNS,
    helper_command,
    helper_env,
    reap,
    run_helper_script,
)
from support.mounts import layerfs_command, mount_kernel
from support.ops import Op, apply_all, compare_results
from support.snapshot import assert_same, fs_clock_ns, snapshot

from layerfs import fusehooks

pytestmark = pytest.mark.fuse
TIMEOUT = 60


@pytest.fixture
def stacks(tmp_path: Path) -> Iterator[list[dict[str, Path]]]:
    """Five stacks over one two-layer lower (a file f, a directory with files, a whiteout);
    their mounts are reaped afterwards."""
    low, top = tmp_path / "low", tmp_path / "top"
    (low / "d").mkdir(parents=True)
    (top / "d").mkdir(parents=True)
    (low / "f").write_text("x")
    (low / "d" / "a").write_text("lower a")
    (low / "d" / "gone").write_text("whited out")
    os.mknod(top / "d" / "gone", 0o600 | 0o020000, os.makedev(0, 0))
    (top / "d" / "b").write_text("top b")
    out = []
    for i in range(5):
        d = {"lower": top, "lower2": low}
        for name in ("upper", "work", "merged"):
            d[name] = tmp_path / f"{name}{i}"
            d[name].mkdir()
        out.append(d)
    yield out
    for d in out:
        reap(d["merged"])


def _opts(d: dict[str, Path], share: int) -> str:
    return (
        f"lowerdir={d['lower']}:{d['lower2']},upperdir={d['upper']},workdir={d['work']},"
        f"share={share}"
    )


def _mount(
    d: dict[str, Path],
    share: int,
    env: dict[str, str] | None = None,
    *,
    check: bool = True,
    extra: str = "",
) -> None:
    r = subprocess.run(
        [*helper_command(), "overlay", str(d["merged"]), "-o", _opts(d, share) + extra],
        capture_output=True,
        text=True,
        env=env or helper_env(),
        timeout=TIMEOUT,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    if check:
        assert (d["merged"] / "f").read_text() == "x"


def _pid(d: dict[str, Path]) -> int:
    """The process serving D's mount (its statistics say)."""
    stats = json.loads(os.getxattr(d["merged"], "trusted.layerfs.statistics"))
    return int(stats["pid"])


def _unmount(d: dict[str, Path]) -> None:
    subprocess.run(["fusermount3", "-u", str(d["merged"])], check=True)


def _answer(d: dict[str, Path]) -> int:
    """A lookup of a name never looked up (the kernel must ask): 0 or the errno."""
    try:
        os.stat(d["merged"] / f"probe-{time.monotonic_ns()}")
    except OSError as e:
        return e.errno or 0
    return 0


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rpartition(b")")[2].split()[0] == b"Z":
                    return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.05)
    return False


SCRIPT: list[Op] = [
    ("write", b"f", 0, b"Y"),
    ("read", b"f"),
    ("listdir", b"d"),
    ("read", b"d/gone"),
    ("create", b"d/new", b"new file"),
    ("unlink", b"d/a"),
    ("listdir", b"d"),
    ("mkdir", b"e"),
    ("rename", b"d/b", b"e/b"),
    ("chmod", b"e/b", 0o600),
    ("stat", b"e/b"),
    ("listdir", b"e"),
]


@pytest.mark.parametrize("loop", ["default", "craw"])
def test_mounts_share_a_process_each_as_the_kernel(
    stacks: list[dict[str, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """... and with the compiled raw path (LAYERFS_LOOP=craw), whose C state is one a
    session: with one for the process, a second mount's took the first's place and a
    request the first's wait left for libfuse was never answered (the SCRIPT's write hung)."""
    if loop == "craw":
        if fusehooks.craw_module() is None:
            pytest.skip("layerfs._craw is not built (scripts/setup.sh builds it: Cython and gcc)")
        monkeypatch.setenv("LAYERFS_LOOP", loop)
    for d in stacks[:4]:
        _mount(d, share=3)
    pids = [_pid(d) for d in stacks[:4]]
    assert pids[0] == pids[1] == pids[2] != pids[3], pids
    # every mount of the process as the kernel on the same stack: results, then the trees
    for i, d in enumerate(stacks[:3]):
        k = {n: tmp_path / f"k{i}-{n}" for n in ("upper", "work", "merged")}
        for p in k.values():
            p.mkdir()
        lowers = [d["lower"], d["lower2"]]
        with mount_kernel(lowers, k["upper"], k["work"], k["merged"]) as km:
            since = fs_clock_ns()
            expected = apply_all(km.mnt, SCRIPT)
            actual = apply_all(d["merged"], SCRIPT)
            assert compare_results(SCRIPT, expected, actual) == []
            assert_same(snapshot(km.mnt), snapshot(d["merged"]), since_ns=since)
    # one unmounted: the others serve on, and its room is taken by the next mount
    _unmount(stacks[1])
    assert _answer(stacks[0]) == _answer(stacks[2]) == errno.ENOENT
    # the room is freed once the process has seen its mount end, after fusermount3 returned;
    # until then the next mount may go to the other process, which has room too: try again
    deadline = time.monotonic() + TIMEOUT
    while True:
        _mount(stacks[4], share=3)
        if _pid(stacks[4]) == pids[0] or time.monotonic() > deadline:
            break
        assert _pid(stacks[4]) == pids[3]
        _unmount(stacks[4])
        time.sleep(0.1)
    assert _pid(stacks[4]) == pids[0]
    assert (stacks[4]["merged"] / "d" / "b").read_text() == "top b"
    for d in (stacks[0], stacks[2], stacks[3]):
        _unmount(d)
    assert not _gone(pids[0], timeout=0.5), "the process left while a mount was served"
    assert _gone(pids[3]), "the other process outlived its last mount"
    _unmount(stacks[4])
    assert _gone(pids[0]), "the process outlived its last mount"


def test_kill_of_the_process_takes_its_mounts_only(stacks: list[dict[str, Path]]) -> None:
    a, b, c, alone = stacks[:4]
    for d in (a, b):
        _mount(d, share=2)
    _mount(c, share=2)
    _mount(alone, share=1)
    shared, other = _pid(a), _pid(c)
    assert _pid(b) == shared != other != _pid(alone)
    os.kill(shared, signal.SIGKILL)
    assert _gone(shared)
    assert _answer(a) in (errno.ENOTCONN, errno.ECONNABORTED)
    assert _answer(b) in (errno.ENOTCONN, errno.ECONNABORTED)
    assert _answer(c) == _answer(alone) == errno.ENOENT
    # its room is gone with it: the next share=2 mount goes to the other process
    d = stacks[4]
    _mount(d, share=2)
    assert _pid(d) == other
    for m in (a, b):
        subprocess.run(["fusermount3", "-u", "-z", str(m["merged"])], check=True)
    for m in (c, alone, d):
        _unmount(m)
    assert _gone(other)


def test_sigterm_unmounts_every_mount_of_the_process(stacks: list[dict[str, Path]]) -> None:
    a, b = stacks[:2]
    _mount(a, share=2)
    _mount(b, share=2)
    pid = _pid(a)
    assert _pid(b) == pid
    os.kill(pid, signal.SIGTERM)
    assert _gone(pid)
    mounted = Path("/proc/self/mountinfo").read_text()
    assert f" {a['merged']} " not in mounted and f" {b['merged']} " not in mounted


USERNS_SCRIPT = """
set -e
"$@" overlay "$MNT" -o "lowerdir=$LOWER,upperdir=$UPPER,workdir=$WORK,share=2"
"$@" overlay "$MNT2" -o "lowerdir=$LOWER,upperdir=$UPPER2,workdir=$WORK2,share=2"
echo "x$(cat "$MNT/f") x$(cat "$MNT2/f")"
n=0
ours=$(readlink /proc/self/ns/user)
for p in /proc/[0-9]*; do
    [ "$(readlink $p/ns/user 2>/dev/null)" = "$ours" ] || continue
    title=$(tr '\\0' ' ' < $p/cmdline 2>/dev/null || true)
    if echo "$title" | grep -q -e "^layerfs $MNT" -e "^layerfs $MNT2" -e "^layerfs-share"; then
        n=$((n + 1))
        echo "$(basename $p) $(readlink $p/ns/user)"
    fi
done
echo "daemons $n"
fusermount3 -u "$MNT"
fusermount3 -u "$MNT2"
"""


def test_a_user_namespace_shares_a_process_of_its_own(stacks: list[dict[str, Path]]) -> None:
    """As rootless podman: two share=2 mounts made by root of a new user and mount namespace
    are served by one process of that namespace (``layerfs-share``; none names a mount)."""
    a, b = stacks[:2]
    r = run_helper_script(
        USERNS,
        USERNS_SCRIPT,
        a,
        TIMEOUT,
        LOWER=f"{a['lower']}:{a['lower2']}",
        MNT2=str(b["merged"]),
        UPPER2=str(b["upper"]),
        WORK2=str(b["work"]),
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "xx xx", lines
    assert lines[-1] == "daemons 1", lines
    pid, userns = lines[1].split(" ", 1)
    assert userns != os.readlink("/proc/self/ns/user")
    assert _gone(int(pid)), "the namespace's process outlived its mounts"


def test_layerfs_mount_takes_share_too(stacks: list[dict[str, Path]]) -> None:
    a, b = stacks[:2]
    for d in (a, b):
        lowers = f"{d['lower']}:{d['lower2']}"
        cmd = [*layerfs_command(), "mount", lowers, str(d["upper"]), str(d["merged"])]
        cmd += ["--workdir", str(d["work"]), "-o", "share=2"]
        subprocess.run(cmd, check=True, timeout=TIMEOUT, env=helper_env())
    assert _pid(a) == _pid(b)
    pid = _pid(a)
    _unmount(a)
    _unmount(b)
    assert _gone(pid)


SQUAT = """
import os, socket, sys, time
os.setgroups([]); os.setgid(65534); os.setuid(65534)
held = []
for arg in sys.argv[1:]:
    name = b"\\0" + arg.encode()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(name)
    s.listen(0)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    c.connect(name)  # its own connection fills the backlog: a blocking connect waits for room
    held += [s, c]
print("squatting", flush=True)
time.sleep(TIMEOUT)
"""


def _share_names(pid: int) -> list[str]:
    """The abstract names (without the NUL) of the sockets process PID holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    names = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes and fields[7].startswith("@"):
            names.append(fields[7][1:])
    return names


def _read_within(path: Path, timeout: float) -> str | None:
    """PATH's text read by a child (a hung FUSE request cannot be interrupted here), or None
    when it did not answer within TIMEOUT seconds."""
    try:
        r = subprocess.run(["cat", str(path)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return r.stdout


def test_a_squatted_slot_of_another_user_does_not_hang_a_mount(
    stacks: list[dict[str, Path]],
) -> None:
    """Anyone of the network namespace may bind a sharing process's abstract name (they are
    listed in /proc/net/unix, and a key is guessable). An unprivileged user's socket at slot
    0 whose backlog is full must not keep root's next share=2 mount of that key unserved:
    the daemon's connect waited for room in that backlog, forever, with the mount made and
    every request to it hanging (found by review14)."""
    a, b = stacks[:2]
    env = {**helper_env(), "LAYERFS_REVIEW_TAG": f"squat-{os.getpid()}-{time.monotonic_ns()}"}
    _mount(a, share=2, env=env)
    pid = _pid(a)
    names = [n for n in _share_names(pid) if n.startswith("layerfs-share-")]
    assert names and names[0].endswith("-0"), names
    _unmount(a)
    assert _gone(pid)
    squatter = subprocess.Popen(
        [sys.executable, "-c", SQUAT.replace("TIMEOUT", str(TIMEOUT)), names[0]],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == "squatting\n"
        _mount(b, share=2, env=env, check=False)
        assert _read_within(b["merged"] / "f", 15.0) == "x", "b left unserved"
        assert _pid(b) != pid
    finally:
        squatter.kill()
        squatter.wait()


def _tasks(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_sigterm_while_a_mount_opens_its_layers_unmounts_it_too(
    stacks: list[dict[str, Path]], tmp_path: Path
) -> None:
    """SIGTERM reaches a mount's thread through its trio token, which the thread sets once
    its layers are open; a mount still opening them when the signal came was left serving,
    and the process with it (found by review14). strace holds the second mount's thread in
    the open of its own lower directory (delay_enter) while the signal comes."""
    if shutil.which("strace") is None:
        pytest.skip("needs strace")
    a, b = stacks[:2]
    own = tmp_path / "own-lower"
    own.mkdir()
    (own / "f").write_text("x")
    b["lower"] = own  # the second mount's alone: its open is the one delayed
    env = {**helper_env(), "LAYERFS_REVIEW_TAG": f"term-{os.getpid()}-{time.monotonic_ns()}"}
    _mount(a, share=2, env=env)
    pid = _pid(a)
    with _opens_held(pid, own, "delay_enter=4000000"):
        deadline = time.monotonic() + TIMEOUT
        before = _tasks(pid)
        _mount(b, share=2, env=env, check=False)
        while _tasks(pid) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _tasks(pid) > before, "the process did not take the second mount"
        time.sleep(0.5)  # its thread is in the delayed open of its lower directory
        os.kill(pid, signal.SIGTERM)
        assert _gone(pid, timeout=20.0), "the process outlived SIGTERM"
    mounted = Path("/proc/self/mountinfo").read_text()
    assert f" {a['merged']} " not in mounted and f" {b['merged']} " not in mounted


@contextlib.contextmanager
def _opens_held(pid: int, path: Path, inject: str) -> Iterator[None]:
    """Within: strace holds the process PID's opens of PATH as INJECT says (strace's
    ``inject=openat:`` spelling)."""
    trace = ["-e", "trace=openat", "-e", f"inject=openat:{inject}", "-o", "/dev/null"]
    tracer = subprocess.Popen(["strace", "-qq", "-f", "-p", str(pid), "-P", str(path), *trace])
    try:
        deadline = time.monotonic() + TIMEOUT
        while not _traced(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        yield
    finally:
        tracer.kill()
        tracer.wait()


def _traced(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        return any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in f)


def _fuse_fds(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse"
        except OSError:
            pass
    return n


def _listed(mnt: Path) -> bool:
    """Whether MNT is in our mountinfo (a path of it is never resolved: it may hang)."""
    return f" {mnt} " in Path("/proc/self/mountinfo").read_text()


def _assert_given_up(merged: Path) -> None:
    """A read of MERGED/f sent now, before the process serving MERGED gives that mount up,
    fails as a request to a closed connection does (ENOTCONN) once the process detached the
    mount: not left waiting while the process lives."""
    reader = subprocess.Popen(["cat", str(merged / "f")], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while _listed(merged) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _listed(merged), "the mount given up was not detached"
        try:
            _, err = reader.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("a request to the mount given up was never answered")
        assert reader.returncode != 0 and "not connected" in err, err
    finally:
        reader.kill()
        reader.wait()


def test_a_mount_that_cannot_open_its_layers_leaves_nothing_in_the_process(
    stacks: list[dict[str, Path]], tmp_path: Path
) -> None:
    """A mount taken by a sharing process which then cannot open its layers (strace fails the
    open of its own lower directory with EACCES) is detached and its /dev/fuse fd closed, so
    a request sent to it meanwhile fails (ENOTCONN): the process serves on, and the fd it
    kept held that FUSE connection, its requests waiting unanswered, for as long as the
    process lived (found by review14: a read of the mount hung; the process held one more
    /dev/fuse fd for each such mount)."""
    if shutil.which("strace") is None:
        pytest.skip("needs strace")
    a, b = stacks[:2]
    own = tmp_path / "own-lower"
    own.mkdir()
    (own / "f").write_text("x")
    b["lower"] = own
    env = {**helper_env(), "LAYERFS_REVIEW_TAG": f"leak-{os.getpid()}-{time.monotonic_ns()}"}
    _mount(a, share=2, env=env)
    pid = _pid(a)
    before = _fuse_fds(pid)
    with _opens_held(pid, own, "delay_enter=1000000:error=EACCES"):
        for _ in range(2):
            _mount(b, share=2, env=env, check=False)
            _assert_given_up(b["merged"])  # its open is delayed by 1 s, then fails
    assert _fuse_fds(pid) == before
    assert _answer(a) == errno.ENOENT
    _unmount(a)
    assert _gone(pid)


def test_the_extension_copies_are_sealed_and_not_inherited(
    stacks: list[dict[str, Path]],
) -> None:
    """The private copy of pyfuse3's extension a further mount of the process runs (a memfd)
    is sealed once written (no writer of the file changes the code the process runs: its
    text is a private mapping of that file) and close-on-exec (what the process execs, as
    fusermount3, gets no fd of it). It was neither (found by review14)."""
    a, b = stacks[:2]
    env = {**helper_env(), "LAYERFS_REVIEW_TAG": f"memfd-{os.getpid()}-{time.monotonic_ns()}"}
    _mount(a, share=2, env=env)
    _mount(b, share=2, env=env)
    pid = _pid(a)
    assert _pid(b) == pid
    copies = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:layerfs-pyfuse3-"):
                copies.append(fd)
        except OSError:
            pass
    assert copies, "the second mount runs no copy"
    want = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
    for fd in copies:
        flags = next(
            int(line.split()[1], 8)
            for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
            if line.startswith("flags:")
        )
        assert flags & os.O_CLOEXEC, f"fd {fd} is inherited by what the process execs"
        same = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY)  # the same inode: its seals
        try:
            assert fcntl.fcntl(same, fcntl.F_GET_SEALS) & want == want, f"fd {fd} not sealed"
        finally:
            os.close(same)
    assert _answer(b) == errno.ENOENT
    _unmount(b)
    _unmount(a)
    assert _gone(pid)


def test_every_slot_squatted_serves_the_mount_alone_with_one_line(
    stacks: list[dict[str, Path]], tmp_path: Path
) -> None:
    """With all 16 slots of its key bound by another user's sockets, a share=2 mount is
    served by a daemon of its own, and its log says so in one line (it said nothing)."""
    a, b = stacks[:2]
    log = tmp_path / "share.log"
    env = {**helper_env(), "LAYERFS_REVIEW_TAG": f"all-{os.getpid()}-{time.monotonic_ns()}"}
    _mount(a, share=2, env=env, extra=f",log={log}")
    pid = _pid(a)
    names = [n for n in _share_names(pid) if n.startswith("layerfs-share-")]
    assert names and names[0].endswith("-0"), names
    _unmount(a)
    assert _gone(pid)
    stem = names[0][: -len("0")]
    squatter = subprocess.Popen(
        [sys.executable, "-c", SQUAT.replace("TIMEOUT", str(TIMEOUT))]
        + [f"{stem}{slot}" for slot in range(16)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == "squatting\n"
        log.write_text("")
        _mount(b, share=2, env=env, check=False, extra=f",log={log}")
        assert _read_within(b["merged"] / "f", 15.0) == "x", "b left unserved"
        lines = log.read_text().splitlines()
        assert len(lines) == 1 and "served alone" in lines[0], lines
        assert not any(n.startswith("layerfs-share-") for n in _share_names(_pid(b)))
    finally:
        squatter.kill()
        squatter.wait()


def test_another_install_does_not_join_a_process(
    stacks: list[dict[str, Path]], tmp_path: Path
) -> None:
    """A mount made by another copy of the code (another install, or this one upgraded) is not
    served by a sharing process of this one, as it gets no fork server of this one: the key
    holds the code's identity (it did not: an upgrade's new mounts joined the old process)."""
    a, b = stacks[:2]
    other = tmp_path / "other"
    repo = Path(__file__).resolve().parents[2]
    for pkg in ("layerfs", "mount_helper"):
        shutil.copytree(repo / pkg, other / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for d, prefix in ((a, layerfs_command()), (b, [sys.executable, "-P", "-m", "layerfs.cli"])):
        lowers = f"{d['lower']}:{d['lower2']}"
        cmd = [*prefix, "mount", lowers, str(d["upper"]), str(d["merged"])]
        cmd += ["--workdir", str(d["work"]), "-o", "share=2"]
        env = helper_env()
        if d is b:
            env["PYTHONPATH"] = str(other)
        subprocess.run(cmd, check=True, timeout=TIMEOUT, env=env)
    assert (b["merged"] / "f").read_text() == "x"
    assert _pid(a) != _pid(b)


# A stale build of the compiled raw path (LAYERFS_LOOP=craw): its RawPath takes other
# arguments, so the mount's session setup fails after pyfuse3.init. The first mount's is
# refused quietly (served by pyfuse3's loop), the second's raises after a second (time for
# a request to reach the mount), later ones are refused quietly again.
_STALE_CRAW = """
import time
NOPOLL, PENDING, TRIO, PARKED, ANSWERED = 0, 1, 2, 3, 4
LAYOUT = (40, 16, 144, 120, 24)
made = 0

class RawPath:
    def __init__(self, *args, **kwargs):
        global made
        made += 1
        if made == 2:
            time.sleep(1)
            raise TypeError("a stale build: other arguments")

    def install(self, session):
        return False

    def __getattr__(self, name):  # what fusehooks calls before install: does nothing
        return lambda *args, **kwargs: None
"""


def test_a_mount_whose_session_setup_fails_leaves_nothing_in_the_process(
    stacks: list[dict[str, Path]], tmp_path: Path
) -> None:
    """A mount taken by a sharing process whose session setup fails after pyfuse3.init (here
    a stale compiled raw path: its constructor raises) is detached and its session's
    /dev/fuse fd closed, so a request sent to it meanwhile fails (ENOTCONN) instead of
    waiting as long as the process lives, and the mount's pyfuse3 copy serves the next mount
    (review14's leftover: only a failure to open the layers was handled)."""
    a, b, c = stacks[:3]
    other = tmp_path / "other"
    repo = Path(__file__).resolve().parents[2]
    for pkg in ("layerfs", "mount_helper"):
        shutil.copytree(
            repo / pkg, other / pkg, ignore=shutil.ignore_patterns("__pycache__", "_craw*")
        )
    # a build of the _craw.pyx beside it (fusehooks.craw_module checks its SOURCE) whose
    # constructor raises
    pyx = (repo / "layerfs" / "_craw.pyx").read_bytes()
    (other / "layerfs" / "_craw.pyx").write_bytes(pyx)
    (other / "layerfs" / "_craw.py").write_text(_STALE_CRAW + f"SOURCE = '{zlib.crc32(pyx):08x}'\n")
    env = {**helper_env(), "PYTHONPATH": str(other), "LAYERFS_LOOP": "craw"}

    def mount(d: dict[str, Path]) -> None:
        lowers = f"{d['lower']}:{d['lower2']}"
        cmd = [sys.executable, "-P", "-m", "layerfs.cli", "mount", lowers, str(d["upper"])]
        cmd += [str(d["merged"]), "--workdir", str(d["work"]), "-o", "share=2"]
        subprocess.run(cmd, check=True, timeout=TIMEOUT, env=env)

    mount(a)
    pid = _pid(a)
    before = _fuse_fds(pid)
    mount(b)
    _assert_given_up(b["merged"])  # its setup fails after a second
    assert _fuse_fds(pid) == before
    assert _answer(a) == errno.ENOENT
    mount(c)  # the room b left, with b's pyfuse3 copy
    assert _pid(c) == pid
    assert (c["merged"] / "d" / "b").read_text() == "top b"
    _unmount(a)
    _unmount(c)
    assert _gone(pid)

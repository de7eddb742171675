"""``-o share=K`` (layerfs.share): one process serves up to K mounts of a key.

What these hold: K mounts made by ``mount.layerfs`` (and by ``layerfs mount``) are served by
one process, each answering as kernel overlayfs does on the same stack; the K+1st goes to
another process; unmounting one leaves the others serving and frees its room; a kill -9 of
the process takes its mounts (ENOTCONN) and nothing else; SIGTERM unmounts all its mounts;
the process exits with its last mount, leaving nothing behind; a user namespace's mounts
share a process of that namespace.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from compat.helpers import USERNS, helper_command, helper_env, reap, run_helper_script
from support.mounts import layerfs_command, mount_kernel
from support.ops import Op, apply_all, compare_results
from support.snapshot import assert_same, fs_clock_ns, snapshot

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


def _mount(d: dict[str, Path], share: int) -> None:
    r = subprocess.run(
        [*helper_command(), "overlay", str(d["merged"]), "-o", _opts(d, share)],
        capture_output=True,
        text=True,
        env=helper_env(),
        timeout=TIMEOUT,
        check=False,
    )
    assert r.returncode == 0, r.stderr
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


def test_mounts_share_a_process_each_as_the_kernel(
    stacks: list[dict[str, Path]], tmp_path: Path
) -> None:
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

"""The mount is made by mount.layerfs itself, and served by a daemon that starts after it.

mount.layerfs opens /dev/fuse, mounts it (mount(2) as root or as root of a user namespace,
fusermount3 for a plain user) and exits; the daemon it forked serves the mounted fd
(layerfs.premount). These tests hold the contract that this must keep: the mount is in the
mount table when the helper exits, errors a user can cause still come before anything is
mounted (the workdir lock: test_mount.py), and nothing is left when the mount goes,
in a user namespace (rootless podman mounts in its own) and for an unprivileged user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from compat.helpers import (
    USERNS,
    helper_command,
    helper_env,
    is_mounted,
    reap,
    run_helper_script,
    unmount,
    wait_no_daemon,
)

from layerfs import premount
from layerfs.config import MountConfig

pytestmark = pytest.mark.fuse
TIMEOUT = 60


def _mount(layers: dict[str, Path], mnt: Path | None = None, work: Path | None = None) -> str:
    """Run mount.layerfs; return its stderr after checking it succeeded."""
    r = _try_mount(layers, mnt, work)
    assert r.returncode == 0, r.stderr
    return r.stderr


def _try_mount(
    layers: dict[str, Path], mnt: Path | None = None, work: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*helper_command(), "overlay", str(mnt or layers["merged"]), "-o", _options(layers, work)],
        capture_output=True,
        text=True,
        env=helper_env(),
        timeout=TIMEOUT,
        check=False,
    )


def _options(layers: dict[str, Path], work: Path | None = None) -> str:
    return f"lowerdir={layers['lower']},upperdir={layers['upper']},workdir={work or layers['work']}"


def _mount_entry(mnt: Path) -> list[str]:
    """The fields of MNT's line in /proc/self/mountinfo (empty when not mounted). MNT must be
    a real path already: resolving it would stat the mount, which waits for the daemon."""
    want = os.fspath(mnt)
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if fields[4] == want:
                return fields
    return []


def test_mount_is_in_the_table_when_the_helper_exits(layers: dict[str, Path]) -> None:
    _mount(layers)
    # Read the table before touching the mount: the helper's exit is the promise.
    fields = _mount_entry(layers["merged"])
    assert fields, "not mounted when mount.layerfs exited"
    sep = fields.index("-")
    assert fields[sep + 1 : sep + 3] == ["fuse.layerfs", "layerfs"]
    assert "default_permissions" in fields[sep + 3] and "allow_other" in fields[sep + 3]
    assert (layers["merged"] / "f").read_text() == "x"
    (layers["merged"] / "new").write_text("y")
    unmount(layers["merged"])
    assert wait_no_daemon(layers["merged"]) == []
    assert (layers["upper"] / "new").read_text() == "y"


def test_bad_layer_fails_before_mounting(layers: dict[str, Path]) -> None:
    shutil.rmtree(layers["lower"])
    r = _try_mount(layers)
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1 and "does not exist" in r.stderr, r.stderr
    assert not is_mounted(layers["merged"])
    assert daemonless(layers["merged"])


def daemonless(mnt: Path) -> bool:
    # wait_no_daemon's own deadline (20 s, as the suite's EXIT_TIMEOUT), not 5 s: a daemon
    # exiting after its unmount can take seconds on a loaded host; none there returns at once
    return wait_no_daemon(mnt) == []


USERNS_SCRIPT = """
set -e
"$@" overlay "$MNT" -o "lowerdir=$LOWER,upperdir=$UPPER,workdir=$WORK"
grep -q " $MNT " /proc/self/mountinfo
cat "$MNT/f"
echo made-in-userns > "$MNT/g"
fusermount3 -u "$MNT"
"""


def test_mount_in_a_user_namespace(layers: dict[str, Path]) -> None:
    """As rootless podman does it: root of a new user and mount namespace mounts with
    mount(2); the daemon lives in that namespace and exits with its mount."""
    r = run_helper_script(USERNS, USERNS_SCRIPT, layers, TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "x"
    assert (layers["upper"] / "g").read_text() == "made-in-userns\n"
    assert not is_mounted(layers["merged"])  # private namespace: never seen here
    assert daemonless(layers["merged"])


@pytest.fixture
def user_layers() -> Iterator[tuple[dict[str, Path], int, int]]:
    """Layers owned by an unprivileged user (nobody), in a directory it can reach."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    top = Path(tempfile.mkdtemp(prefix="layerfs-perf-user-"))
    top.chmod(0o755)
    d = {name: top / name for name in ("lower", "upper", "work", "merged")}
    try:
        for p in d.values():
            p.mkdir()
            os.chown(p, user.pw_uid, user.pw_gid)
        (d["lower"] / "f").write_text("x")
        yield d, user.pw_uid, user.pw_gid
    finally:
        reap(d["merged"])
        shutil.rmtree(top, ignore_errors=True)


def _as_user(uid: int, gid: int, cmd: list[str]) -> subprocess.CompletedProcess[str]:
    def drop() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    try:
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=helper_env(),
            cwd="/",
            preexec_fn=drop,
            timeout=TIMEOUT,
            check=False,
        )
    except PermissionError as e:  # the interpreter lives where that user cannot go
        return subprocess.CompletedProcess(cmd, 126, "", str(e))


def test_unprivileged_user_mounts_through_fusermount3(
    user_layers: tuple[dict[str, Path], int, int],
) -> None:
    layers, uid, gid = user_layers
    probe = _as_user(uid, gid, [*helper_command(), "--version"])
    if probe.returncode != 0:
        pytest.skip(f"the helper cannot run as an unprivileged user here: {probe.stderr}")
    if shutil.which("fusermount3") is None:
        pytest.skip("needs fusermount3")
    if not os.stat("/dev/fuse").st_mode & 0o006:  # fusermount3 opens it as the user
        pytest.skip("/dev/fuse is root's alone here (no udev rule made it 0666)")
    opts = f"lowerdir={layers['lower']},upperdir={layers['upper']},workdir={layers['work']}"
    r = _as_user(uid, gid, [*helper_command(), "overlay", str(layers["merged"]), "-o", opts])
    assert r.returncode == 0, r.stderr
    fields = _mount_entry(layers["merged"])
    assert fields and fields[fields.index("-") + 1] == "fuse.layerfs"
    w = _as_user(uid, gid, ["sh", "-c", f"cat {layers['merged']}/f; echo u > {layers['merged']}/g"])
    assert (w.returncode, w.stdout) == (0, "x"), w.stderr
    u = _as_user(uid, gid, ["fusermount3", "-u", str(layers["merged"])])
    assert u.returncode == 0, u.stderr
    assert daemonless(layers["merged"])
    assert (layers["upper"] / "g").stat().st_uid == uid


def test_fusermount3_hands_back_a_mounted_fd(layers: dict[str, Path]) -> None:
    """The unprivileged path's protocol (_FUSE_COMMFD, as libfuse speaks it), run as root
    where the test above cannot run the helper as another user."""
    if shutil.which("fusermount3") is None:
        pytest.skip("needs fusermount3")
    config = MountConfig(
        lowers=(str(layers["lower"]),),
        mountpoint=str(layers["merged"]),
        fsname="layerfs-commfd",
        extra_fuse_options=("noatime", "nodev"),
    ).validate()
    fd = premount._fusermount(config, premount.options(config))
    try:
        assert stat.S_ISCHR(os.fstat(fd).st_mode)
        fields = _mount_entry(layers["merged"])
        sep = fields.index("-")
        assert fields[sep + 1 : sep + 3] == ["fuse.layerfs", "layerfs-commfd"]
        assert {"ro", "nodev", "noatime"} <= set(fields[5].split(","))
    finally:
        os.close(fd)  # the connection ends; the mount is a dead one until unmounted
        premount.unmount_lazy(str(layers["merged"]))
    assert not is_mounted(layers["merged"])

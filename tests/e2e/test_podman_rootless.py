"""Rootless podman with mount.layerfs as its mount program: the rootful end-to-end steps again.

podman runs as an unprivileged user (``layerfs-rootless``, made by scripts/setup.sh with
subordinate id ranges: the test session may not change /etc/passwd) and runs the mount program
in its user namespace, where ``trusted.*`` xattrs cannot be set: layerfs writes
``user.overlay.*`` there (docs/on-disk-format.md, "userxattr"). The mount program is a system
install (scripts/install-system.sh into a temp prefix, built with /usr/bin/python3): the
checkout's .venv may run on an interpreter only root can read.

For the test the user gets rw on /dev/fuse (0600 root on these hosts) through an ACL, removed
afterwards; runc runs the containers (crun refuses this host's hybrid cgroups rootless).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Runtime
from .podman_env import PodmanEnv, mounts_under, settle
from .test_podman import (
    BASE,
    EXPECTED_DIFF,
    assert_tree,
    build_containerfile,
    containerfile_steps,
    image_tree,
    parse_snapshot,
    snapshot_script,
)

pytestmark = [
    pytest.mark.podman,
    pytest.mark.fuse,
    pytest.mark.slow,
    pytest.mark.external,
    pytest.mark.timeout(600),
]

USER = "layerfs-rootless"  # scripts/setup.sh creates it (useradd -m: subuid/subgid ranges)
REPO = Path(__file__).resolve().parents[2]


def _subids(user: str) -> bool:
    for path in ("/etc/subuid", "/etc/subgid"):
        with open(path) as fh:
            if not any(line.split(":")[0] == user for line in fh):
                return False
    return True


@pytest.fixture(scope="module")
def system_install() -> Iterator[Path]:
    """mount.layerfs installed for everyone (scripts/install-system.sh) in a temp prefix."""
    try:
        pwd.getpwnam(USER)
    except KeyError:
        pytest.skip(f"no user {USER}: run scripts/setup.sh (it creates it)")
    if not _subids(USER):
        pytest.skip(f"{USER} has no subordinate ids in /etc/subuid, /etc/subgid")
    prefix = Path(tempfile.mkdtemp(prefix="layerfs-system-", dir="/tmp"))
    try:
        prefix.chmod(0o755)
        subprocess.run(
            [REPO / "scripts/install-system.sh", "--prefix", prefix, "--no-links"],
            check=True,
            capture_output=True,
            timeout=600,
        )
        yield prefix / "venv/bin/mount.layerfs"
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


@pytest.fixture(scope="module")
def fuse_for_user() -> Iterator[None]:
    """Let USER open /dev/fuse for the module (an ACL entry), and take it back after."""
    before = subprocess.run(["getfacl", "-cp", "/dev/fuse"], capture_output=True, text=True)
    entries = [line for line in before.stdout.splitlines() if line and ":" in line]
    subprocess.run(["setfacl", "-m", f"u:{USER}:rw", "/dev/fuse"], check=True)
    try:
        yield
    finally:
        if all(e.split(":")[0] in ("user", "group", "other") and e.split(":")[1] == ""
               for e in entries):  # fmt: skip
            subprocess.run(["setfacl", "-b", "/dev/fuse"], check=False)  # had no ACL at all
        elif not any(e.startswith(f"user:{USER}:") for e in entries):
            subprocess.run(["setfacl", "-x", f"u:{USER}", "/dev/fuse"], check=False)


@pytest.fixture(scope="module")
def rpm(
    system_install: Path,
    fuse_for_user: None,
    podman_runtime: Runtime,
    base_rootfs: Path,
) -> Iterator[PodmanEnv]:
    """A private rootless podman (as USER, runc) whose mount program is mount.layerfs."""
    root = Path(tempfile.mkdtemp(prefix="layerfs-rootless-", dir="/tmp"))
    root.chmod(0o755)
    env = PodmanEnv(root / "pm", "runc", mount_program=system_install, label="layerfs", user=USER)
    env.setup()
    try:
        env.import_rootfs(base_rootfs, BASE)
        yield env
    finally:
        problems = _teardown(env)
        shutil.rmtree(root, ignore_errors=True)
        assert not problems, problems


def _teardown(env: PodmanEnv) -> list[str]:
    """Remove the containers; end the user namespace's pause process (rootless podman keeps
    one to hold its namespaces, and with them the storage's mounts)."""
    env.remove_everything()
    pause = env.root / "t/pause.pid"  # in containers.conf's tmp_dir
    if pause.exists():
        pid = int(pause.read_text().strip())
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return settle(env.leftover_processes) + [f"{m} mounted" for m in mounts_under(env.root)]


def _upper_of(env: PodmanEnv, ctr: str) -> Path:
    """The container's upper directory (containers/storage: overlay/<layer id>/diff)."""
    layer = env.run("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", ctr).stdout
    return Path(layer.strip())


def test_mkdir_and_rename_in_a_container(rpm: PodmanEnv) -> None:
    # The first RUN of a typical build; EPERM before userxattr (trusted.overlay.opaque).
    out = rpm.sh(
        BASE,
        "mkdir /data && echo ok > /data/f && mv /base/mvdir /base/mvdir2 && cat /data/f"
        " && ls /base/mvdir2 && grep -c layerfs /proc/mounts",
    )
    assert out.split() == ["ok", "f", "g", "1"]


def test_build_from_containerfile(rpm: PodmanEnv, tmp_path: Path) -> None:
    ctx = Path(tempfile.mkdtemp(dir=rpm.root))
    shutil.chown(ctx, USER, USER)
    tree = build_containerfile(rpm, ctx)
    assert_tree(tree, image_tree("base/link_src", "base/hardlink", "new/file", "new/file.hl"))


def test_diff_of_container(rpm: PodmanEnv) -> None:
    script = "set -e\n" + "\n".join(containerfile_steps())
    rpm.run("run", "--name", "steps", "--network", "none", BASE, "sh", "-c", script)
    got = rpm.diff("steps")
    assert got == EXPECTED_DIFF, (
        f"unexpected {sorted(got - EXPECTED_DIFF)}, missing {sorted(EXPECTED_DIFF - got)}"
    )
    # The upper is in the userxattr format: the re-created /base/olddir is opaque through
    # user.overlay.opaque (trusted.* cannot be set in the user namespace).
    upper = _upper_of(rpm, "steps")
    olddir = upper / "base/olddir"
    assert os.getxattr(olddir, "user.overlay.opaque") == b"y"
    names = [x for p in upper.rglob("*") for x in os.listxattr(p, follow_symlinks=False)]
    assert not [x for x in names if x.startswith("trusted.")]


def test_commit_and_run(rpm: PodmanEnv) -> None:
    rpm.run("commit", "-q", "steps", "localhost/committed:latest")
    script = snapshot_script("base", "new") + "ls -a /base/olddir | tr '\\n' ' '"
    *lines, olddir = rpm.sh("localhost/committed:latest", script).splitlines()
    assert olddir.split() == [".", "..", "new"]
    assert_tree(parse_snapshot("\n".join(lines)), image_tree("base/link_src", "base/hardlink"))
    rpm.run("create", "--name", "from-committed", "localhost/committed:latest", "true")
    try:
        assert rpm.diff("from-committed") == set()
    finally:
        rpm.run("rm", "from-committed")


def test_no_daemon_left_behind(rpm: PodmanEnv) -> None:
    rpm.remove_everything()
    assert rpm.run("ps", "--all", "--quiet").stdout.strip() == ""
    procs = settle(lambda: [p for p in rpm.leftover_processes() if "(mount program)" in p])
    assert not procs, f"mount daemons left behind: {procs}"

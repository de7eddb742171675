"""The C front end of mount.layerfs (mount_helper/front.c): the thin request without Python.

It must reach the very server the Python front end reaches (forkclient.address(), computed
in C), leave everything else to the Python front end exactly as it was asked (argv[0], the
environment, minus its own marker variable), and a build that fails must leave the Python
front end in its place. The messages of the cases it leaves to Python are test_errors.py's,
run with both front ends; the mounts, test_mount.py's and test_forkserver.py's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from compat.helpers import (
    MOUNTNS,
    c_front_built,
    daemon_pids,
    helper_command,
    helper_env,
    run_helper_script,
)

from mount_helper import launcher

pytestmark = pytest.mark.fuse
TIMEOUT = 60


def _opts(d: dict[str, Path]) -> str:
    return f"lowerdir={d['lower']},upperdir={d['upper']},workdir={d['work']}"


def _run(cmd: list[str], d: dict[str, Path], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cmd, "overlay", str(d["merged"]), "-o", _opts(d)],
        capture_output=True,
        text=True,
        env={**helper_env(), **env},
        timeout=TIMEOUT,
        check=False,
    )


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rpartition(b")")[2].split()[1])


@pytest.fixture
def marked_front(tmp_path: Path) -> tuple[Path, Path]:
    """A C front end built like setup.sh's, whose "Python front end" only leaves a mark:
    (the program, the mark). A mount through it succeeds only by the thin request."""
    mark = tmp_path / "fell-back"
    fallback = tmp_path / "fallback"
    fallback.write_text(f'#!/bin/sh\necho "$0 $*" >{mark}\nexit 3\n')
    fallback.chmod(0o755)
    prog = tmp_path / "mount.layerfs"
    paths = launcher.site_paths(sys.executable)
    built = launcher.build_front(
        launcher.FRONT_SOURCE, str(prog), str(fallback), sys.executable, paths
    )
    if not built:
        pytest.skip("the C front end does not build here (gcc)")
    return prog, mark


def test_the_c_front_reaches_the_python_fronts_server(
    stacks: list[dict[str, Path]], marked_front: tuple[Path, Path]
) -> None:
    """Its address is forkclient.address(): a server the Python front end started (or one
    up already for this code) mounts its request, and nothing falls back to Python. A caller
    whose PYTHONPATH puts another layerfs first is left to the Python front end."""
    prog, mark = marked_front
    a, b, c = stacks
    py = [os.fspath(Path(sys.executable).with_name("mount.layerfs-py"))]
    r = _run(py if os.path.exists(py[0]) else helper_command(), a)
    assert r.returncode == 0, r.stderr
    r = _run([str(prog)], b)
    assert r.returncode == 0, (r.stderr, mark.read_text() if mark.exists() else "")
    assert not mark.exists()
    assert (b["merged"] / "f").read_text() == "x"
    (daemon,) = daemon_pids(b["merged"])
    assert _ppid(daemon) == _ppid(daemon_pids(a["merged"])[0])  # the same server
    r = _run([str(prog)], c, PYTHONPATH="/nonexistent:" + helper_env()["PYTHONPATH"])
    assert r.returncode == 3
    assert mark.read_text().startswith(f"{prog.parent / 'fallback'} overlay {c['merged']} -o")
    assert daemon_pids(c["merged"]) == []


def test_the_fronts_reach_one_server_whatever_the_bytes_of_the_environment(
    stacks: list[dict[str, Path]], marked_front: tuple[Path, Path]
) -> None:
    """LAYERFS_COMPILED is part of the address as its bytes: a value that is not UTF-8 gives
    both front ends the same server. The Python one encoded the address's text strictly: a
    traceback after the mount was made, which was left dead (ENOTCONN; review16)."""
    prog, mark = marked_front
    a, b, _ = stacks
    odd = {"LAYERFS_COMPILED": "1\udcff"}  # b"1\xff" in the environment
    py = [os.fspath(Path(sys.executable).with_name("mount.layerfs-py"))]
    r = _run(py if os.path.exists(py[0]) else helper_command(), a, **odd)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert (a["merged"] / "f").read_text() == "x"
    r = _run([str(prog)], b, **odd)
    assert r.returncode == 0, (r.stderr, mark.read_text() if mark.exists() else "")
    assert not mark.exists()
    assert _ppid(daemon_pids(b["merged"])[0]) == _ppid(daemon_pids(a["merged"])[0])


FIRST_MOUNTS_SCRIPT = """
set -e
"$@" overlay "$MNT" -o "lowerdir=$LOWER,upperdir=$UPPER,workdir=$WORK"
mkdir -p "$MNT.2/up" "$MNT.2/work" "$MNT.2/merged"
"$@" overlay "$MNT.2/merged" -o "lowerdir=$LOWER,upperdir=$MNT.2/up,workdir=$MNT.2/work"
for p in /proc/[0-9]*; do
    if tr '\\0' ' ' < $p/cmdline 2>/dev/null | grep -q "^layerfs $MNT"; then
        echo $(cut -d' ' -f4 $p/stat)
    fi
done
cat "$MNT/f" "$MNT.2/merged/f"
fusermount3 -u "$MNT.2/merged"
fusermount3 -u "$MNT"
"""


def test_the_first_mount_of_a_namespace_falls_back(stacks: list[dict[str, Path]]) -> None:
    """The first mount of a namespace (no server: the C front end runs the Python one, which
    mounts and starts the server) and the next (the thin request, to that server)."""
    if not c_front_built():
        pytest.skip("the C front end of mount.layerfs is not built (scripts/setup.sh)")
    r = run_helper_script(MOUNTNS, FIRST_MOUNTS_SCRIPT, stacks[0], TIMEOUT)
    assert r.returncode == 0, r.stderr
    *servers, data = r.stdout.split()
    assert len(servers) == 2 and servers[0] == servers[1], r.stdout  # both daemons' parent
    assert data == "xx"


MARKER = """
import sys
sys.path += {paths!r}
if {with_os}:
    import os
from mount_helper import main
print(main._from_the_c_front(), sys.argv[0], main._from_the_c_front())
import os, subprocess
env = subprocess.run(["env"], capture_output=True, check=True).stdout
print(b"LAYERFS_FRONT_ARGV0" in os.environb, b"LAYERFS_FRONT_ARGV0" in env)
"""


@pytest.mark.parametrize("with_os", [False, True])
def test_the_marker_is_taken_out_of_the_environment(with_os: bool) -> None:
    """LAYERFS_FRONT_ARGV0, the C front end's word to the Python one (the thin request was
    tried; its argv[0]), is seen once and is then in no environment the Python front end
    passes on (os.environ's copy, the process's own, a child's)."""
    script = MARKER.format(paths=launcher.site_paths(sys.executable), with_os=with_os)
    env = {**os.environ, "LAYERFS_FRONT_ARGV0": "/sbin/mount.fuse.layerfs"}
    r = subprocess.run(
        [sys.executable, "-SP", "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["True /sbin/mount.fuse.layerfs False", "False False"]


def test_a_front_that_does_not_build_leaves_the_python_one(tmp_path: Path) -> None:
    broken = tmp_path / "front.c"
    broken.write_text("this is not C\n")
    prog = tmp_path / "mount.layerfs"
    paths = launcher.site_paths(sys.executable)
    assert not launcher.install(str(prog), sys.executable, paths, source=str(broken))
    assert prog.read_text().startswith(f"#!{sys.executable} -SP")
    assert (tmp_path / "mount.layerfs-py").read_text() == prog.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "front.c",
        "mount.layerfs",
        "mount.layerfs-py",
    ]  # no temporary left
    r = subprocess.run([str(prog), "--version"], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout.startswith("mount.layerfs: version "), r.stderr
    # and one that builds: an ELF program, which runs the Python one for --version
    assert launcher.install(str(prog), sys.executable, paths)
    assert prog.read_bytes()[:4] == b"\x7fELF"
    r = subprocess.run([str(prog), "--version"], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout.startswith("mount.layerfs: version "), r.stderr

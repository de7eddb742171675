"""Helpers for the mount.layerfs compatibility tests: how to run the helper, and mount hygiene.

Imported as ``compat.helpers`` (tests/ is on sys.path, see tests/conftest.py), so it works
in every pytest import mode.

Every mount a test makes is unmounted in a ``finally`` (fusermount3 -u, then -u -z), and a test
that mounts checks afterwards that no daemon is left whose command line names its mount point.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.mounts import stop_if_held

from layerfs import mountinfo

REPO = Path(__file__).resolve().parents[2]


# Which front end of the installed mount.layerfs helper_command() runs: "c" (the program
# scripts/setup.sh installs, the C front end when it was built) or "python" (the Python front
# end beside it, mount.layerfs-py). Tests of both set it with the ``front`` fixture below.
FRONT = "c"


def helper_command() -> list[str]:
    """The installed ``mount.layerfs`` (its Python front end when FRONT is "python"), else the
    module run by this Python."""
    exe = Path(sys.executable).with_name("mount.layerfs")
    if FRONT == "python" and exe.with_name("mount.layerfs-py").exists():
        exe = exe.with_name("mount.layerfs-py")
    if exe.exists():
        return [os.fspath(exe)]
    found = shutil.which("mount.layerfs")
    if found:
        return [found]
    return [sys.executable, "-m", "mount_helper.main"]


def c_front_built() -> bool:
    """Whether the installed ``mount.layerfs`` is the C front end (an ELF file, not a script)."""
    try:
        with open(Path(sys.executable).with_name("mount.layerfs"), "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def helper_env() -> dict[str, str]:
    """The environment for the helper: our checkout first on PYTHONPATH (for ``-m`` runs)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.fspath(REPO), env.get("PYTHONPATH")]))
    return env


# root of a new user and mount namespace, as rootless podman mounts; a private mount
# namespace alone, where no forkserver of ours can be up yet
USERNS = ("unshare", "-U", "-r", "-m", "--propagation", "private")
MOUNTNS = ("unshare", "-m", "--propagation", "private")


def run_helper_script(
    namespace: tuple[str, ...],
    script: str,
    stack: dict[str, Path],
    timeout: float,
    **extra_env: str,
) -> subprocess.CompletedProcess[str]:
    """Run the shell SCRIPT in NAMESPACE (``unshare`` arguments) with the helper command as
    its "$@" and the stack's paths as $MNT, $LOWER, $UPPER, $WORK (plus EXTRA_ENV)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    env = {
        **helper_env(),
        "MNT": str(stack["merged"]),
        "LOWER": str(stack["lower"]),
        "UPPER": str(stack["upper"]),
        "WORK": str(stack["work"]),
        **extra_env,
    }
    return subprocess.run(
        [*namespace, "sh", "-c", script, "sh", *helper_command()],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def engine_missing() -> str | None:
    """Why layerfs cannot mount yet (layerfs.mount not written), or None."""
    import importlib.util

    try:
        if importlib.util.find_spec("layerfs.mount") is None:
            return "layerfs.mount does not exist yet"
    except ImportError as e:
        return f"layerfs.mount: {e}"
    return None


def is_mounted(mnt: str | os.PathLike[str]) -> bool:
    """Whether ``mnt`` is a mount point in this mount namespace (/proc/self/mountinfo)."""
    want = os.fsencode(os.path.realpath(mnt))
    return any(m.point == want for m in mountinfo.mounts())


def unmount(mnt: str | os.PathLike[str]) -> None:
    """Unmount a FUSE mount if it is there: fusermount3 -u, then a lazy unmount."""
    if not is_mounted(mnt):
        return
    r = subprocess.run(["fusermount3", "-u", os.fspath(mnt)], capture_output=True, check=False)
    if r.returncode != 0 and is_mounted(mnt):
        subprocess.run(["fusermount3", "-u", "-z", os.fspath(mnt)], check=False)


def daemon_pids(mnt: str | os.PathLike[str]) -> list[int]:
    """Pids (not ours) whose command line contains the mount point path."""
    needle = os.fsencode(os.fspath(mnt))
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        if needle in cmdline:
            pids.append(int(entry))
    return pids


def wait_no_daemon(mnt: str | os.PathLike[str], timeout: float = 20.0) -> list[int]:
    """Wait until no process names ``mnt``; return the pids still there at the deadline.
    Once ``mnt`` is unmounted, a daemon whose mount another namespace still holds is stopped
    first (support.mounts.stop_if_held): it rightly serves that copy as long as it lives."""
    if pids := daemon_pids(mnt):
        stop_if_held(mnt, pids)
    deadline = time.monotonic() + timeout
    while (pids := daemon_pids(mnt)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def reap(mnt: str | os.PathLike[str]) -> None:
    """Teardown: unmount, then kill daemons of this test's mount that did not exit."""
    unmount(mnt)
    for pid in wait_no_daemon(mnt, timeout=5.0):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass

"""Containers as users start them: ``podman run --rm IMG true`` on a private podman whose
overlay storage is the target: kernel overlayfs (podman's own overlay driver), fuse-overlayfs or
mount.layerfs as the driver's ``mount_program``. The private installation is the podman e2e
test's (tests/e2e/podman_env.py): graphroot, runroot and config files under the run's work
directory, nothing read from or written to /etc's container settings. Every run imports the
same image, a static busybox root (the e2e test's base), into a fresh store.

``podman build`` of a package install is in :mod:`benchmarks.scenarios.build`."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.dataset import Dataset
from benchmarks.model import Measurement, Mounted, Scenario, Skip

if TYPE_CHECKING:
    from e2e.podman_env import PodmanEnv

TESTS = Path(__file__).resolve().parents[2] / "tests"
IMAGE = "localhost/layerfs-bench:latest"
RUN_SAMPLES = 10
RUNTIMES = ("crun", "runc")
# Probed once per benchmark run by prepare(): (runtime, ulimits) or the reason podman can't run
_probe: tuple[str, tuple[str, ...]] | str | None = None


def _e2e() -> None:
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


def podman_unavailable() -> str | None:
    _e2e()
    from e2e.podman_env import find_static_busybox, is_root_with_fuse

    why = is_root_with_fuse()
    if why:
        return why
    if find_static_busybox() is None:
        return "no static busybox (Debian package busybox-static)"
    return None


def busybox_rootfs(dest: Path) -> Path:
    _e2e()
    from e2e.podman_env import find_static_busybox, make_busybox_rootfs

    busybox = find_static_busybox()
    assert busybox is not None
    make_busybox_rootfs(dest, busybox)
    return dest


def probe(scratch: Path) -> tuple[str, tuple[str, ...]] | str:
    """The OCI runtime that starts a container here and the rlimits it can set (as the e2e
    test's probe: podman's default nofile fails without CAP_SYS_RESOURCE), found with the vfs
    driver so no mount program is involved; or why none does."""
    why = podman_unavailable()
    if why:
        return why
    _e2e()
    from e2e.podman_env import PodmanEnv, PodmanError

    errors = []
    rootfs = busybox_rootfs(scratch / "rootfs")
    for runtime in RUNTIMES:
        if not shutil.which(runtime, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"):
            errors.append(f"{runtime}: not installed")
            continue
        env = PodmanEnv(scratch / runtime, runtime, driver="vfs")
        env.setup()
        try:
            env.import_rootfs(rootfs, IMAGE)
            out = env.sh(IMAGE, "ulimit -Hn; ulimit -Hu", "--ulimit", "host")
            nofile, nproc = out.split()
            return runtime, (f"nofile={nofile}:{nofile}", f"nproc={nproc}:{nproc}")
        except PodmanError as e:
            errors.append(f"{runtime}: {str(e).strip().splitlines()[-1]}")
        finally:
            env.force_cleanup()
    return "podman starts no container here (vfs probe): " + "; ".join(errors)


def prepare(dataset: Dataset) -> None:
    global _probe
    if _probe is None:
        # a short path: podman wants a runroot of at most 50 characters
        with tempfile.TemporaryDirectory(prefix="layerfs-bench-probe-", dir="/var/tmp") as d:
            _probe = probe(Path(d))


def _need_podman(ds: Dataset) -> str | None:
    if _probe is None:
        return "not probed"
    return _probe if isinstance(_probe, str) else None


def private_podman(mnt: Mounted) -> PodmanEnv:
    """A private podman under the run's work directory, storing on MNT's target; its runroot
    in /run: podman refuses a runroot of more than 50 characters (its `container cleanup`,
    run by conmon when the container exits, fails on it, and `podman run` then waits 20 s for
    a cleanup that never comes). Removed by finish()."""
    if not mnt.podman:
        raise Skip(f"{mnt.target} is not a podman storage driver")
    if not isinstance(_probe, tuple) or mnt.work is None:
        raise Skip(str(_probe))
    _e2e()
    from e2e.podman_env import PodmanEnv

    class BenchPodman(PodmanEnv):
        @property
        def runroot(self) -> Path:
            return short_runroot

    short_runroot = Path(tempfile.mkdtemp(prefix="layerfs-bench-", dir="/run"))
    runtime, ulimits = _probe
    env = BenchPodman(
        mnt.work / "podman",
        runtime,
        mount_program=mnt.mount_program,
        label=mnt.target,
        ulimits=ulimits,
    )
    env.setup()
    return env


def finish(env: PodmanEnv) -> None:
    """Remove the containers, unmount what is left, remove the runroot; raise if podman left
    a process or a mount behind."""
    problems = env.force_cleanup()
    problems += env_mounts(env.runroot)
    shutil.rmtree(env.runroot, ignore_errors=True)
    if problems:
        raise RuntimeError(f"podman left behind: {problems[:3]}")


def env_mounts(root: Path) -> list[str]:
    from benchmarks.system import detach, mounts_under

    left = mounts_under(root)
    for mp in left:
        detach(mp)
    return [f"mounted: {mp}" for mp in left]


def timed_podman(env: PodmanEnv, *args: str, timeout: float = 600) -> float:
    t0 = time.perf_counter_ns()
    env.run(*args, timeout=timeout)
    return (time.perf_counter_ns() - t0) / 1e9


def run_true(mnt: Mounted) -> list[Measurement]:
    env = private_podman(mnt)
    assert mnt.work is not None
    try:
        env.import_rootfs(busybox_rootfs(mnt.work / "rootfs"), IMAGE)
        cmd = ("run", "--rm", IMAGE, "true")
        timed_podman(env, *cmd)  # warm-up: the image's files in the page cache
        samples = [timed_podman(env, *cmd) for _ in range(RUN_SAMPLES)]
    finally:
        finish(env)
    return [Measurement("podman run --rm true", samples)]


SCENARIOS = [
    Scenario(
        "podman-run",
        f"podman run --rm IMG true on a private store (overlay driver; mount_program "
        f"fuse-overlayfs / mount.layerfs), {RUN_SAMPLES} samples after one warm-up",
        run_true,
        requires=_need_podman,
        timeout=300,
        daemon_cpu=False,  # the data set's mount idles: podman mounts its own
    ),
]

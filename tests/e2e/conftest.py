"""Fixtures for the podman end-to-end test: a probed runtime, the base rootfs, one private podman
per mount program (fuse-overlayfs as the reference, mount.layerfs as the subject)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .podman_env import (
    PodmanEnv,
    PodmanError,
    find_static_busybox,
    is_root_with_fuse,
    make_busybox_rootfs,
    venv_bin,
    write_tree,
)

# The references first, the subject last: the cross-check at the end compares layerfs with
# what the others saw. "kernel-overlay" is KERNEL_SHIM: kernel overlayfs behind the
# mount_program interface, the semantic oracle (DESIGN.md), as far as it can go.
MOUNT_PROGRAMS = ("kernel-overlay", "fuse-overlayfs", "layerfs")

# containers/storage runs `PROGRAM -o lowerdir=...,upperdir=...,workdir=... MERGED` and, since
# the mount is not FUSE, unmounts it with umount(2) itself.
KERNEL_SHIM = """#!/bin/sh
case "$1" in
--version) echo "kernel-overlay shim"; exit 0 ;;
-o) exec mount -t overlay overlay -o "$2" "$3" ;;
esac
echo "usage: $0 -o OPTIONS MERGED" >&2
exit 2
"""

# What the base image holds beside busybox: the lower layer the RUN steps change.
BASE_TREE: dict[str, str | None] = {
    "base/keep.txt": "keep\n",
    "base/del.txt": "del\n",
    "base/mod.txt": "orig\n",
    "base/rename_src.txt": "ren\n",
    "base/link_src": "L\n",
    "base/keepdir/k": "k\n",
    "base/olddir/a": "a\n",
    "base/olddir/sub/b": "b\n",
    "base/deldir/x": "x\n",
    "base/deldir/y/z": "z\n",
    "base/mvdir/f": "f\n",
    "base/mvdir/g/h": "h\n",
}
BASE_MODES = {"base/keep.txt": 0o644}


def kernel_overlay_available() -> bool:
    with open("/proc/filesystems") as fs:
        if any(line.split()[-1] == "overlay" for line in fs if line.strip()):
            return True
    return subprocess.run(["modprobe", "overlay"], capture_output=True).returncode == 0


def find_mount_program(name: str) -> Path | None:
    if name == "fuse-overlayfs":
        found = shutil.which("fuse-overlayfs") or shutil.which("fuse-overlayfs", path="/usr/bin")
    else:
        cand = venv_bin() / "mount.layerfs"
        found = str(cand) if cand.exists() else shutil.which("mount.layerfs")
    return Path(found).resolve() if found else None


@pytest.fixture(scope="session")
def base_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    why = is_root_with_fuse()
    if why:
        pytest.skip(f"podman e2e: {why}")
    busybox = find_static_busybox()
    if busybox is None:
        pytest.skip("podman e2e: no static /bin/busybox (Debian package busybox-static)")
    root = tmp_path_factory.mktemp("rootfs")
    make_busybox_rootfs(root, busybox)
    write_tree(root, BASE_TREE, BASE_MODES)
    return root


@dataclass(frozen=True)
class Runtime:
    name: str
    ulimits: tuple[str, ...]


@pytest.fixture(scope="session")
def podman_runtime(base_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    """The OCI runtime that can start a container here, and the rlimits it can set: crun, or
    runc where crun refuses the host's cgroups. Probed with the vfs driver, so no mount program
    is involved: when no runtime works, podman itself cannot run here, and only then is the
    test skipped."""
    errors = []
    for runtime in ("crun", "runc"):
        if not shutil.which(runtime, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"):
            errors.append(f"{runtime}: not installed")
            continue
        env = PodmanEnv(tmp_path_factory.mktemp(f"probe-{runtime}"), runtime, driver="vfs")
        env.setup()
        try:
            env.import_rootfs(base_rootfs, "localhost/base:latest")
            # "--ulimit host" copies podman's own limits, which the runtime can always set.
            out = env.sh("localhost/base:latest", "ulimit -Hn; ulimit -Hu", "--ulimit", "host")
            nofile, nproc = out.split()
            limits = (f"nofile={nofile}:{nofile}", f"nproc={nproc}:{nproc}")
            env.ulimits = limits
            env.setup()
            env.sh("localhost/base:latest", "true")
            return Runtime(runtime, limits)
        except PodmanError as e:
            errors.append(f"{runtime}: {str(e).strip().splitlines()[-1]}")
        finally:
            env.force_cleanup()  # the last podman call: any later one would mount again
    pytest.skip("podman cannot start any container on this host (vfs probe): " + "; ".join(errors))


@pytest.fixture(scope="module", params=MOUNT_PROGRAMS)
def mount_program(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    name: str = request.param
    if name == "kernel-overlay":
        if not kernel_overlay_available():
            pytest.skip("kernel overlayfs is not available")
        shim = tmp_path_factory.mktemp("shim") / "mount.kernel-overlay"
        shim.write_text(KERNEL_SHIM)
        shim.chmod(0o755)
        return name, shim
    path = find_mount_program(name)
    if path is None:
        if name == "layerfs":
            pytest.skip("mount.layerfs not installed")
        pytest.skip("fuse-overlayfs not installed (Debian package fuse-overlayfs)")
    return name, path


@pytest.fixture(scope="module")
def pm(
    mount_program: tuple[str, Path],
    podman_runtime: Runtime,
    base_rootfs: Path,
) -> Iterator[PodmanEnv]:
    """A private podman whose overlay driver mounts through the mount program, with
    localhost/base imported."""
    name, path = mount_program
    # A short root: podman refuses a runroot (ROOT/r) of more than 50 characters in the
    # `container cleanup` conmon runs at a container's exit, and every `podman run` then waits
    # 20 s for it (docs/benchmarks.md); /tmp/pytest-of-root/pytest-NNN/pm-kernel-overlay0/r
    # is 51 once pytest numbers its runs with three digits.
    root = Path(tempfile.mkdtemp(prefix=f"pm-{name}-", dir="/tmp"))
    env = PodmanEnv(
        root,
        podman_runtime.name,
        mount_program=path,
        label=name,
        ulimits=podman_runtime.ulimits,
    )
    env.setup()
    try:
        env.import_rootfs(base_rootfs, "localhost/base:latest")
        yield env
    finally:
        problems = env.force_cleanup()
        if not problems:  # nothing mounted under it any more
            shutil.rmtree(root)
        assert not problems, problems

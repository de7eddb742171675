"""mount.layerfs run as a program: version, help, install, and bad input (nothing mounted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from compat.helpers import daemon_pids, helper_command, helper_env, is_mounted

import layerfs

# Every test with both front ends: the C one leaves all of these to the Python one, which
# must print the same messages and exit codes as when it is run directly.
pytestmark = pytest.mark.usefixtures("front")


def run(args: list[str], cwd: Path | None = None, argv0: list[str] | None = None
        ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    cmd = [*(argv0 or helper_command()), *args]
    return subprocess.run(
        cmd, cwd=cwd, env=helper_env(), stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip


def assert_failed_cleanly(r: subprocess.CompletedProcess[str], mnt: Path, *words: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    errors = [ln for ln in lines if not ln.startswith("mount.layerfs: warning:")]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith("mount.layerfs: "), r.stderr
    for w in words:
        assert w in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    assert not is_mounted(mnt)
    assert daemon_pids(mnt) == []


def test_version() -> None:
    r = run(["--version"])
    assert r.returncode == 0
    assert r.stdout.strip() == f"mount.layerfs: version {layerfs.__version__}"
    assert r.stderr == ""


def test_help() -> None:
    r = run(["--help"])
    assert r.returncode == 0
    assert "lowerdir" in r.stdout and "MERGED" in r.stdout


def test_usage_error(layers: dict[str, Path]) -> None:
    r = run(["-o", f"lowerdir={layers['lower']}"])
    assert r.returncode == 1
    assert r.stderr.startswith("mount.layerfs: no mount point given")


def test_missing_lowerdir(layers: dict[str, Path]) -> None:
    r = run(["-o", f"upperdir={layers['upper']},workdir={layers['work']}", str(layers["merged"])])
    assert_failed_cleanly(r, layers["merged"], "lowerdir")


def test_lower_does_not_exist_names_the_path(layers: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-layer"
    opts = f"lowerdir={layers['lower']}:{missing}"
    r = run(["-o", opts, str(layers["merged"])])
    assert_failed_cleanly(r, layers["merged"], str(missing), "does not exist")


def test_relative_missing_lower_is_named_as_given(layers: dict[str, Path], tmp_path: Path) -> None:
    r = run(["-o", "lowerdir=l/GONE", "merged"], cwd=tmp_path)
    assert_failed_cleanly(r, layers["merged"], "l/GONE")


def test_upper_inside_lower(layers: dict[str, Path]) -> None:
    inner = layers["lower"] / "up"
    inner.mkdir()
    opts = f"lowerdir={layers['lower']},upperdir={inner},workdir={layers['work']}"
    r = run(["-o", opts, str(layers["merged"])])
    assert_failed_cleanly(r, layers["merged"], "overlap")


def test_upper_and_workdir_overlap(layers: dict[str, Path]) -> None:
    inner = layers["upper"] / "work"
    inner.mkdir()
    opts = f"lowerdir={layers['lower']},upperdir={layers['upper']},workdir={inner}"
    r = run(["-o", opts, str(layers["merged"])])
    assert_failed_cleanly(r, layers["merged"], "overlap")


def test_upper_without_workdir(layers: dict[str, Path]) -> None:
    r = run(["-o", f"lowerdir={layers['lower']},upperdir={layers['upper']}", str(layers["merged"])])
    assert_failed_cleanly(r, layers["merged"], "workdir")


def test_missing_mount_point(layers: dict[str, Path], tmp_path: Path) -> None:
    mnt = tmp_path / "nowhere"
    r = run(["-o", f"lowerdir={layers['lower']}", str(mnt)])
    assert_failed_cleanly(r, mnt, str(mnt))


def test_malformed_mapping(layers: dict[str, Path]) -> None:
    r = run(["-o", f"lowerdir={layers['lower']},uidmapping=0:1000", str(layers["merged"])])
    assert_failed_cleanly(r, layers["merged"], "uidmapping")


def test_unknown_options_warn_before_the_error(layers: dict[str, Path], tmp_path: Path) -> None:
    r = run(["-o", f"lowerdir={tmp_path / 'gone'},frob=1", str(layers["merged"])])
    assert_failed_cleanly(r, layers["merged"], "gone")
    assert "mount.layerfs: warning: unknown option 'frob=1' ignored" in r.stderr


def test_bad_input_does_not_load_the_engine(layers: dict[str, Path], tmp_path: Path) -> None:
    # Errors and --version must be cheap: no pyfuse3, trio or layerfs.mount import.
    for args in (["--version"], ["-o", f"lowerdir={tmp_path / 'gone'}", str(layers["merged"])]):
        cmd = [sys.executable, "-X", "importtime", "-m", "mount_helper.main", *args]
        r = subprocess.run(cmd, env=helper_env(), capture_output=True, text=True, check=False)
        imported = {ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines() if "|" in ln}
        assert "mount_helper.argv" in imported
        assert not imported & {"pyfuse3", "trio", "layerfs.mount"}, sorted(imported)


def test_mount8_fake_flag_mounts_nothing(layers: dict[str, Path], tmp_path: Path) -> None:
    # libmount passes -f for "mount -f": validate, mount nothing, succeed.
    link = tmp_path / "mount.fuse.layerfs"
    exe = helper_command()
    if len(exe) != 1:
        pytest.skip("mount.layerfs console script not installed (pip install -e .)")
    link.symlink_to(exe[0])
    mnt = layers["merged"]
    r = run(["overlay", str(mnt), "-f", "-o", f"lowerdir={layers['lower']}"], argv0=[str(link)])
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mnt)
    r = run(["overlay", str(mnt), "-f", "-o", f"lowerdir={tmp_path}/gone"], argv0=[str(link)])
    assert_failed_cleanly(r, mnt, "gone")


def test_install_mount_helper(tmp_path: Path) -> None:
    exe = helper_command()
    if len(exe) != 1:
        pytest.skip("mount.layerfs console script not installed (pip install -e .)")
    r = run([f"--install-mount-helper={tmp_path}"])
    assert r.returncode == 0, r.stderr
    for name in ("mount.fuse.layerfs", "mount.fuse3.layerfs"):
        link = tmp_path / name
        assert link.is_symlink()
        assert os.path.samefile(link, exe[0].removesuffix("-py"))  # the program, either front
        v = run(["--version"], argv0=[str(link)])
        assert v.returncode == 0 and "version" in v.stdout
    # again: replaced in place, not an error
    assert run([f"--install-mount-helper={tmp_path}"]).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mount.fuse.layerfs",
        "mount.fuse3.layerfs",
    ]


def test_install_mount_helper_into_missing_dir(tmp_path: Path) -> None:
    r = run([f"--install-mount-helper={tmp_path / 'nope'}"])
    assert r.returncode == 1
    assert r.stderr.startswith("mount.layerfs: cannot create")

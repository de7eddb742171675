"""scripts/install-system.sh: an install every user can run (rootless podman's mount program)
runs what the checkout's venv runs by default, the engine compiled by mypyc and the compiled
raw path, both built for it and loaded from its prefix (before session 16 it built neither:
a system install served with the engine's sources and the poll loop, said in an info line).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.fuse, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prefix() -> Iterator[Path]:
    """scripts/install-system.sh's install into a fresh prefix readable by all (as the
    rootless podman test makes it), no links into /usr/local/bin."""
    if os.geteuid() != 0:
        pytest.skip("needs root (an install for every user)")
    where = Path(tempfile.mkdtemp(prefix="layerfs-system-", dir="/tmp"))
    try:
        where.chmod(0o755)
        r = subprocess.run(
            [REPO / "scripts/install-system.sh", "--prefix", where, "--no-links"],
            capture_output=True,
            text=True,
            timeout=800,
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_a_system_install_runs_both_compiled_paths(prefix: Path, tmp_path: Path) -> None:
    lower, upper, merged = tmp_path / "lower", tmp_path / "upper", tmp_path / "merged"
    for d in (lower, upper, merged):
        d.mkdir()
    (lower / "f").write_text("lower\n")
    layerfs = prefix / "venv/bin/layerfs"
    subprocess.run([layerfs, "mount", lower, upper, merged], check=True, timeout=60)
    try:
        assert (merged / "f").read_text() == "lower\n"
        (merged / "g").write_text("upper\n")  # a create and a write through the engine
        stats = json.loads(os.getxattr(merged, "trusted.layerfs.statistics"))
        maps = Path(f"/proc/{stats['pid']}/maps").read_text().split()
    finally:
        subprocess.run([layerfs, "umount", merged], check=False, timeout=60)
    ours = {Path(p).name.split(".")[0] for p in maps if p.startswith(f"{prefix}/")}
    assert "engine__mypyc" in ours, sorted(ours)  # the compiled engine's group library
    assert "_craw" in ours, sorted(ours)
    assert (upper / "g").read_text() == "upper\n"

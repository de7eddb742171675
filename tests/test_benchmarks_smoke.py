"""Smoke test of the benchmark harness: one tiny run against every available target.

Keeps ``python -m benchmarks`` working; it judges no speed. It checks that the run prints the
table, writes a complete JSON file, and that the reference targets (native, and kernel
overlayfs where it exists) measured every scenario that applies to them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts, chroot and cache drops need root"),
]


def test_tiny_run_prints_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "run",
            "--size",
            "tiny",
            "--rounds",
            "1",
            "--data-dir",
            str(tmp_path / "data"),
            "--out",
            str(out),
            "--cold-host-memory",  # judges no speed: no 4 GiB pre-touch, the host's knob left alone
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=850,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| scenario | native | kernel | fuse-overlayfs | layerfs |" in proc.stdout
    assert "walk lstat warm" in proc.stdout
    assert "| goal | layerfs | fuse-overlayfs |" in proc.stdout
    for when in ("first mount on the host", "another mount live"):
        assert f"| issue 17: mount exec < 50 ms (quiet machine), {when} |" in proc.stdout

    data = json.loads(out.read_text())
    assert data["complete"] is True
    assert data["rounds_done"] == 1
    assert len(data["goals"]) >= 5
    assert data["size"] == "tiny"
    assert data["machine"]["kernel"]
    assert "native" in data["targets"]
    rows = data["results"]
    assert {r["scenario"] for r in rows} >= {"walk-cold", "churn", "copyup-append", "layers-8"}

    references = [t for t in ("native", "kernel") if t in data["targets"]]
    for target in references:
        assert data["target_info"][target]["tree_check_base"] == "ok"
    for row in rows:
        for target in references:
            entry = row["targets"][target]
            assert not entry.get("errors"), (row["metric"], target, entry)
            daemon_only = row["metric"].endswith(("daemon CPU", "daemon CPU/request"))
            if "skipped" not in entry and not daemon_only:
                assert entry["median"] >= 0, (row["metric"], target)
    # The FUSE daemons' CPU is measured beside the times; layerfs' per request too.
    metrics = {r["metric"]: r["targets"] for r in rows}
    assert metrics["churn: daemon CPU"]["layerfs"]["median"] >= 0
    assert metrics["churn: daemon CPU/request"]["layerfs"]["median"] > 0
    # Issue 17's rows: PSS per mount with 20 mounts of each FUSE target, a podman run on
    # every storage (kernel overlay, fuse-overlayfs, mount.layerfs as mount_program).
    pss = metrics["PSS per mount, 20 mounts"]
    for target in ("fuse-overlayfs", "layerfs"):
        if target in data["targets"]:
            assert pss[target]["median"] > 0, pss[target]
            assert not pss[target].get("errors"), pss[target]
    assert "skipped" in pss["kernel"] and "skipped" in pss["native"]
    podman = metrics["podman run --rm true"]
    if "skipped" not in podman["kernel"]:  # podman runs containers here
        for target in ("kernel", "fuse-overlayfs", "layerfs"):
            if target in data["targets"]:
                assert podman[target]["n"] == 10 and podman[target]["median"] > 0, target
                assert not podman[target].get("errors"), podman[target]
    # No mount is left behind under the data directory.
    mounts = Path("/proc/self/mounts").read_text()
    assert str(tmp_path) not in mounts
    # Work directories parked during the run (removal deferred) are gone at its end.
    runs = tmp_path / "data" / "runs"
    assert not runs.exists(), list(runs.rglob("*"))[:20]
    assert "workroot_spread" in data

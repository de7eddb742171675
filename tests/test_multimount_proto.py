"""benchmarks.multimount (the one-process-several-mounts prototype) serves every mount of a
process, each through its own pyfuse3 copy: reads of the lowers and creates verified through
each mount. It judges no speed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.system import mounts_under

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root"),
]


def _layers(root: Path) -> Path:
    for name in ("l0", "l1", "l2"):
        (root / name / "bin").mkdir(parents=True)
        (root / name / f"only-{name}").write_bytes(name.encode())
    (root / "l1" / "bin" / "sh").write_bytes(b"#!" + b"x" * 100_000)
    return root


def _run(tmp_path: Path, *args: str) -> list[dict[str, object]]:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.multimount", *args]
    cmd += ["--layers", str(_layers(tmp_path / "layers")), "--work", str(work)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=60)
    finally:  # a hung run: its mounts detached, its processes (one group) killed
        for m in mounts_under(tmp_path):
            subprocess.run(["fusermount3", "-u", "-z", str(m)], check=False)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert not list(work.iterdir()), "a run's directory left behind"
    return rows


def test_three_mounts_in_one_process_each_serve_creates(tmp_path: Path) -> None:
    # each client creates files and checks them through its mount (the run fails otherwise)
    args = ["busy", "--mounts", "3", "--per-process", "3", "--op", "create", "-n", "50"]
    (row,) = _run(tmp_path, *args)
    assert row["busy_mounts"] == 3 and row["per_process"] == 3


def test_pss_rows_for_one_and_shared_processes(tmp_path: Path) -> None:
    rows = _run(tmp_path, "pss", "--mounts", "3", "--per-process", "1", "3")
    assert [(r["processes"], len(r["extra_mount_ms"])) for r in rows] == [(3, 0), (1, 2)]
    assert all(float(r["pss_mib_per_mount"]) > 0 for r in rows)

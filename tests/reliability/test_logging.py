"""Logging (issue 6): by default only warnings and errors, to stderr in the foreground and to the
``--log-file`` once detached; ``--debug`` traces requests. Ordinary failures of requests (ENOENT,
EACCES) are answers, not log lines."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from ._helpers import layerfs_daemon, mount_cmd, needs_root, pids_naming, unmount_any, wait_until

pytestmark = [pytest.mark.fuse, needs_root]


def _layout(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for p in (lower, upper, work, mnt):
        p.mkdir()
    (lower / "f").write_text("lower\n")
    return lower, upper, work, mnt


def _workload(mnt: Path) -> None:
    assert (mnt / "f").read_text() == "lower\n"
    with open(mnt / "f", "a") as fh:
        fh.write("more\n")
    assert not (mnt / "missing-name").exists()
    (mnt / "created").write_text("x")
    os.unlink(mnt / "created")


def test_quiet_by_default(tmp_path: Path) -> None:
    lower, upper, work, mnt = _layout(tmp_path)
    with layerfs_daemon([lower], upper, work, mnt) as d:
        _workload(mnt)
    assert d.log_text() == "", "a default foreground mount logged during ordinary requests"


def test_debug_traces_requests(tmp_path: Path) -> None:
    lower, upper, work, mnt = _layout(tmp_path)
    log = tmp_path / "debug.log"
    try:
        r = subprocess.run(
            [
                *mount_cmd([lower], upper, work, mnt, foreground=False),
                "--debug",
                "--log-file",
                str(log),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        _workload(mnt)
    finally:
        unmount_any(mnt)
        wait_until(lambda: not pids_naming(mnt), 20, "the daemon to exit")
    text = log.read_text(errors="replace").lower()
    missing = [w for w in ("lookup", "open", "write", "unlink", "missing-name") if w not in text]
    assert not missing, f"--debug log does not trace {missing}:\n{text[-2000:]}"


@pytest.mark.parametrize("loop", ["craw", "poll"])
def test_debug_traces_each_write_once(tmp_path: Path, loop: str) -> None:
    """One line a WRITE, whichever path serves it: the compiled raw path traced a WRITE it
    then left to pyfuse3 (a first write, which copies the file up), and pyfuse3's handler
    traced it again (review16). The daemon's request counts say how many there were."""
    lower, upper, work, mnt = _layout(tmp_path)
    log = tmp_path / "debug.log"
    with layerfs_daemon(
        [lower], upper, work, mnt, log=log, env={"LAYERFS_LOOP": loop}, flags=["--debug"]
    ) as d:
        with open(mnt / "f", "r+b", buffering=0) as fh:
            for i in range(4):  # the first copies up (pyfuse3), the others are plain writes
                fh.write(b"%d" % i)
        stats = json.loads(os.getxattr(mnt, "trusted.layerfs.statistics"))
    lines = [ln for ln in d.log_text().splitlines() if re.search(r"\bwrite\(", ln)]
    assert stats["req_write"] == 4
    assert len(lines) == 4, "\n".join(lines)

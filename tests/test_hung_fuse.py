"""The gate names a test stuck on a FUSE request nobody answers (tests/support/hung_fuse.py).

A pytest run of one test that mounts layerfs, stops its daemon (SIGSTOP) and stats a file: the
stat waits in the kernel where pytest-timeout's alarm cannot reach it. With the plugin the run
ends by itself, the test reported as timed out; without it the run would wait forever (here: the
outer limit, and a failure).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support.mounts import is_mounted, layerfs_command

pytestmark = pytest.mark.fuse

CONFTEST = """
import sys

sys.path.insert(0, {support!r})
from hung_fuse import pytest_runtest_protocol  # noqa: F401
"""

INNER = """
import json, os, signal, subprocess
from pathlib import Path


def test_stuck():
    d = Path({root!r})
    subprocess.run({mount!r}, check=True, timeout=60)
    pid = json.loads(os.getxattr(d / "merged", "trusted.layerfs.statistics"))["pid"]
    (d / "pid").write_text(str(pid))
    os.kill(pid, signal.SIGSTOP)
    (d / "stat-begun").touch()
    os.stat(d / "merged" / "f")
"""


def test_a_test_stuck_on_fuse_fails_by_its_timeout(tmp_path: Path) -> None:
    for name in ("lower", "upper", "work", "merged", "inner"):
        (tmp_path / name).mkdir()
    (tmp_path / "lower" / "f").write_text("f")
    d = {name: str(tmp_path / name) for name in ("lower", "upper", "work", "merged")}
    mount = [*layerfs_command(), "mount", d["lower"], d["upper"], d["merged"]]
    mount += ["--workdir", d["work"]]
    support = str(Path(__file__).parent / "support")
    (tmp_path / "inner" / "conftest.py").write_text(CONFTEST.format(support=support))
    (tmp_path / "inner" / "test_inner.py").write_text(
        textwrap.dedent(INNER.format(root=str(tmp_path), mount=mount))
    )
    env = dict(os.environ, LAYERFS_TEST_ABORT_GRACE="2")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"]
    cmd += ["-o", "timeout=20", "--rootdir", str(tmp_path / "inner"), str(tmp_path / "inner")]
    log = tmp_path / "inner.log"
    try:
        with open(log, "wb") as out_fh:
            proc = subprocess.Popen(
                cmd, stdout=out_fh, stderr=subprocess.STDOUT, env=env, cwd=tmp_path
            )
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                waits = {t: _wchan(proc.pid, t) for t in os.listdir(f"/proc/{proc.pid}/task")}
                proc.kill()
                proc.wait()
                pytest.fail(
                    f"the stuck test was not ended in 120 s; its threads waited in {waits}; "
                    f"its output:\n{log.read_text(errors='replace')}"
                )
        out = log.read_text(errors="replace")
        assert proc.returncode == 1, out
        assert "Timeout" in out and "test_stuck" in out, out
        if not (tmp_path / "stat-begun").exists():
            pytest.skip("the mount took longer than the inner test's timeout (a loaded machine)")
        assert "aborted connections" in out, out
    finally:
        pid_file = tmp_path / "pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGCONT)
        if is_mounted(d["merged"]):
            subprocess.run(["fusermount3", "-u", "-z", d["merged"]], check=False)


def _wchan(pid: int, tid: str) -> str:
    try:
        return Path(f"/proc/{pid}/task/{tid}/wchan").read_text()
    except OSError:
        return "?"

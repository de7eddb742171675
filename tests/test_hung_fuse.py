"""The gate names a test stuck on a FUSE request nobody answers (tests/support/hung_fuse.py).

A pytest run of one test that mounts layerfs, stops its daemon (SIGSTOP) and stats a file: the
stat waits in the kernel where pytest-timeout's alarm cannot reach it. With the plugin the run
ends by itself, the test reported as timed out; without it the run would wait forever (here: the
outer limit, and a failure).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
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


def test_stuck(tmp_path):  # under the inner run's temporary directory: its mount to abort
    d = Path({root!r})
    for name in ("lower", "upper", "work", "merged"):
        (tmp_path / name).mkdir()
    (tmp_path / "lower" / "f").write_text("f")
    (d / "merged-path").write_text(str(tmp_path / "merged"))
    stack = [str(tmp_path / name) for name in ("lower", "upper", "merged")]
    mount = [*{command!r}, "mount", *stack, "--workdir", str(tmp_path / "work")]
    subprocess.run(mount, check=True, timeout=60)
    pid = json.loads(os.getxattr(tmp_path / "merged", "trusted.layerfs.statistics"))["pid"]
    (d / "pid").write_text(str(pid))
    os.kill(pid, signal.SIGSTOP)
    (d / "stat-begun").touch()
    os.stat(tmp_path / "merged" / "f")
"""


def test_a_test_stuck_on_fuse_fails_by_its_timeout(tmp_path: Path) -> None:
    (tmp_path / "inner").mkdir()
    support = str(Path(__file__).parent / "support")
    (tmp_path / "inner" / "conftest.py").write_text(CONFTEST.format(support=support))
    (tmp_path / "inner" / "test_inner.py").write_text(
        textwrap.dedent(INNER.format(root=str(tmp_path), command=layerfs_command()))
    )
    env = dict(os.environ, LAYERFS_TEST_ABORT_GRACE="2")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"]
    cmd += ["-o", "timeout=20", "--rootdir", str(tmp_path / "inner"), str(tmp_path / "inner")]
    cmd += ["--basetemp", str(tmp_path / "inner-tmp")]
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
        merged = tmp_path / "merged-path"
        if merged.exists() and is_mounted(merged.read_text()):
            subprocess.run(["fusermount3", "-u", "-z", merged.read_text()], check=False)


def _wchan(pid: int, tid: str) -> str:
    try:
        return Path(f"/proc/{pid}/task/{tid}/wchan").read_text()
    except OSError:
        return "?"


def test_the_abort_spares_the_connections_of_another_run(tmp_path: Path) -> None:
    """A run's stuck test aborts only its own run's connections: not a mount made meanwhile
    by another test run on the host (another checkout's gate, a benchmark), which a plain
    "new since the test began" took too. Here "another run's" is a mount outside this run's
    temporary directory, made after the watchdog's snapshot, while a thread of this process
    waits on a stopped daemon of this run."""
    from support import hung_fuse
    from support.mounts import mount_layerfs

    before = hung_fuse.connections()
    other = Path(tempfile.mkdtemp(prefix="hung-other-run-", dir="/tmp"))
    stacks = {}
    for root in (tmp_path, other):
        for name in ("lower", "upper", "work", "merged"):
            (root / name).mkdir()
        (root / "lower" / "f").write_text("f")
        stacks[root] = [root / "lower"], root / "upper", root / "work", root / "merged"
    stuck: list[BaseException | None] = []
    try:
        with (
            mount_layerfs(*stacks[tmp_path]) as ours,
            mount_layerfs(*stacks[other]) as theirs,
        ):
            mine = os.minor(os.stat(ours.mnt).st_dev)
            os.kill(ours.proc.pid, signal.SIGSTOP)
            try:

                def stat() -> None:
                    try:
                        os.stat(ours.mnt / "f")
                        stuck.append(None)
                    except OSError as e:
                        stuck.append(e)

                waiter = threading.Thread(target=stat, daemon=True)
                waiter.start()
                deadline = time.monotonic() + 30
                while not hung_fuse.waiting_on_fuse(os.getpid()):
                    assert time.monotonic() < deadline, "the stat never waited on FUSE"
                    time.sleep(0.05)
                aborted = hung_fuse.abort_new(before, os.getpid())
                waiter.join(30)
                assert (theirs.mnt / "f").read_text() == "f"  # still served
                assert aborted == [mine]
                assert isinstance(stuck[0], OSError)  # ECONNABORTED
            finally:
                os.kill(ours.proc.pid, signal.SIGCONT)
    finally:
        shutil.rmtree(other, ignore_errors=True)

"""The benchmarks' busy-host mode: CPU hogs that run for the block and are gone after it."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.system import busy_host, cpu_seconds, wait_pid_gone


def test_busy_host_hogs_spin_then_go() -> None:
    with busy_host(2) as pids:
        assert len(pids) == 2
        for pid in pids:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            assert state in ("R", "S")  # running (or not yet scheduled past its start)
        assert all(os.path.exists(f"/proc/{pid}") for pid in pids)
    for pid in pids:
        assert wait_pid_gone(pid, 10)
    with busy_host(0) as none:
        assert none == []


def test_cpu_seconds_of_a_process() -> None:
    before = cpu_seconds(os.getpid())
    assert before is not None and before > 0
    sum(range(3_000_000))
    after = cpu_seconds(os.getpid())
    assert after is not None and after >= before
    assert cpu_seconds(2**22 + 12345) is None  # no such pid (above pid_max's default)

"""benchmarks.loopprof measures one workload on a foreground mount, divided by the requests
the kernel counted: the failed lookups are LOOKUPs one each, and strace sees the daemon's
read and writev of each."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import requests

pytestmark = pytest.mark.skipif(requests.available() is not None, reason=str(requests.available()))


def _run(tmp_path: Path, *args: str) -> str:
    cmd = [sys.executable, "-m", "benchmarks.loopprof", "--n", "40", "--dir", str(tmp_path)]
    cmd += ["--out", str(tmp_path), *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout
    assert list(tmp_path.glob("layerfs-loopprof-*")) == []  # its tree removed, nothing mounted
    return out


def test_cpu_per_failed_lookup(tmp_path: Path) -> None:
    out = _run(tmp_path)
    assert "requests 40 ({'LOOKUP': 40})" in out
    assert "us per request; schedstat" in out


def test_syscalls_of_the_daemon(tmp_path: Path) -> None:
    out = _run(tmp_path, "--tool", "strace")
    rows = (
        re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", x)
        for x in out.split("\n")
    )
    calls = {m[2]: int(m[1]) for m in rows if m}
    assert calls["read"] >= 40 and calls["writev"] >= 40

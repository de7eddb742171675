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
from layerfs import fusehooks

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


# What each wait reads a request and writes its reply with: libfuse read(2) and writev(2);
# the raw path os.readv and os.write; its compiled form read(2) and write(2) (the Python
# raw path's where it is not built)
SYSCALLS = {"poll": ("read", "writev"), "raw": ("readv", "write"), "craw": ("read", "write")}


@pytest.mark.parametrize("loop", ["poll", "raw", "craw"])
def test_syscalls_of_the_daemon(tmp_path: Path, loop: str) -> None:
    out = _run(tmp_path, "--tool", "strace", "--env", f"LAYERFS_LOOP={loop}")
    rows = (
        re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", x)
        for x in out.split("\n")
    )
    calls = {m[2]: int(m[1]) for m in rows if m}
    if loop == "craw" and fusehooks.craw_module() is None:
        loop = "raw"
    read, write = SYSCALLS[loop]
    assert calls.get(read, 0) >= 40 and calls.get(write, 0) >= 40, calls

"""Helpers shared by the scenario modules: timing external commands and Python loops."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.model import Measurement, Mounted
from benchmarks.system import CommandError, run, timed

__all__ = [
    "Measurement",
    "Mounted",
    "lower_paths",
    "measure_cmd",
    "measure_drain",
    "repeat",
    "time_call",
    "timed",
    "warm_lower",
]


def time_call(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e9


def measure_cmd(metric: str, cmd: list[str], cwd: Path | None = None) -> Measurement:
    return Measurement(metric, [timed(cmd, cwd=cwd)])


def repeat(mnt: Mounted, fn: Callable[[], float], warmup: int = 1) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then take the size's number of warm samples."""
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(mnt.dataset.params.warm_repeats)]


def drain(cmd: list[str], cwd: Path | None = None) -> float:
    """Seconds ``cmd`` takes to write its stdout into a pipe we read and discard.

    For `tar -cf -`: GNU tar does not read file contents when its archive is /dev/null."""
    t0 = time.perf_counter_ns()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    while proc.stdout.read(1 << 20):
        pass
    err = proc.stderr.read() if proc.stderr else b""
    if proc.wait() != 0:
        raise CommandError(f"{' '.join(cmd[:3])}: exit {proc.returncode}: {err.decode()[-500:]}")
    return (time.perf_counter_ns() - t0) / 1e9


def measure_drain(metric: str, cmd: list[str], cwd: Path | None = None) -> Measurement:
    return Measurement(metric, [drain(cmd, cwd)])


def lower_paths(mnt: Mounted, rel: str) -> list[Path]:
    """Where ``rel`` lives under the mount: the layers' copies, or the native path."""
    ds = mnt.dataset
    if mnt.target == "native":
        return [mnt.path / rel]
    base = ds.stack_dir(mnt.stack)
    found = [base / lower / rel for lower in ds.stack_lowers(mnt.stack)]
    return [p for p in found if os.path.lexists(p)]


def warm_lower(mnt: Mounted, rel: str) -> None:
    """Bring ``rel``'s lower copies into the page cache without going through the mount, so a
    write scenario times the filesystem, not the disk."""
    for path in lower_paths(mnt, rel):
        if path.is_dir():
            drain(["tar", "-cf", "-", "-C", str(path), "."])
        elif path.is_file():
            run(["cat", str(path)])

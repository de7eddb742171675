"""Failed lookups: lstat of names that exist in no layer, in a directory merged over three
layers (what a shell's PATH search or Python's import machinery does all the time)."""

from __future__ import annotations

import os

from benchmarks.dataset import Dataset
from benchmarks.model import Scenario
from benchmarks.scenarios._util import Measurement, Mounted, time_call


def prepare(dataset: Dataset) -> None:
    pass


def _misses(mnt: Mounted) -> float:
    names = [f"missing{i:05d}" for i in range(mnt.dataset.params.missing)]
    fd = os.open(mnt.path / "mergeddir", os.O_RDONLY | os.O_DIRECTORY)

    def loop() -> None:
        for name in names:
            try:
                os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                continue
            raise AssertionError(f"{name} exists")

    try:
        return time_call(loop)
    finally:
        os.close(fd)


def lookup_miss(mnt: Mounted) -> list[Measurement]:
    cold = _misses(mnt)
    # The second pass finds the negative entries cached, where the filesystem allows it.
    warm = _misses(mnt)
    return [Measurement("failed lookups cold", [cold]), Measurement("failed lookups warm", [warm])]


SCENARIOS = [
    Scenario(
        "lookup-miss",
        "lstat of missing names in a merged directory: cold, then again",
        lookup_miss,
        cold=True,
    ),
]

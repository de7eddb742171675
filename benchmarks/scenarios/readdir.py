"""Directory listings: the 10,000-entry directory (one layer) and a directory merged over the
three layers with whiteouts among its entries."""

from __future__ import annotations

from benchmarks.dataset import Dataset
from benchmarks.model import Scenario
from benchmarks.scenarios._util import Measurement, Mounted, repeat, timed


def prepare(dataset: Dataset) -> None:
    pass


def _ls(mnt: Mounted, rel: str) -> float:
    # ls -f: getdents only, unsorted, no stat.
    return timed(["ls", "-f", str(mnt.path / rel)])


def _ls_stat(mnt: Mounted, rel: str) -> float:
    return timed(["find", str(mnt.path / rel), "-printf", r"%s\n"])


def readdir_10k_cold(mnt: Mounted) -> list[Measurement]:
    return [Measurement("readdir 10k cold", [_ls(mnt, "dir10k")])]


def readdir_10k_warm(mnt: Mounted) -> list[Measurement]:
    return [Measurement("readdir 10k warm", repeat(mnt, lambda: _ls(mnt, "dir10k")))]


def readdir_stat_10k_cold(mnt: Mounted) -> list[Measurement]:
    return [Measurement("readdir+lstat 10k cold", [_ls_stat(mnt, "dir10k")])]


def readdir_merged_cold(mnt: Mounted) -> list[Measurement]:
    return [Measurement("readdir merged cold", [_ls(mnt, "mergeddir")])]


def readdir_merged_warm(mnt: Mounted) -> list[Measurement]:
    return [Measurement("readdir merged warm", repeat(mnt, lambda: _ls(mnt, "mergeddir")))]


SCENARIOS = [
    Scenario(
        "readdir-10k-cold", "ls -f of the 10k-entry directory, cold", readdir_10k_cold, cold=True
    ),
    Scenario("readdir-10k-warm", "ls -f of the 10k-entry directory, warm", readdir_10k_warm),
    Scenario(
        "readdir-stat-10k-cold",
        "find -printf %s over the 10k-entry directory, cold",
        readdir_stat_10k_cold,
        cold=True,
    ),
    Scenario(
        "readdir-merged-cold",
        "ls -f of a directory merged over 3 layers, cold",
        readdir_merged_cold,
        cold=True,
    ),
    Scenario(
        "readdir-merged-warm",
        "ls -f of a directory merged over 3 layers, warm",
        readdir_merged_warm,
    ),
]

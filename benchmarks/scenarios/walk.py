"""Full-tree walks: ``find`` with an lstat of every entry (what ``podman diff`` and ``commit``
pay), and ``tar`` of the whole tree (what ``podman export`` and ``commit`` pay)."""

from __future__ import annotations

from benchmarks.dataset import Dataset
from benchmarks.model import Scenario
from benchmarks.scenarios._util import Measurement, Mounted, drain, repeat, timed

# %s needs the size, so find lstat()s every entry (a bare -printf '' would not).
FIND_LSTAT = ["-printf", r"%s\n"]


def prepare(dataset: Dataset) -> None:
    pass


def _walk(mnt: Mounted) -> float:
    return timed(["find", str(mnt.path), *FIND_LSTAT])


def walk_cold(mnt: Mounted) -> list[Measurement]:
    return [Measurement("walk lstat cold", [_walk(mnt)])]


def walk_warm(mnt: Mounted) -> list[Measurement]:
    return [Measurement("walk lstat warm", repeat(mnt, lambda: _walk(mnt)))]


def _tar(mnt: Mounted) -> float:
    # The big file is left out: it would turn this into a sequential read.
    return drain(["tar", "-cf", "-", "--exclude=./big", "-C", str(mnt.path), "."])


def tar_cold(mnt: Mounted) -> list[Measurement]:
    return [Measurement("tar tree cold", [_tar(mnt)])]


def tar_warm(mnt: Mounted) -> list[Measurement]:
    return [Measurement("tar tree warm", repeat(mnt, lambda: _tar(mnt)))]


SCENARIOS = [
    Scenario(
        "walk-cold",
        "find MERGED -printf %s (lstat of every entry), caches dropped",
        walk_cold,
        cold=True,
    ),
    Scenario("walk-warm", "the same walk again, caches warm", walk_warm),
    Scenario(
        "tar-cold",
        "tar -cf - of the tree (without the big file) into a pipe, cold",
        tar_cold,
        cold=True,
    ),
    Scenario("tar-warm", "the same tar, warm", tar_warm),
]

"""Container start: ``chroot MERGED /bin/sh -c true`` and ``chroot MERGED python3 -c pass``
(exec, dynamic loader, libraries, and for Python hundreds of lookups and small reads)."""

from __future__ import annotations

from benchmarks.dataset import Dataset
from benchmarks.model import Scenario
from benchmarks.scenarios._util import Measurement, Mounted, timed

# Warm rows: 4 samples a pass, 5 passes over the targets a round. The session 10 final run
# took 10 samples a target in one block: python3's start moved between 11 and 18 ms in phases
# longer than a block, natively too (native 16.3 ms, kernel 12.2 ms median), and the ratio of
# medians followed the phases, not the filesystem.
WARM_SAMPLES = 4
WARM_PASSES = 5


def prepare(dataset: Dataset) -> None:
    pass


def _sh(mnt: Mounted) -> float:
    return timed(["chroot", str(mnt.path), "/bin/sh", "-c", "true"])


def _py(mnt: Mounted) -> float:
    return timed(["chroot", str(mnt.path), "/usr/bin/python3", "-c", "pass"])


def sh_cold(mnt: Mounted) -> list[Measurement]:
    return [Measurement("start sh cold", [_sh(mnt)])]


def sh_warm(mnt: Mounted) -> list[Measurement]:
    _sh(mnt)
    return [Measurement("start sh warm", [_sh(mnt) for _ in range(WARM_SAMPLES)])]


def py_cold(mnt: Mounted) -> list[Measurement]:
    return [Measurement("start python3 cold", [_py(mnt)])]


def py_warm(mnt: Mounted) -> list[Measurement]:
    _py(mnt)
    return [Measurement("start python3 warm", [_py(mnt) for _ in range(WARM_SAMPLES)])]


def _need_shell(ds: Dataset) -> str | None:
    return None if ds.has_shell else "no /bin/sh in the data set (needs busybox-static)"


def _need_python(ds: Dataset) -> str | None:
    return None if ds.has_python3 else "no python3 in the data set (full size only)"


SCENARIOS = [
    Scenario(
        "start-sh-cold",
        "chroot MERGED /bin/sh -c true, cold",
        sh_cold,
        cold=True,
        requires=_need_shell,
    ),
    Scenario(
        "start-sh-warm",
        "chroot MERGED /bin/sh -c true, warm",
        sh_warm,
        requires=_need_shell,
        passes=WARM_PASSES,
    ),
    Scenario(
        "start-python-cold",
        "chroot MERGED python3 -c pass, cold",
        py_cold,
        cold=True,
        requires=_need_python,
    ),
    Scenario(
        "start-python-warm",
        "chroot MERGED python3 -c pass, warm",
        py_warm,
        requires=_need_python,
        passes=WARM_PASSES,
    ),
]

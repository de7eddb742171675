"""Lookup and walk cost as the layer count grows: stacks of 1, 8, 32 and 128 lowers holding
the same files in the bottom layer (every layer above has the same directories, empty), so a
cold lookup of a bottom file misses in every layer above it first."""

from __future__ import annotations

import os
from collections.abc import Callable

from benchmarks.dataset import Dataset
from benchmarks.model import SIZES, Scenario
from benchmarks.scenarios._util import Measurement, Mounted, time_call, timed
from benchmarks.system import drop_caches


def prepare(dataset: Dataset) -> None:
    pass


def stack_run(mnt: Mounted) -> list[Measurement]:
    depth = mnt.stack[1:]
    files = mnt.dataset.stack_files()
    root = os.open(mnt.path, os.O_RDONLY | os.O_DIRECTORY)

    def stat_all() -> None:
        for rel in files:
            os.lstat(rel, dir_fd=root)

    try:
        t_stat = time_call(stat_all)
    finally:
        os.close(root)
    drop_caches(3)
    t_walk = timed(["find", str(mnt.path), "-printf", r"%s\n"])
    return [
        Measurement(f"stat bottom files, {depth} layers cold", [t_stat]),
        Measurement(f"walk, {depth} layers cold", [t_walk]),
    ]


def _requires(depth: int) -> Callable[[Dataset], str | None]:
    def check(ds: Dataset) -> str | None:
        return None if depth in ds.params.stack_depths else f"no {depth}-layer stack"

    return check


SCENARIOS = [
    Scenario(
        f"layers-{d}",
        f"lstat of the bottom layer's files through {d} lowers, cold; then a cold walk",
        stack_run,
        stack=f"s{d}",
        cold=True,
        requires=_requires(d),
    )
    for d in SIZES["full"].stack_depths
]

"""The workloads. Each module exports ``prepare(dataset)`` and ``SCENARIOS`` (see
:mod:`benchmarks.model`); the order here is the order of the table."""

from __future__ import annotations

from types import ModuleType

from benchmarks.model import Scenario
from benchmarks.scenarios import (
    build,
    copyup,
    layers,
    lookup,
    mounting,
    podman,
    read,
    readdir,
    start,
    walk,
    write,
)

MODULES: list[ModuleType] = [
    walk,
    readdir,
    lookup,
    read,
    start,
    write,
    copyup,
    mounting,
    podman,
    build,
    layers,
]


def all_scenarios() -> list[Scenario]:
    out: list[Scenario] = []
    for mod in MODULES:
        out.extend(mod.SCENARIOS)
    return out

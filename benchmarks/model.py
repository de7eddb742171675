"""Shared types of the benchmark harness: sizes, measurements, scenarios and mounts.

A scenario module exports ``prepare(dataset)`` (optional extra data, built once and cached with
the dataset) and ``SCENARIOS``, a list of :class:`Scenario`. Each scenario's ``run(mnt)`` gets a
fresh :class:`Mounted` view of one target and returns one or more :class:`Measurement`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.dataset import Dataset

MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass(frozen=True)
class SizeParams:
    """How big each part of the data set and each workload is, for one ``--size``."""

    name: str
    synthetic_files: int  # 0: use a debootstrap rootfs instead of a synthetic tree
    big_file: int  # bytes of the big lower file
    dir10k: int  # entries of the big directory
    merged_dir: int  # entries of the directory merged over the three layers
    missing: int  # failed lookups
    churn: int  # files created, then unlinked
    seq_write: int  # bytes of the big sequential write
    untar: int  # bytes in the untar tarball
    stack_files: int  # files stat'ed in the bottom layer of the layer-count stacks
    stack_depths: tuple[int, ...]
    rand_reads: int  # random 4 KiB reads
    many_entries: int  # entries of the tree walked by the daemon memory scenario
    warm_repeats: int  # samples taken per mount by warm scenarios
    rounds: int  # default number of rounds
    timeout: float  # seconds one scenario run may take on one target


SIZES: dict[str, SizeParams] = {
    "tiny": SizeParams(
        name="tiny",
        synthetic_files=1500,
        big_file=4 * MiB,
        dir10k=100,
        merged_dir=150,
        missing=200,
        churn=200,
        seq_write=8 * MiB,
        untar=2 * MiB,
        stack_files=100,
        stack_depths=(1, 8, 32, 128),
        rand_reads=200,
        many_entries=10_000,
        warm_repeats=2,
        rounds=1,
        timeout=60,
    ),
    "small": SizeParams(
        name="small",
        synthetic_files=15000,
        big_file=64 * MiB,
        dir10k=10000,
        merged_dir=3000,
        missing=10000,
        churn=2000,
        seq_write=64 * MiB,
        untar=20 * MiB,
        stack_files=1000,
        stack_depths=(1, 8, 32, 128),
        rand_reads=2000,
        many_entries=100_000,
        warm_repeats=3,
        rounds=3,
        timeout=300,
    ),
    "full": SizeParams(
        name="full",
        synthetic_files=0,
        big_file=1 * GiB,
        dir10k=10000,
        merged_dir=5000,
        missing=10000,
        churn=10000,
        seq_write=1 * GiB,
        untar=100 * MiB,
        stack_files=5000,
        stack_depths=(1, 8, 32, 128),
        rand_reads=5000,
        many_entries=1_000_000,
        warm_repeats=3,
        rounds=3,
        timeout=900,
    ),
}


@dataclass
class Measurement:
    """Samples of one metric from one run on one target (lower is better)."""

    metric: str
    samples: list[float]
    unit: str = "s"  # "s" or "MiB"

    def to_json(self) -> dict[str, object]:
        return {"metric": self.metric, "samples": self.samples, "unit": self.unit}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Measurement:
        samples = data["samples"]
        assert isinstance(samples, list)
        return cls(str(data["metric"]), [float(s) for s in samples], str(data["unit"]))


class Skip(Exception):
    """Raised by a scenario that does not apply to a target (e.g. no daemon to measure)."""


@dataclass
class Mounted:
    """One live view of the data set, as a scenario sees it."""

    target: str
    path: Path  # the mountpoint (or the plain directory for native)
    dataset: Dataset
    stack: str  # "base" or "sN"
    pid: int | None = None  # the FUSE daemon's pid, when there is one
    mount_seconds: float | None = None  # exec of the mount command to a live mount
    exec_seconds: float | None = None  # exec of the mount command until it exits
    fuse_conn: int | None = None  # st_dev of the mount, to abort a hung FUSE connection
    work: Path | None = None  # the run's private work directory (beside upper, work, mnt)
    # Scenario.mounts > 1: the other live mounts of the same stack, each with its own upper
    others: list[Mounted] = field(default_factory=list)
    # What podman's overlay driver is given for this target: podman=False, the target cannot
    # be podman's storage; else mount_program (None: the kernel's own overlay).
    podman: bool = False
    mount_program: Path | None = None


@dataclass(frozen=True)
class Scenario:
    """One workload: what it needs mounted and how to run it."""

    name: str
    summary: str
    run: Callable[[Mounted], list[Measurement]]
    # "base" (the 3-layer rootfs), "s1", "s8", ... (layer-count stacks), "many" (huge tree)
    stack: str = "base"
    writable: bool = False  # writes: native gets a private copy, and the harness syncs after
    cold: bool = False  # drop the page, dentry and inode caches after mounting
    # What the native target's private copy holds for a writing scenario (top-level names;
    # None: all but the big file). Copying the whole tree each run would cost more than most
    # measurements.
    native_copy: tuple[str, ...] | None = None
    sizes: frozenset[str] = field(default_factory=lambda: frozenset(SIZES))
    requires: Callable[[Dataset], str | None] | None = None  # returns a reason to skip
    explicit: bool = False  # runs only when named in --only (too long for every run)
    mounts: int = 1  # live mounts of the stack at once (FUSE targets only; the rest: 1)
    # FUSE targets: another mount of the stack is made first and stays live through the run,
    # as on a host already running containers (layerfs' fork server is then up)
    resident: bool = False
    timeout: float | None = None  # seconds one run may take, where more than the size's
    daemon_cpu: bool = True  # add the daemon's CPU rows (not where the mount is not the subject)
    # Passes over the targets per round, each on a fresh mount, for rows of a few ms whose
    # noise comes in phases of seconds longer than one target's block of samples.
    passes: int = 1

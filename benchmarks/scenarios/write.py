"""Writes of new data through the merged view: small-file churn, big sequential writes with
and without fsync, and unpacking a tarball into existing directories (a package install)."""

from __future__ import annotations

import os

from benchmarks.dataset import Dataset
from benchmarks.model import MiB, Scenario
from benchmarks.scenarios._util import Measurement, Mounted, time_call, timed
from benchmarks.system import run

BLOCK = b"\xa5" * 4096


def prepare(dataset: Dataset) -> None:
    pass


def churn(mnt: Mounted) -> list[Measurement]:
    # tmp/ is a lower directory: the first create copies it up, as in a real container.
    d = mnt.path / "tmp" / "churn"
    os.mkdir(d)
    names = [f"f{i:05d}" for i in range(mnt.dataset.params.churn)]
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL

    def create() -> None:
        for name in names:
            fd = os.open(name, flags, 0o644, dir_fd=dfd)
            os.write(fd, BLOCK)
            os.close(fd)

    def unlink() -> None:
        for name in names:
            os.unlink(name, dir_fd=dfd)

    try:
        t_create = time_call(create)
        t_unlink = time_call(unlink)
    finally:
        os.close(dfd)
    return [Measurement("create 4k files", [t_create]), Measurement("unlink files", [t_unlink])]


def _dd(mnt: Mounted, *extra: str) -> float:
    count = max(1, mnt.dataset.params.seq_write // MiB)
    out = mnt.path / "tmp" / "seqwrite"
    return timed(["dd", "if=/dev/zero", f"of={out}", "bs=1M", f"count={count}", *extra])


def seq_write(mnt: Mounted) -> list[Measurement]:
    return [Measurement("seq write big", [_dd(mnt)])]


def seq_write_fsync(mnt: Mounted) -> list[Measurement]:
    return [Measurement("seq write big + fsync", [_dd(mnt, "conv=fsync")])]


def untar(mnt: Mounted) -> list[Measurement]:
    tarball = mnt.dataset.untar_tarball
    run(["cat", str(tarball)])  # from the page cache, so the disk is not timed
    return [Measurement("untar", [timed(["tar", "-xf", str(tarball), "-C", str(mnt.path)])])]


SCENARIOS = [
    Scenario(
        "churn",
        "create+write 4 KiB files in a new dir under a lower dir, then unlink",
        churn,
        writable=True,
        native_copy=("tmp",),
    ),
    Scenario(
        "seqwrite",
        "dd bs=1M of a new big file, no fsync",
        seq_write,
        writable=True,
        native_copy=("tmp",),
    ),
    Scenario(
        "seqwrite-fsync",
        "dd bs=1M conv=fsync of a new big file",
        seq_write_fsync,
        writable=True,
        native_copy=("tmp",),
    ),
    Scenario(
        "untar",
        "tar -x of new files into existing lower directories",
        untar,
        writable=True,
        native_copy=("usr",),
    ),
]

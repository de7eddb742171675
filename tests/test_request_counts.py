"""Requests per operation, counted by the kernel (benchmarks/requests.py): the requests that
layerfs' INIT flags and its no-OPEN mode spare the kernel must stay spared.

Each figure is what the kernel sends for one file on this mount, so a change that brings back
OPEN/CREATE/FLUSH/RELEASE, a GETXATTR of security.capability before every write, writes
smaller than 1 MiB or uncached negative lookups fails here. Not a timing test: a request
count does not depend on the machine's load.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import requests, system

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(requests.available() is not None, reason=str(requests.available())),
]

N = 40  # files per workload
MIB = 8
DIRS = 12  # in the tarball: usr, usr/share, usr/share/d0..d9

Mounted = tuple[Path, Path]  # the mount, the tarball


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Mounted]:
    lower = requests.make_tree(tmp_path, N)
    layerfs = str(Path(sys.executable).with_name("layerfs"))
    mnt, proc = requests.mount("layerfs", lower, tmp_path, layerfs, "")
    try:
        yield mnt, tmp_path / "files.tar"
    finally:
        requests.umount(mnt, proc)


def _count(mnt: Path, name: str, tarball: Path) -> collections.Counter[str]:
    setup, run, _units = requests.workloads(N, MIB, tarball)[name]
    setup(mnt)
    with requests.counting(os.stat(mnt).st_dev) as counts:
        run(mnt)
    return counts


NEVER = ("OPEN", "CREATE", "FLUSH", "RELEASE", "OPENDIR", "RELEASEDIR")


def _spared(counts: collections.Counter[str]) -> None:
    # each is answered ENOSYS once, and the kernel sends it no more on this mount
    for op in NEVER:
        assert counts[op] <= 1, (op, counts)


def test_create_costs_five_requests_a_file(mounted: Mounted) -> None:
    counts = _count(mounted[0], "create", mounted[1])
    _spared(counts)
    # the negative LOOKUP, MKNOD, the WRITE, the parent's GETATTR (its attributes changed),
    # the capability check of the new file's first write
    for op in ("LOOKUP", "MKNOD", "WRITE", "GETATTR", "GETXATTR"):
        assert N <= counts[op] <= N + 2, (op, counts)
    assert sum(counts.values()) <= 5 * N + 6, counts


def test_unlink_costs_two_requests_a_file(mounted: Mounted) -> None:
    mnt, tarball = mounted
    os.mkdir(mnt / "tmp" / "churn")
    requests.workloads(N, MIB, tarball)["create"][1](mnt)
    _setup, run, _units = requests.workloads(N, MIB, tarball)["unlink"]
    with requests.counting(os.stat(mnt).st_dev) as counts:
        run(mnt)
    assert counts["UNLINK"] == N, counts
    assert sum(counts.values()) <= 2 * N + 2, counts


def test_failed_lookups_are_asked_once(mounted: Mounted) -> None:
    mnt, tarball = mounted
    assert _count(mnt, "failed", tarball) == {"LOOKUP": N}
    assert _count(mnt, "failed", tarball) == {}  # the negative entries are cached


def test_sequential_write_sends_1_mib_requests(mounted: Mounted) -> None:
    counts = _count(mounted[0], "seq-write", mounted[1])
    _spared(counts)
    assert MIB <= counts["WRITE"] <= MIB + 1, counts
    assert counts["GETXATTR"] <= 2, counts  # not one capability check per write


def test_untar_requests_a_file(mounted: Mounted) -> None:
    counts = _count(mounted[0], "untar", mounted[1])
    _spared(counts)
    entries = N + DIRS
    # tar's fchown, fchmod, utimensat of each entry; the capability checks of a file's first
    # write and of its chown; a LOOKUP of each name
    assert counts["SETATTR"] <= 3 * entries, counts
    assert counts["GETXATTR"] <= 2 * N + 2, counts
    assert counts["LOOKUP"] <= entries, counts
    assert counts["MKNOD"] == N, counts
    assert sum(counts.values()) <= 10 * entries, counts


def test_the_daemon_counts_what_the_kernel_sends(mounted: Mounted) -> None:
    """The benchmarks' CPU per request divides by the daemon's req_ counters: they must count
    the requests the kernel sent, not also how the loop waited for them (the poll loop's
    counters did, and halved every CPU per request figure of a run)."""
    mnt = mounted[0]
    before = system.fuse_requests(mnt)
    with requests.counting(os.stat(mnt).st_dev) as counts:
        for i in range(N):
            with contextlib.suppress(FileNotFoundError):
                os.stat(mnt / f"missing-{i}")
    after = system.fuse_requests(mnt)
    assert before is not None and after is not None
    # outside the kernel's count: the statistics read after it, the mount's stat before it
    assert counts["LOOKUP"] == N, counts
    assert N <= after - before <= N + 4, (after - before, counts)

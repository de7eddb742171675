"""Mount latency (exec of the mount command until it exits: what a container engine waits
for; and until the root answers a stat) and the FUSE
daemon's memory: idle, after a walk of the whole tree, and after the kernel forgets the
inodes (``echo 2 > /proc/sys/vm/drop_caches`` sends FORGET for every cached inode)."""

from __future__ import annotations

import time

from benchmarks.dataset import Dataset
from benchmarks.model import SIZES, Measurement, Mounted, Scenario, Skip
from benchmarks.system import drop_caches, rss_mib, timed

DEEPEST = max(SIZES["full"].stack_depths)


def prepare(dataset: Dataset) -> None:
    dataset.build_many()


def mount_time(mnt: Mounted) -> list[Measurement]:
    if mnt.mount_seconds is None:
        raise Skip("nothing to mount")
    name = "mount" if mnt.stack == "base" else f"mount {mnt.stack[1:]} layers"
    rows = [Measurement(name, [mnt.mount_seconds])]
    if mnt.exec_seconds is not None:
        rows.insert(0, Measurement(name.replace("mount", "mount exec", 1), [mnt.exec_seconds]))
    return rows


def rss(mnt: Mounted) -> list[Measurement]:
    if mnt.pid is None:
        raise Skip("no daemon")
    idle = rss_mib(mnt.pid)
    timed(["find", str(mnt.path), "-printf", r"%s\n"])
    walked = rss_mib(mnt.pid)
    drop_caches(2)
    time.sleep(2)  # FORGETs are queued; give the daemon time to process them
    forgot = rss_mib(mnt.pid)
    return [
        Measurement("daemon RSS idle", [idle], "MiB"),
        Measurement("daemon RSS after walk", [walked], "MiB"),
        Measurement("daemon RSS after forget", [forgot], "MiB"),
    ]


def rss_many(mnt: Mounted) -> list[Measurement]:
    if mnt.pid is None:
        raise Skip("no daemon")
    n = mnt.dataset.params.many_entries
    timed(["find", str(mnt.path), "-printf", r"%s\n"])
    walked = rss_mib(mnt.pid)
    drop_caches(2)
    time.sleep(5)
    forgot = rss_mib(mnt.pid)
    return [
        Measurement(f"daemon RSS after walk, {n} entries", [walked], "MiB"),
        Measurement(f"daemon RSS after forget, {n} entries", [forgot], "MiB"),
    ]


def _need_stack(ds: Dataset) -> str | None:
    return None if DEEPEST in ds.params.stack_depths else f"no {DEEPEST}-layer stack"


SCENARIOS = [
    Scenario("mount", "mount command exec to a live root (3 layers + upper)", mount_time),
    Scenario(
        f"mount-{DEEPEST}",
        f"mount time of the {DEEPEST}-layer stack",
        mount_time,
        stack=f"s{DEEPEST}",
        requires=_need_stack,
    ),
    Scenario(
        "rss", "daemon VmRSS: idle, after find over the tree, after drop_caches=2", rss, cold=True
    ),
    Scenario(
        "rss-many",
        "daemon VmRSS after find over a tree of 1,000,000 empty files (10,000 "
        "tiny), and after drop_caches=2; only with --only rss-many",
        rss_many,
        stack="many",
        cold=True,
        explicit=True,
    ),
]

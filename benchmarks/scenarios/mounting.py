"""Mount latency (exec of the mount command until it exits: what a container engine waits
for; and until the root answers a stat) and the FUSE
daemon's memory: idle, after a walk of the whole tree, and after the kernel forgets the
inodes (``echo 2 > /proc/sys/vm/drop_caches`` sends FORGET for every cached inode); and the
memory of many mounts at once: PSS per mount with PSS_MOUNTS mounts of the base stack (for a
``-ksm`` target, once the host's ksmd, run for the measurement, has merged what it will)."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.dataset import Dataset
from benchmarks.model import SIZES, Measurement, Mounted, Scenario, Skip
from benchmarks.system import daemon_processes, drop_caches, pss_kib, rss_mib, timed

PSS_MOUNTS = 20
KSM = Path("/sys/kernel/mm/ksm")
KSM_SETTLE_S = 300  # ksmd's defaults scan ~5,000 pages a second: 20 daemons in ~30 s a pass

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


def mount_time_resident(mnt: Mounted) -> list[Measurement]:
    return [
        Measurement(f"{m.metric} (another mount live)", m.samples, m.unit) for m in mount_time(mnt)
    ]


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


def read_once(root: Path) -> None:
    """What a container's start reads, roughly: the root listed and stat'ed, /bin/sh read."""
    for name in os.listdir(root):
        os.lstat(root / name)
    sh = root / "bin/sh"
    if sh.exists():
        with open(sh, "rb") as f:
            while f.read(1 << 20):
                pass


def pss(mnt: Mounted) -> list[Measurement]:
    """PSS_MOUNTS mounts of the base stack at once, each read once: the PSS of every process
    that serves them (each daemon, and a layerfs fork server it came from, each counted once)
    summed and divided by the mounts; and the RSS of one idle daemon (median over the mounts,
    before the reads)."""
    mounts = [mnt, *mnt.others]
    if mnt.pid is None:
        raise Skip("no daemon")
    if len(mounts) != PSS_MOUNTS or any(m.pid is None for m in mounts):
        raise RuntimeError(f"{len(mounts)} mounts, {sum(m.pid is None for m in mounts)} no pid")
    pids = [m.pid for m in mounts if m.pid is not None]
    idle = statistics.median(rss_mib(pid) for pid in pids)
    for m in mounts:
        read_once(m.path)
    serving: set[int] = set()
    for pid in pids:
        serving |= daemon_processes(pid)
    with _ksmd() if mnt.target.endswith("-ksm") else contextlib.nullcontext():
        total = sum(pss_kib(pid) for pid in serving) / 1024
    return [
        Measurement(f"PSS per mount, {PSS_MOUNTS} mounts", [total / PSS_MOUNTS], "MiB"),
        Measurement(f"daemon RSS idle, one of {PSS_MOUNTS} mounts", [idle], "MiB"),
    ]


@contextlib.contextmanager
def _ksmd() -> Iterator[None]:
    """The host's ksmd on, at its own scan settings, until two passes in a row merged no more
    (or KSM_SETTLE_S); then back as it was, merged pages split again if it was off."""
    if not (KSM / "run").exists():
        raise Skip("no KSM in this kernel")
    before = (KSM / "run").read_text().strip()
    (KSM / "run").write_text("1")
    try:
        deadline = time.monotonic() + KSM_SETTLE_S
        scans, sharing, still = _ksm("full_scans"), _ksm("pages_sharing"), 0
        while still < 2 and time.monotonic() < deadline:
            time.sleep(1)
            if (done := _ksm("full_scans")) > scans:
                scans, now = done, _ksm("pages_sharing")
                still = still + 1 if now <= sharing * 1.01 and now > 0 else 0
                sharing = now
        yield
    finally:
        if before == "0":
            (KSM / "run").write_text("2")  # unmerge: nothing stays merged on a host that had it off
        (KSM / "run").write_text(before)


def _ksm(name: str) -> int:
    return int((KSM / name).read_text())


def _need_stack(ds: Dataset) -> str | None:
    return None if DEEPEST in ds.params.stack_depths else f"no {DEEPEST}-layer stack"


SCENARIOS = [
    Scenario("mount", "mount command exec to a live root (3 layers + upper)", mount_time),
    Scenario(
        "mount-resident",
        "mount command exec to a live root while another mount of the stack stays live (a "
        "host already running containers: layerfs' fork server is up)",
        mount_time_resident,
        resident=True,
    ),
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
        "pss",
        f"{PSS_MOUNTS} mounts of the base stack, each read once: PSS of the daemons (and "
        "their fork server) per mount, smaps_rollup; RSS of one idle daemon",
        pss,
        mounts=PSS_MOUNTS,
        daemon_cpu=False,
        timeout=KSM_SETTLE_S + 120,
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

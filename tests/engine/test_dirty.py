"""A write is made inline only while the page cache cannot throttle it (layerfs.dirty,
layerfs.files: ``_write``).

``DirtyGauge`` reads the kernel's dirty-page counters and limits (/proc/vmstat, the memory
cgroup's files, the backing device's ``strict_limit``); here it reads trees made by the test in
their formats, so that every case (below and above the freerun ceiling, a small cgroup limit,
a strict device, a file that cannot be read) is seen on any machine. The engine tests write
through ``Files`` on real directories and count where the writes ran.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from layerfs import dirty
from layerfs.attrs import Caller
from layerfs.dirty import DirtyGauge
from layerfs.inodes import ROOT_ID

from ._stack import make_stack, overlay

ROOT = Caller(0, 0, 0o022, 1)
MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
DEV = os.makedev(254, 3)


@pytest.fixture(autouse=True)
def _no_timed_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dirty, "INTERVAL", 3600.0)  # a reading when the budget runs out only


def _tree(
    tmp: Path,
    *,
    dirty_pages: int = 0,
    thresh: int = 4 << 30,
    strict: str | None = "0",
    cgroup: str = "0::/a/b\n",
    cg: dict[str, dict[str, str]] | None = None,
    v2_controllers: str = "cpu io memory pids",
) -> tuple[str, str]:
    """A /proc and a /sys: vmstat with DIRTY_PAGES dirty and a hard threshold of THRESH bytes
    (the background one half of it: freerun at 3/4), the daemon in CGROUP, cgroup v2 mounted
    at sys/fs/cgroup with the files CG gives per cgroup directory."""
    proc, sys = tmp / "proc", tmp / "sys"
    (proc / "self").mkdir(parents=True)
    t = thresh // PAGE
    (proc / "vmstat").write_text(
        f"nr_free_pages {t * 4}\nnr_inactive_file {t}\nnr_active_file {t}\n"
        f"nr_dirty {dirty_pages}\nnr_writeback 0\n"
        f"nr_dirty_threshold {t}\nnr_dirty_background_threshold {t // 2}\n"
    )
    (proc / "self" / "cgroup").write_text(cgroup)
    root = sys / "fs" / "cgroup"
    (proc / "self" / "mountinfo").write_text(f"30 23 0:27 / {root} rw - cgroup2 cgroup2 rw\n")
    root.mkdir(parents=True)
    (root / "cgroup.controllers").write_text(v2_controllers + "\n")
    for rel, files in (cg if cg is not None else {"a/b": _v2("max")}).items():
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "cgroup.type").write_text("domain\n")
        for name, text in files.items():
            (d / name).write_text(text)
    if strict is not None:
        bdi = sys / "class" / "bdi" / f"{os.major(DEV)}:{os.minor(DEV)}"
        bdi.mkdir(parents=True)
        (bdi / "strict_limit").write_text(strict + "\n")
    return str(proc), str(sys)


def _gauge(tmp: Path, **kw: object) -> DirtyGauge:
    proc, sys = _tree(tmp, **kw)  # type: ignore[arg-type]
    return DirtyGauge(DEV, proc=proc, sys=sys)


def _v2(max_: str, *, dirty: int = 0, file: int = 64 * MiB, high: str = "max") -> dict[str, str]:
    return {
        "memory.max": max_ + "\n",
        "memory.high": high + "\n",
        "memory.current": f"{file + 32 * MiB}\n",
        "memory.stat": f"anon {32 * MiB}\nfile {file}\nactive_file {file // 2}\n"
        f"inactive_file {file // 2}\nfile_dirty {dirty}\nfile_writeback 0\n",
    }


def test_room_below_the_freerun_ceiling(tmp_path: Path) -> None:
    g = _gauge(tmp_path)  # 4 GiB threshold, 2 GiB background: 3 GiB free running, half ours
    assert g.room(MiB)
    assert g.readings == 1
    for _ in range(100):
        assert g.room(MiB)
    assert g.readings == 1  # counted against the budget between readings


def test_own_writes_spend_the_budget_then_read_again(tmp_path: Path) -> None:
    g = _gauge(tmp_path, thresh=1 << 30)  # 768 MiB below the ceiling: 384 MiB ours
    for _ in range(384):
        assert g.room(MiB)
    assert g.readings == 1
    vmstat = Path(g.proc) / "vmstat"
    text = vmstat.read_text()  # meanwhile the dirty pages rose to the ceiling
    vmstat.write_text(text.replace("nr_dirty 0\n", f"nr_dirty {(768 << 20) // PAGE}\n"))
    assert not g.room(MiB)  # read again, not counted on
    assert g.readings == 2


def test_no_room_is_read_again_only_after_the_interval(tmp_path: Path) -> None:
    """A reading that found no room holds until the next is due: each write asked it again
    (9 files in a v2 cgroup two deep, ~75 us of CPU on the trio thread a write on a v1 host),
    so every write of a daemon in a cgroup with less than MIN_ROOM to spare paid it, against
    the docs' "at most every 0.1 s"."""
    g = _gauge(tmp_path, cg={"a": _v2("max"), "a/b": _v2(str(512 * MiB))})
    for _ in range(100):
        assert not g.room(4096)
    assert g.readings == 1
    g._next = 0.0  # the next reading is due
    assert not g.room(4096)
    assert g.readings == 2


@pytest.mark.parametrize("near", [0, 100 * MiB])
def test_no_room_at_or_near_the_ceiling(tmp_path: Path, near: int) -> None:
    # freerun at 3 GiB; dirty up to NEAR below it: less room than MIN_ROOM counts as none
    g = _gauge(tmp_path, dirty_pages=((3 << 30) - near) // PAGE)
    assert not g.room(4096)


def test_no_room_on_a_strict_device(tmp_path: Path) -> None:
    assert not _gauge(tmp_path, strict="1").room(4096)
    assert _gauge(tmp_path / "other", strict=None).room(4096)  # no such device: not strict


def test_no_room_when_the_counters_cannot_be_read(tmp_path: Path) -> None:
    g = _gauge(tmp_path)
    os.unlink(Path(g.proc) / "vmstat")
    assert not g.room(4096)


def test_memcg_limit_bounds_the_room(tmp_path: Path) -> None:
    cg = {"a": _v2("max"), "a/b": _v2(str(512 * MiB))}
    # 416 MiB of headroom + 64 MiB of file pages, at the global 3/4 of... the share:
    # freerun (3 GiB) of dirtyable (24 GiB in the tree): 60 MiB, below MIN_ROOM
    assert not _gauge(tmp_path, cg=cg).room(4096)
    cg = {"a": _v2("max"), "a/b": _v2("max")}
    assert _gauge(tmp_path / "unlimited", cg=cg).room(4096)
    cg = {"a": _v2(str(64 << 30)), "a/b": _v2("max")}  # a parent's limit, with room
    assert _gauge(tmp_path / "roomy", cg=cg).room(4096)
    cg = {"a": _v2(str(64 << 30)), "a/b": _v2("max", dirty=3 << 30)}
    assert not _gauge(tmp_path / "dirty", cg=cg).room(4096)  # the cgroup's own dirty pages
    cg = {"a": _v2("max", high=str(256 * MiB)), "a/b": _v2("max")}
    assert not _gauge(tmp_path / "high", cg=cg).room(4096)  # memory.high counts as a limit


def test_memory_controller_elsewhere_or_unknown(tmp_path: Path) -> None:
    # no memory controller on the v2 hierarchy (and none on v1): the global domain only
    cg = {"a/b": _v2(str(64 * MiB))}
    assert _gauge(tmp_path / "nomem", cg=cg, v2_controllers="cpu io").room(4096)
    # the memory controller is on, but the daemon's cgroup directory is not there: no room
    assert not _gauge(tmp_path / "missing", cgroup="0::/gone\n").room(4096)


def test_limit_of_a_cgroup_namespace_root(tmp_path: Path) -> None:
    """A daemon at the root of its cgroup namespace (a container's own cgroup seen from inside
    it, /proc/self/cgroup ``0::/``) is limited by that cgroup's memory.max, which the
    namespace shows at the hierarchy's root: the gauge took the root for the real one (which
    has no memory.max) and left the limit out, so writes ran inline while the container's
    dirty pages throttled them."""
    cg = {"": _v2(str(512 * MiB))}
    assert not _gauge(tmp_path, cgroup="0::/\n", cg=cg).room(4096)
    # the real root: no memory.max of its own, the global domain only
    real = {"": {"memory.stat": _v2("max")["memory.stat"]}}
    assert _gauge(tmp_path / "real", cgroup="0::/\n", cg=real).room(4096)


def test_cgroup_v1_limit(tmp_path: Path) -> None:
    proc, sys = _tree(tmp_path, cgroup="4:memory:/a\n0::/\n")
    mem = Path(sys) / "fs" / "cgroup" / "memory"
    with open(Path(proc) / "self" / "mountinfo", "a") as f:
        f.write(f"40 23 0:30 / {mem} rw - cgroup cgroup rw,memory\n")
    for d, limit in ((mem, str((1 << 63) - 4096)), (mem / "a", str(256 * MiB))):
        d.mkdir(parents=True)
        (d / "memory.limit_in_bytes").write_text(limit + "\n")
        (d / "memory.usage_in_bytes").write_text(f"{128 * MiB}\n")
        (d / "memory.stat").write_text(
            "total_dirty 0\ntotal_writeback 0\ntotal_active_file 0\ntotal_inactive_file 0\n"
        )
    assert not DirtyGauge(DEV, proc=proc, sys=sys).room(4096)
    (mem / "a" / "memory.limit_in_bytes").write_text(str((1 << 63) - 4096))
    assert DirtyGauge(DEV, proc=proc, sys=sys).room(4096)


def test_memcg_found_again_when_the_daemon_moves(tmp_path: Path) -> None:
    cg = {"a/b": _v2("max"), "small": _v2(str(128 * MiB))}
    g = _gauge(tmp_path, cg=cg)
    assert g.room(4096)
    (Path(g.proc) / "self" / "cgroup").write_text("0::/small\n")
    g._next = 0.0  # the next reading is due
    assert not g.room(4096)


@pytest.mark.parametrize(("size", "room"), [(4096, True), (4096, False), (MiB, True), (MiB, False)])
async def test_files_write_inline_only_with_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, room: bool
) -> None:
    """A write of any size runs on the trio thread while the gauge finds room, and on a
    worker thread when it does not (before: every write of BIG_IO or more on a thread,
    every smaller one inline, throttled or not)."""
    low, up, work, mnt = make_stack(tmp_path)
    ov = overlay(low, up, work, mnt)
    threads: list[object] = []
    monkeypatch.setattr(dirty.DirtyGauge, "room", lambda self, n: room)
    run_sync = trio.to_thread.run_sync

    async def counted(*a: object, **kw: object) -> object:
        threads.append(a[0])
        return await run_sync(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    try:
        fh, _ = await ov.create(ROOT_ID, b"f", 0o100644, os.O_WRONLY, ROOT)
        data = os.urandom(size)
        for i in range(3):
            assert await ov.files.write(fh, i * size, data) == size
        assert (up / "f").read_bytes() == data * 3
        on_thread = 0 if room else 3
        assert ov.files.statistics()["writes_on_thread"] == on_thread
        assert threads.count(os.pwrite) == on_thread
        ov.release(fh)
    finally:
        ov.close()


@pytest.mark.parametrize("room", [True, False])
async def test_small_copy_up_on_a_thread_without_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, room: bool
) -> None:
    """A copy-up's data copy of up to copyup.THREAD_THRESHOLD is made inline while the page
    cache cannot throttle it, and on a worker thread when it might (before: always inline)."""
    low, up, work, mnt = make_stack(tmp_path)
    data = os.urandom(300 << 10)
    (low / "f").write_bytes(data)
    monkeypatch.setattr(dirty.DirtyGauge, "room", lambda self, n: room)
    ov = overlay(low, up, work, mnt)  # its copy-ups ask the gauge's room
    ov.copyup.fsync = False  # only the copy's own hand-off is counted
    threads: list[object] = []
    run_sync = trio.to_thread.run_sync

    async def counted(*a: object, **kw: object) -> object:
        threads.append(a[0])
        return await run_sync(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    try:
        ino = ov.lookup(ROOT_ID, b"f").id
        fh = await ov.open(ino, os.O_WRONLY, ROOT)
        ov.release(fh)
        assert (up / "f").read_bytes() == data
        assert threads == ([] if room else [ov.copyup._copy])
    finally:
        ov.close()

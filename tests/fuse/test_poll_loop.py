"""The poll loop (layerfs.fusehooks.serve_loop, the default; LAYERFS_LOOP=trio keeps pyfuse3's
own wait; LAYERFS_LOOP=raw adds the raw path, tests/fuse/test_rawpath.py): the daemon waits
for the next request in ``poll()`` when trio has nothing else to do, and must never sleep
there while trio has something to run.

Session 9's prototype did: a task taken off trio's run queue into the batch being run (a
handler whose worker thread had finished) was not seen, the reader slept in ``poll()``, and
the request that task would have answered never was (3,000 creates hung 2 runs in 3). The
workload here makes that state often: clients in parallel whose requests the daemon serves
on worker threads (big reads and writes, fsyncs, copy-ups, the listing invalidation of a
copied-up hard link), so that handlers resume in the same batch as a reader. A watchdog,
not a timing: the workload takes seconds; a stall shows as the clients not done after
minutes. The daemon's counters show which loop served.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from support.mounts import Layout, _threads, is_mounted, subject_named

from layerfs import fusehooks

pytestmark = pytest.mark.fuse

WATCHDOG = 240.0  # seconds; the workload takes 2-20 s (loaded host)
CLIENTS, ROUNDS = 4, 40
BIG = 300 << 10  # above files.BIG_IO: read and written on worker threads


def _lower(lower: Path) -> None:
    for c in range(CLIENTS):
        (lower / f"c{c}").mkdir()
        (lower / f"links{c}").mkdir()
        for r in range(ROUNDS):
            (lower / f"c{c}" / f"low{r}").write_bytes(bytes([r]) * 5000)
            a = lower / f"links{c}" / f"h{r}a"
            a.write_bytes(b"linked %d\n" % r)
            os.link(a, lower / f"links{c}" / f"h{r}b")


def _client(mnt: Path, c: int, errors: list[BaseException]) -> None:
    try:
        work = mnt / f"new{c}"
        work.mkdir()
        for r in range(ROUNDS):
            data = bytes([c, r]) * (BIG // 2)
            new = work / f"f{r}"
            fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)  # one big write: a worker thread
                os.fsync(fd)  # a worker thread
                assert os.pread(fd, BIG, 0) == data  # a worker thread
            finally:
                os.close(fd)
            with open(mnt / f"c{c}" / f"low{r}", "ab") as f:  # a copy-up, its fsync
                f.write(b"+")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(mnt / f"links{c}" / f"h{r}a", 0o600)  # copy-up of a lower hard link:
            assert f"h{r}b" in os.listdir(mnt / f"links{c}")  # its listing invalidated (thread)
            os.unlink(new)
            os.close(os.open(work / f"e{r}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except BaseException as e:  # shown by the test
        errors.append(e)


def _run_clients(mnt: Path, daemon_pid: int) -> None:
    errors: list[BaseException] = []
    clients = [
        threading.Thread(target=_client, args=(mnt, c, errors), daemon=True) for c in range(CLIENTS)
    ]
    for t in clients:
        t.start()
    deadline = time.monotonic() + WATCHDOG
    for t in clients:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in clients):
        where = _threads(daemon_pid)
        os.kill(daemon_pid, signal.SIGKILL)  # the connection aborts: the clients return
        for t in clients:
            t.join(10)
        pytest.fail(f"clients not done after {WATCHDOG}s: the daemon stalled; its threads {where}")
    assert not errors, errors
    for c in range(CLIENTS):
        names = sorted(os.listdir(mnt / f"new{c}"))
        assert names == sorted(f"e{r}" for r in range(ROUNDS))
        for r in range(ROUNDS):
            low = (mnt / f"c{c}" / f"low{r}").read_bytes()
            assert low == bytes([r]) * 5000 + b"+"


@pytest.mark.parametrize("loop", ["poll", "trio", "raw", "craw"])
def test_parallel_clients_served_through_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    if loop == "craw" and fusehooks.craw_module() is None:
        pytest.skip("layerfs._craw is not built (scripts/setup.sh builds it: Cython and gcc)")
    monkeypatch.setenv("LAYERFS_LOOP", loop)
    layout = Layout.create(tmp_path / "fs", 1)
    _lower(layout.lowers[0])
    with layout.mount(subject_named("layerfs"), options=["fsync=strict"]) as m:
        assert m.proc is not None
        _run_clients(m.mnt, m.proc.pid)
        stats = json.loads(os.getxattr(m.mnt, "trusted.layerfs.statistics"))
    if loop == "trio":
        assert "loop_poll" not in stats and "loop_trio" not in stats, stats
    else:  # most requests found by the poll; some waited for through trio
        assert stats.get("loop_poll", 0) > CLIENTS * ROUNDS, stats
        assert stats.get("loop_trio", 0) > 0, stats
    # raw: lookups and getattrs answered by the wait itself while other handlers awaited
    assert (stats.get("loop_raw", 0) > CLIENTS * ROUNDS) == (loop in ("raw", "craw")), stats


@pytest.mark.parametrize("loop", ["poll", "craw"])
def test_sigterm_ends_an_idle_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """A daemon asleep in the poll (no request, no timer) still unmounts on SIGTERM: the
    signal reaches trio through its wake-up fd, which the poll watches (craw: the poll
    made in C, RawPath.serve, interrupted: EINTR)."""
    if loop == "craw" and fusehooks.craw_module() is None:
        pytest.skip("layerfs._craw is not built (scripts/setup.sh builds it: Cython and gcc)")
    monkeypatch.setenv("LAYERFS_LOOP", loop)
    layout = Layout.create(tmp_path / "fs", 1)
    (layout.lowers[0] / "f").write_text("lower\n")
    with layout.mount(subject_named("layerfs")) as m:
        assert m.proc is not None
        assert (m.mnt / "f").read_text() == "lower\n"
        stats = json.loads(os.getxattr(m.mnt, "trusted.layerfs.statistics"))
        assert stats.get("loop_poll", 0) > 0, stats
        time.sleep(0.5)  # asleep in poll()
        m.proc.send_signal(signal.SIGTERM)
        m.proc.wait(timeout=30)
        assert m.proc.returncode == 0
        assert not is_mounted(m.mnt)

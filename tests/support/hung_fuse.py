"""A pytest plugin: a test stuck on a FUSE request that no daemon answers fails by its timeout.

pytest-timeout's signal method raises in the test when SIGALRM arrives, but a thread waiting for
a FUSE reply sleeps in the kernel (``request_wait_answer``) where only a fatal signal wakes it:
the alarm stays pending and the run hangs until CI's limit, naming nothing. So a watchdog started
with each test waits for the test's timeout plus a grace (``LAYERFS_TEST_ABORT_GRACE``, 20 s),
then checks every second: while a thread of this process waits there, it aborts (fusectl's
``abort``) the FUSE connections this run made since the test began: the request fails, the
pending alarm is delivered, and pytest-timeout reports the test by name while the run goes on.
A connection is this run's when its mount point (in this process's mount table, or in that of
a process it started: a rootless mount's namespace) is under the run's temporary directory
(pytest's basetemp, where ``tmp_path`` is): another run on the host (another checkout's gate, a
benchmark) mounts in its own, and a mount it made meanwhile is new too (before: aborted with
ours). Connections older than the test are left alone, and so is everything while no thread of
this process waits on FUSE. A test stuck on a mount outside ``tmp_path`` is not helped.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs import mountinfo

CONNECTIONS = Path("/sys/fs/fuse/connections")
_roots: list[bytes] = []  # this run's temporary directory (pytest_runtest_protocol)


@functools.cache
def _mount_fusectl() -> None:
    """Mount fusectl where it is not (CI's fresh machine has no systemd to do it): tried once a
    run, not at every test's start."""
    if not os.path.ismount(CONNECTIONS):
        with contextlib.suppress(OSError):
            subprocess.run(["mount", "-t", "fusectl", "fusectl", CONNECTIONS], capture_output=True)


def connections() -> set[int]:
    """The ids of the live FUSE connections (a FUSE mount's st_dev minor); empty when they
    cannot be read."""
    _mount_fusectl()
    try:
        return {int(n) for n in os.listdir(CONNECTIONS) if n.isdigit()}
    except OSError:
        return set()


def waiting_on_fuse(pid: int) -> bool:
    """Whether a thread of PID sleeps waiting for a FUSE daemon's reply."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/task/{tid}/wchan").read_text() == "request_wait_answer":
                return True
    return False


def _descendants(pid: int) -> list[int]:
    """PID and the processes it started, and theirs (/proc/PID/task/TID/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    todo += map(int, Path(f"/proc/{p}/task/{tid}/children").read_text().split())
    return found


def owned(pid: int, roots: list[bytes]) -> set[int]:
    """The FUSE connections mounted under ROOTS, in the mount tables of PID and of the
    processes it started (a user namespace's mounts are in its own table)."""
    seen, conns = set(), set()
    for p in _descendants(pid):
        try:
            ns = os.stat(f"/proc/{p}/ns/mnt").st_ino
            if ns in seen:
                continue
            seen.add(ns)
            table = list(mountinfo.mounts(f"/proc/{p}/mountinfo"))
        except OSError:
            continue
        for m in table:
            major, _, minor = m.dev.partition(b":")
            under = any(m.point == r or m.point.startswith(r + b"/") for r in roots)
            if m.fstype.startswith(b"fuse") and major == b"0" and minor.isdigit() and under:
                conns.add(int(minor))
    return conns


def abort_new(before: set[int], pid: int, roots: list[bytes] | None = None) -> list[int]:
    """Abort the connections not in BEFORE mounted under ROOTS (default: this run's
    temporary directory), if PID waits on FUSE; the ids aborted."""
    if not waiting_on_fuse(pid):
        return []
    aborted = []
    for conn in sorted((connections() - before) & owned(pid, _roots if roots is None else roots)):
        with contextlib.suppress(OSError):
            (CONNECTIONS / str(conn) / "abort").write_text("1")
            aborted.append(conn)
    return aborted


def _limit(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    option = item.config.getoption("timeout", None)
    if option is not None:
        return float(option)
    return float(item.config.getini("timeout") or 0)


class _Watchdog(threading.Thread):
    """Past DEADLINE, checks every second until stopped: a test may enter its wait late."""

    def __init__(self, item: pytest.Item, deadline: float) -> None:
        super().__init__(daemon=True)
        self.item, self.deadline = item, deadline
        self.before, self.pid = connections(), os.getpid()
        self.done = threading.Event()

    def run(self) -> None:
        wait = self.deadline
        while not self.done.wait(wait):
            aborted = abort_new(self.before, self.pid)
            if aborted:
                print(
                    f"\nhung_fuse: {self.item.nodeid} waited on FUSE past its timeout: aborted "
                    f"connections {aborted}",
                    file=sys.stderr,
                )
            wait = 1.0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    limit = _limit(item)
    if limit <= 0:
        yield
        return
    grace = float(os.environ.get("LAYERFS_TEST_ABORT_GRACE", "20"))
    if not _roots:
        base = item.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
        _roots.append(os.fsencode(os.path.realpath(base)))
    watchdog = _Watchdog(item, limit + grace)
    watchdog.start()
    try:
        yield
    finally:
        watchdog.done.set()

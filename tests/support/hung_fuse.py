"""A pytest plugin: a test stuck on a FUSE request that no daemon answers fails by its timeout.

pytest-timeout's signal method raises in the test when SIGALRM arrives, but a thread waiting for
a FUSE reply sleeps in the kernel (``request_wait_answer``) where only a fatal signal wakes it:
the alarm stays pending and the run hangs until CI's limit, naming nothing. So a watchdog started
with each test waits for the test's timeout plus a grace (``LAYERFS_TEST_ABORT_GRACE``, 20 s),
then checks every second: while a thread of this process waits there, it aborts (fusectl's
``abort``) the FUSE connections made since the test began: the request fails, the pending
alarm is delivered, and pytest-timeout reports the test by name while the run goes on.
Connections older than the test are left alone (another test's or another run's mounts), and
so is everything while no thread of this process waits on FUSE.
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

CONNECTIONS = Path("/sys/fs/fuse/connections")


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


def abort_new(before: set[int], pid: int) -> list[int]:
    """Abort the connections not in BEFORE, if PID waits on FUSE; the ids aborted."""
    if not waiting_on_fuse(pid):
        return []
    aborted = []
    for conn in sorted(connections() - before):
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
    watchdog = _Watchdog(item, limit + grace)
    watchdog.start()
    try:
        yield
    finally:
        watchdog.done.set()

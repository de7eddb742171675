"""Host-backed free memory for a benchmark run, on a VM that gives its free pages back.

Under virtio_balloon free page reporting the guest tells the host which free pages it may
take back, and the host drops them; the next touch of such a page is a fault into the host
(~16 us a 4 KiB page here), paid by whichever process touches it first: a 1 GiB write into the
page cache costs 4 s of CPU on reported pages against 0.24 s on backed ones. Every row that
allocates memory (writes, creates, untar, copy-ups, mounts) would measure the host's
reclaim, differently for each target depending on when it ran.

This machine's kernel reports a free page only once it has stayed free for ``min_free_ms``
(``/sys/module/page_reporting/parameters/``; 0, at once, is its boot value). For a run,
:func:`warm_host_memory` raises it to the largest value the kernel accepts and touches a
bounded amount of anonymous memory then frees it, so that the page allocator hands out
host-backed pages (a freed page goes to the front of its free list);
:meth:`HostMemory.refresh` touches it again when half of ``min_free_ms`` has passed, before
the pages would be reported. The value found is restored when the last run that
changed it ends: runs share the knob through a state file under a lock (``STATE``), so two
overlapping runs neither restore each other's value nor leave theirs behind, and a run that
died without restoring is repaired by the next one."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.model import GiB
from benchmarks.system import pid_alive

KNOB = Path("/sys/module/page_reporting/parameters/min_free_ms")
STATE = Path("/run/layerfs-bench-hostmem.json")
WANT_MS = 300_000  # the largest this kernel takes (600000: EINVAL); lower ones are probed
MIN_MS = 1_000  # probe no lower: a pre-touch would go cold before a scenario ended
PRETOUCH_MAX = 4 * GiB  # a full run's seq write through FUSE: 2 GiB of page cache at once
MIN_REFRESH_S = 30.0  # re-touch no more often than this, whatever min_free_ms is
MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault every page in, writable (zeroed: host-backed)
PAGE = mmap.PAGESIZE


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _meminfo(name: str) -> int:
    """A /proc/meminfo field, bytes (0 if absent)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def pretouch_size() -> int:
    """What a pre-touch allocates: PRETOUCH_MAX or half of MemAvailable if less, so that it
    neither pushes out much page cache nor risks the OOM killer."""
    return min(PRETOUCH_MAX, _meminfo("MemAvailable") // 2) // PAGE * PAGE


def pretouch(nbytes: int) -> None:
    """Fault NBYTES of anonymous memory in (each page written, so backed by the host), then
    free it: the page allocator's free lists start with those pages."""
    if nbytes <= 0:
        return
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        try:
            m.madvise(MADV_POPULATE_WRITE)
        except OSError:  # before Linux 5.14
            for off in range(0, nbytes, PAGE):
                m[off] = 1
    finally:
        m.close()


@dataclass
class HostMemory:
    """What a run did about the host's reclaim, for the results JSON and the table's header."""

    state: str  # "warm", "off" (--cold-host-memory), "absent" or "read-only"
    knob: str = str(KNOB)
    before_ms: int | None = None  # the value found (restored at the end)
    during_ms: int | None = None  # the value the run ran under
    pretouch_bytes: int = 0
    # (at, seconds, CPU seconds) of each pre-touch, at: from t0
    touches: list[tuple[float, float, float]] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)
    reported_kib0: int | None = None
    reported_kib1: int | None = None

    def touch(self) -> float:
        """Pre-touch now; returns the seconds it took."""
        t, cpu = time.monotonic(), time.process_time()
        pretouch(self.pretouch_bytes)
        took = time.monotonic() - t
        self.touches.append(
            (round(t - self.t0, 1), round(took, 2), round(time.process_time() - cpu, 2))
        )
        return took

    def due(self) -> bool:
        if self.state != "warm" or not self.touches or not self.during_ms:
            return False
        at, took, _cpu = self.touches[-1]
        last = self.t0 + at + took
        return time.monotonic() - last > max(MIN_REFRESH_S, self.during_ms / 2000)

    def refresh(self) -> float | None:
        """Touch again if the last touch's pages are half-way to being reported; returns the
        seconds it took, or None if it was not due."""
        return self.touch() if self.due() else None

    def to_json(self) -> dict[str, object]:
        self.reported_kib1 = _read_int(self.reported_path())
        out: dict[str, object] = {"state": self.state, "knob": self.knob}
        if self.before_ms is not None:
            out["min_free_ms_before"] = self.before_ms
        if self.during_ms is not None:
            out["min_free_ms_during"] = self.during_ms
        if self.state == "warm":
            out["pretouch_bytes"] = self.pretouch_bytes
            out["pretouches"] = [
                {"at_s": at, "seconds": s, "cpu_seconds": c} for at, s, c in self.touches
            ]
        if self.reported_kib0 is not None and self.reported_kib1 is not None:
            out["reported_to_host_mib"] = (self.reported_kib1 - self.reported_kib0) // 1024
        return out

    def reported_path(self) -> Path:
        return Path(self.knob).with_name("reported_kib")


def describe(info: object) -> str:
    """One line for the table's header from the JSON's ``host_memory``."""
    if not isinstance(info, dict):
        return "host memory: not recorded (a run from before the harness warmed it)"
    state = info.get("state")
    before, during = info.get("min_free_ms_before"), info.get("min_free_ms_during")
    reported = info.get("reported_to_host_mib")
    tail = f"; {reported} MiB reported to the host during the run" if reported is not None else ""
    if state == "absent":
        return f"host memory: no free page reporting knob ({info.get('knob')}): left alone"
    if state == "off":
        return (
            f"host memory: left cold (--cold-host-memory), min_free_ms {before}: a page freed "
            f"is reported to the host after that long, its next touch faults into the host" + tail
        )
    if state == "read-only":
        return f"host memory: min_free_ms {before}, not writable here: left alone" + tail
    touches = info.get("pretouches") or []
    assert isinstance(touches, list)
    spent = sum(float(t["seconds"]) for t in touches)
    cpu = sum(float(t.get("cpu_seconds", 0)) for t in touches)
    size = int(str(info.get("pretouch_bytes", 0))) / GiB
    return (
        f"host memory: warm: min_free_ms {during} for the run (was {before}, restored after); "
        f"{size:.1f} GiB pre-touched {len(touches)} time(s), {spent:.1f} s ({cpu:.1f} s CPU) "
        f"in all" + tail
    )


@contextlib.contextmanager
def _shared(state: Path) -> Iterator[dict[str, object]]:
    """The state file's content under an exclusive lock, written back after the block."""
    fd = os.open(state, os.O_RDWR | os.O_CREAT, 0o600)
    # Ctrl-C or SIGTERM held off until the knob and the file agree again.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = os.read(fd, 1 << 16)
        try:
            data = json.loads(raw) if raw.strip() else {}
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        yield data
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(data).encode(), 0)
    finally:
        os.close(fd)  # releases the lock
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _live_users(data: dict[str, object]) -> dict[str, int]:
    users = data.get("users")
    if not isinstance(users, dict):
        return {}
    return {tok: pid for tok, pid in users.items() if isinstance(pid, int) and pid_alive(pid)}


def _set_largest(knob: Path, want: int, floor: int) -> int | None:
    """Write WANT to KNOB, or the largest of WANT/2, WANT/4... the kernel accepts (not below
    FLOOR); returns the value written, or None if none was."""
    ms = want
    while ms >= max(floor, 1):
        try:
            knob.write_text(f"{ms}\n")
            return ms
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        ms //= 2
    return None


@contextlib.contextmanager
def warm_host_memory(
    enabled: bool = True,
    *,
    knob: Path = KNOB,
    state: Path = STATE,
    want_ms: int = WANT_MS,
    pretouch_bytes: int | None = None,
) -> Iterator[HostMemory]:
    """For the block's life: KNOB (min_free_ms) at the largest value it takes up to WANT_MS,
    never lowered, and PRETOUCH_BYTES (default :func:`pretouch_size`) touched once; then the
    value found put back, on error and Ctrl-C too, once no other run holds it."""
    hm = HostMemory("warm", str(knob))
    hm.reported_kib0 = _read_int(hm.reported_path())
    if not knob.exists():
        hm.state = "absent"
        yield hm
        return
    hm.before_ms = _read_int(knob)
    if not enabled:
        hm.state = "off"
        yield hm
        return
    if hm.before_ms is None or not os.access(knob, os.W_OK):
        hm.state = "read-only"
        yield hm
        return
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with _shared(state) as data:
            users = _live_users(data)
            saved = data.get("saved")
            if data.get("users") and isinstance(saved, int):
                # Another run holds it (or died holding it): the value to restore is the one
                # that run found, not the one it set.
                hm.before_ms = saved
            else:
                saved = hm.before_ms
            current = _read_int(knob) or 0
            during = current if current >= want_ms else _set_largest(knob, want_ms, MIN_MS)
            hm.during_ms = max(current, during or 0)
            if during is not None and during < current:
                knob.write_text(f"{current}\n")  # the probe went below what was there
            users[token] = os.getpid()
            data.update(users=users, saved=saved)
    except PermissionError:
        hm.state = "read-only"
        yield hm
        return
    try:
        hm.pretouch_bytes = pretouch_size() if pretouch_bytes is None else pretouch_bytes
        hm.touch()
        yield hm
    finally:
        with _shared(state) as data:
            users = _live_users(data)
            users.pop(token, None)
            saved = data.get("saved")
            if not users:
                if isinstance(saved, int):
                    knob.write_text(f"{saved}\n")
                data.pop("saved", None)
            data["users"] = users

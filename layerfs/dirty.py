"""May a buffered write to the upper be throttled now? The page cache's dirty-page limits.

A buffered write waits in the kernel (``balance_dirty_pages``) only when the dirty pages of its
writeback domain are above the domain's "freerun" ceiling, the midpoint of the background and
the hard dirty thresholds (mm/page-writeback.c, ``dirty_freerun_ceiling``): below it the writer
runs free. The domains: the whole machine (/proc/vmstat's ``nr_dirty + nr_writeback`` against
``nr_dirty_threshold`` and ``nr_dirty_background_threshold``); with the memory controller on the
cgroup v2 hierarchy, also the writer's memory cgroup (its ``file_dirty + file_writeback``
against the same ratios of ``file`` pages plus the headroom under ``memory.max`` and
``memory.high`` of it and every ancestor it can see: a cgroup namespace hides those above its
root, whose own limits it shows at the hierarchy's root). On cgroup v1 the kernel has no
memcg domain, but a cgroup at its ``memory.limit_in_bytes`` reclaims by waiting for
writeback: the same rule is applied to its counters, a bound on the safe side. A backing
device with ``strict_limit`` (every FUSE filesystem's, or one an administrator set; a
partition's is its disk's) throttles on its own share, which no file shows: writes to it
never count as free.

``DirtyGauge.room(n)`` says whether N more bytes can be written without being throttled. It
reads the counters at most every ``INTERVAL`` seconds, and in between counts this daemon's own
writes against half the room it found (the other half is for everyone else's writes until the
next reading). Any file it cannot read or parse makes it say no: a write then goes to a
worker thread as before (layerfs.files; docs/concurrency.md).

Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import os
import time

INTERVAL = 0.1  # seconds between two readings of the counters
# Room below which nothing counts as free (bytes): the other writers between two readings
MIN_ROOM = 128 << 20
_BIG = 1 << 60  # a cgroup limit at least this large is no limit ("max", v1's huge number)
_VMSTAT = (
    b"nr_dirty_threshold",
    b"nr_dirty_background_threshold",
    b"nr_dirty",
    b"nr_writeback",
    b"nr_free_pages",
    b"nr_active_file",
    b"nr_inactive_file",
)


class DirtyGauge:
    """The room below the freerun ceilings for writes to the filesystem of device DEV (its
    ``st_dev``). PROC and SYS: where /proc and /sys are (tests give other trees)."""

    def __init__(self, dev: int, *, proc: str = "/proc", sys: str = "/sys") -> None:
        self.proc, self.sys = proc, sys
        self.strict = f"{_bdi(sys, dev)}/strict_limit"
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.readings = 0
        self._budget = 0  # bytes this daemon may still write before the next reading
        self._found = False  # the last reading found room
        self._next = 0.0  # time.monotonic() of the next reading
        self._cgroup = b""  # /proc/self/cgroup when _memcg was found
        self._memcg: _Memcg | None = None

    def room(self, n: int) -> bool:
        """True if N bytes may be written now without being throttled (and count them)."""
        now = time.monotonic()
        # before the next reading is due only when our own writes spent the room found:
        # where none was found, reading again at each write cost ~75 us of the loop's CPU
        if now >= self._next or (n > self._budget and self._found):
            self._budget = self._read()
            self._found = self._budget > 0
            self._next = now + INTERVAL
            self.readings += 1
        if n > self._budget:
            return False
        self._budget -= n
        return True

    def _read(self) -> int:
        try:
            room = self._room()
        except (OSError, ValueError, KeyError):
            return 0  # not known: not free
        return room // 2 if room >= MIN_ROOM else 0

    def _room(self) -> int:
        try:
            if _read(self.strict).strip() != b"0":
                return 0
        except FileNotFoundError:
            pass  # no backing device of that name (btrfs, tmpfs): no strict limit known
        thresh, bg, dirty, writeback, free, active, inactive = _fields(
            _read(f"{self.proc}/vmstat"), _VMSTAT
        )
        room = ((thresh + bg) // 2 - dirty - writeback) * self.page
        cgroup = _read(f"{self.proc}/self/cgroup")
        if cgroup != self._cgroup:  # the first reading, or the daemon was moved
            self._memcg, self._cgroup = _Memcg.find(cgroup, self.proc, self.sys), cgroup
        if self._memcg is not None:
            dirtyable = free + active + inactive
            share = (thresh + bg) / 2 / max(1, dirtyable)
            room = min(room, self._memcg.room(share, self.page * dirtyable))
        return room


class _Memcg:
    """The daemon's memory cgroup: where its counters and its and its ancestors' limits are."""

    def __init__(self, v2: bool, stat: str, limits: list[tuple[list[str], str]]) -> None:
        self.v2, self.stat, self.limits = v2, stat, limits

    @classmethod
    def find(cls, cgroup: bytes, proc: str, sys: str) -> _Memcg | None:
        """From /proc/self/cgroup's CGROUP; None without a memory controller. One whose
        directory is not found gives a _Memcg that cannot be read (no room at every
        reading)."""
        lines = [line.split(b":", 2) for line in cgroup.splitlines()]
        for _, controllers, path in lines:
            if b"memory" in controllers.split(b","):  # cgroup v1
                root = _mount_of(proc, b"cgroup", b"memory") or f"{sys}/fs/cgroup/memory"
                chain = _chain(root, path)
                limits = [
                    ([f"{cg}/memory.limit_in_bytes"], f"{cg}/memory.usage_in_bytes")
                    for cg in chain
                    if os.path.exists(f"{cg}/memory.limit_in_bytes")
                ]
                if not os.path.isdir(chain[0]):
                    return cls(False, "", [])  # not found: unknown
                return cls(False, f"{chain[0]}/memory.stat", limits)
        for _, controllers, path in lines:
            if controllers == b"":  # cgroup v2
                root = _mount_of(proc, b"cgroup2", None) or f"{sys}/fs/cgroup"
                try:
                    if b"memory" not in _read(f"{root}/cgroup.controllers").split():
                        return None
                except OSError:
                    pass  # cannot tell: look for the files
                # the real root has no memory.max; a cgroup namespace's root (a container's
                # own cgroup, seen from inside) has its own
                chain = _chain(root, path)
                with_memory = [cg for cg in chain if os.path.exists(f"{cg}/memory.max")]
                limits = [
                    ([f"{cg}/memory.max", f"{cg}/memory.high"], f"{cg}/memory.current")
                    for cg in with_memory
                ]
                if chain and not os.path.isdir(chain[0]):
                    return cls(True, "", [])  # not found: unknown
                if not limits:
                    return None  # not enabled below the root: the root's, no limit
                return cls(True, f"{with_memory[0]}/memory.stat", limits)
        return None

    def room(self, share: float, dirtyable: int) -> int:
        """Bytes below the memcg domain's freerun ceiling (mem_cgroup_wb_stats): the dirty
        and writeback bytes of the cgroup against SHARE (the global ceiling's part of the
        global dirtyable memory) of its file pages plus its headroom, the least room under
        the limits of it and its ancestors (at most DIRTYABLE, the global dirtyable bytes)."""
        if not self.stat:
            raise OSError("the memory cgroup's files were not found")
        headroom = _BIG
        for ceilings, usage in self.limits:
            ceiling = min(_limit(f) for f in ceilings)
            if ceiling < _BIG:
                headroom = min(headroom, max(0, ceiling - int(_read(usage))))
        if headroom >= _BIG:
            return _BIG  # no limit anywhere: the global domain decides
        names = (
            (b"file_dirty", b"file_writeback", b"active_file", b"inactive_file")
            if self.v2
            else (b"total_dirty", b"total_writeback", b"total_active_file", b"total_inactive_file")
        )
        dirty, writeback, active, inactive = _fields(_read(self.stat), names)
        avail = active + inactive + min(headroom, dirtyable)
        return int(avail * share) - dirty - writeback


def _bdi(sys: str, dev: int) -> str:
    """The sysfs directory of the backing device that throttles writes to the filesystem on
    DEV: a partition's is its disk's (the block layer's bdi is the disk's), a FUSE block
    filesystem's is named ``DEV-fuseblk``; else the one named DEV (a disk, a device mapper's,
    FUSE's anonymous devices), or a name that does not exist (no strict limit known)."""
    mm = f"{os.major(dev)}:{os.minor(dev)}"
    if os.path.exists(f"{sys}/class/bdi/{mm}-fuseblk"):
        return f"{sys}/class/bdi/{mm}-fuseblk"
    block = f"{sys}/dev/block/{mm}"
    if os.path.exists(f"{block}/partition"):
        try:
            mm = os.fsdecode(_read(f"{block}/../dev").strip())
        except OSError:
            pass
    return f"{sys}/class/bdi/{mm}"


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 16384)
    finally:
        os.close(fd)


def _fields(text: bytes, names: tuple[bytes, ...]) -> list[int]:
    """The values of NAMES in TEXT, lines of ``name value``; KeyError for one not there."""
    text = b"\n" + text
    out = []
    for name in names:
        at = text.find(b"\n" + name + b" ")
        if at < 0:
            raise KeyError(name)
        start = at + len(name) + 2
        end = text.find(b"\n", start)
        out.append(int(text[start : end if end >= 0 else len(text)]))
    return out


def _limit(path: str) -> int:
    value = _read(path).strip()
    return _BIG if value == b"max" else min(_BIG, int(value))


def _chain(root: str, path: bytes) -> list[str]:
    """The cgroup directories from PATH (under the hierarchy mounted at ROOT) up to ROOT."""
    parts = [p for p in os.fsdecode(path).split("/") if p]
    return ["/".join([root, *parts[:i]]) for i in range(len(parts), -1, -1)]


def _mount_of(proc: str, fstype: bytes, option: bytes | None) -> str | None:
    try:
        with open(f"{proc}/self/mountinfo", "rb") as fh:
            for line in fh:
                head, _, tail = line.partition(b" - ")
                rest = tail.split()
                if len(rest) < 3 or rest[0] != fstype:
                    continue
                if option is None or option in rest[2].split(b","):
                    return os.fsdecode(head.split()[4])
    except OSError:
        pass
    return None

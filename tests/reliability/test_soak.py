"""Load: parallel workers with a mixed workload against one mount, under a watchdog.

LAYERFS_SOAK_SECONDS (default 20) sets the duration, LAYERFS_SOAK_WORKERS the number of workers
(default 4, or 8 for runs of 5 minutes and more). Workers read, append to shared lower files
(racing copy-ups), create, rename (within and across directories), truncate, chmod, delete
(their own files and lower files), mkdir/rmdir and list directories; each checks its own files
against its model. Every request must finish within WATCHDOG seconds (else the connection is
aborted and the test fails: a deadlock). The daemon's open fds and RSS must not grow beyond
generous bounds, no appended record may be lost, and kernel overlayfs mounted on the upper
afterwards must show exactly the tree layerfs showed.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from support.mounts import mount_kernel
from support.snapshot import compare, snapshot

from ._helpers import fd_count, fd_targets, layerfs_daemon, needs_root, rss_kib

pytestmark = [pytest.mark.fuse, pytest.mark.kernel_overlay, pytest.mark.slow, needs_root]

SECONDS = float(os.environ.get("LAYERFS_SOAK_SECONDS", "20"))
WORKERS = int(os.environ.get("LAYERFS_SOAK_WORKERS", "8" if SECONDS >= 300 else "4"))
WATCHDOG = 60.0
SHARED = 24
VICTIMS = 200
REC = 32  # bytes per record appended to a shared file
# Errors the workload provokes on purpose: races on shared names between workers.
EXPECTED = {errno.ENOENT}


def record(worker: int, seq: int) -> bytes:
    rec = (b"<w%03d seq%010d>" % (worker, seq)).ljust(REC - 1, b".") + b"\n"
    assert len(rec) == REC
    return rec


class Worker(threading.Thread):
    def __init__(self, i: int, mnt: Path, stop: threading.Event, seed: int) -> None:
        super().__init__(name=f"soak-{i}", daemon=True)
        self.i, self.mnt, self.stop = i, mnt, stop
        self.rnd = random.Random(seed)
        self.home = mnt / f"w{i}"
        self.files: dict[str, bytes] = {}  # own files, relative to home
        self.dirs: set[str] = {""}
        self.appends: Counter[str] = Counter()  # shared file -> records appended
        self.seq = 0
        self.ops: Counter[str] = Counter()
        self.expected_errors: Counter[str] = Counter()
        self.problems: list[str] = []
        self.busy_since: float | None = None
        self.current = ""

    def run(self) -> None:
        try:
            self.home.mkdir()
            while not self.stop.is_set() and len(self.problems) < 5:
                op = self.rnd.choices(list(OPS), [w for w, _ in OPS.values()])[0]
                self.current = op
                self.busy_since = time.monotonic()
                try:
                    OPS[op][1](self)
                    self.ops[op] += 1
                except OSError as e:
                    if e.errno in EXPECTED:
                        self.expected_errors[f"{op}:{errno.errorcode[e.errno]}"] += 1
                    else:
                        self.problems.append(f"{op}: {e!r}")
                finally:
                    self.busy_since = None
        except Exception as e:  # report, never hang the test
            self.problems.append(f"worker crashed: {e!r}")

    # -- operations -------------------------------------------------------------------------

    def own_path(self) -> str:
        d = self.rnd.choice(sorted(self.dirs))
        return f"{d}/f{self.rnd.randrange(30)}".lstrip("/")

    def read_shared(self) -> None:
        with open(self.mnt / "shared" / f"s{self.rnd.randrange(SHARED)}", "rb") as fh:
            fh.read()

    def append_shared(self) -> None:
        name = f"s{self.rnd.randrange(SHARED)}"
        self.seq += 1
        with open(self.mnt / "shared" / name, "ab") as fh:
            fh.write(record(self.i, self.seq))
        self.appends[name] += 1

    def chmod_shared(self) -> None:
        os.chmod(
            self.mnt / "shared" / f"s{self.rnd.randrange(SHARED)}", self.rnd.choice([0o644, 0o664])
        )

    def create(self) -> None:
        rel = self.own_path()
        if rel in self.dirs:
            return
        data = self.rnd.randbytes(self.rnd.choice([0, 10, 4096, 100_000]))
        with open(self.home / rel, "wb") as fh:
            fh.write(data)
            if self.rnd.random() < 0.2:
                fh.flush()
                os.fsync(fh.fileno())
        self.files[rel] = data

    def verify(self) -> None:
        if not self.files:
            return
        rel = self.rnd.choice(sorted(self.files))
        got = (self.home / rel).read_bytes()
        if got != self.files[rel]:
            self.problems.append(f"{rel}: content {len(got)} bytes, model {len(self.files[rel])}")

    def rename_own(self) -> None:
        if not self.files:
            return
        src = self.rnd.choice(sorted(self.files))
        dst = self.own_path()
        if dst in self.dirs or dst == src:
            return
        os.rename(self.home / src, self.home / dst)
        self.files[dst] = self.files.pop(src)

    def rename_across(self) -> None:
        """Out to the shared directory and back, under a worker-private name."""
        if not self.files:
            return
        src = self.rnd.choice(sorted(self.files))
        tmp = self.mnt / "shared" / f"moving-{self.i}"
        os.rename(self.home / src, tmp)
        os.rename(tmp, self.home / src)

    def truncate_own(self) -> None:
        if not self.files:
            return
        rel = self.rnd.choice(sorted(self.files))
        n = self.rnd.randrange(len(self.files[rel]) + 1)
        os.truncate(self.home / rel, n)
        self.files[rel] = self.files[rel][:n]

    def unlink_own(self) -> None:
        if not self.files:
            return
        rel = self.rnd.choice(sorted(self.files))
        os.unlink(self.home / rel)
        del self.files[rel]

    def unlink_victim(self) -> None:
        os.unlink(self.mnt / "victims" / f"v{self.rnd.randrange(VICTIMS)}")

    def mkdir(self) -> None:
        rel = f"{self.rnd.choice(sorted(self.dirs))}/d{self.rnd.randrange(4)}".lstrip("/")
        if rel in self.dirs or rel in self.files or rel.count("/") > 3:
            return
        os.mkdir(self.home / rel)
        self.dirs.add(rel)

    def rmdir(self) -> None:
        empty = [
            d
            for d in self.dirs
            if d and not any(x.startswith(d + "/") for x in [*self.files, *self.dirs])
        ]
        if empty:
            rel = self.rnd.choice(sorted(empty))
            os.rmdir(self.home / rel)
            self.dirs.remove(rel)

    def readdir(self) -> None:
        where = self.rnd.choice(
            [self.mnt / "shared", self.mnt / "victims", self.home, self.mnt / "tree"]
        )
        for e in os.scandir(where):
            e.stat(follow_symlinks=False)

    def walk(self) -> None:
        for _ in os.walk(self.mnt / "tree"):
            pass


OPS = {
    "read_shared": (12, Worker.read_shared),
    "append_shared": (12, Worker.append_shared),
    "chmod_shared": (3, Worker.chmod_shared),
    "create": (14, Worker.create),
    "verify": (10, Worker.verify),
    "rename_own": (8, Worker.rename_own),
    "rename_across": (4, Worker.rename_across),
    "truncate_own": (4, Worker.truncate_own),
    "unlink_own": (6, Worker.unlink_own),
    "unlink_victim": (3, Worker.unlink_victim),
    "mkdir": (3, Worker.mkdir),
    "rmdir": (3, Worker.rmdir),
    "readdir": (6, Worker.readdir),
    "walk": (1, Worker.walk),
}


def _make_lower(lower: Path, rnd: random.Random) -> dict[str, bytes]:
    shared: dict[str, bytes] = {}
    (lower / "shared").mkdir(parents=True)
    for i in range(SHARED):
        data = rnd.randbytes(rnd.choice([0, 1000, 200_000, 3 << 20]))
        (lower / "shared" / f"s{i}").write_bytes(data)
        shared[f"s{i}"] = data
    (lower / "victims").mkdir()
    for i in range(VICTIMS):
        (lower / "victims" / f"v{i}").write_bytes(b"v")
    for a in range(5):
        for b in range(5):
            d = lower / "tree" / f"a{a}" / f"b{b}"
            d.mkdir(parents=True)
            for c in range(8):
                (d / f"c{c}").write_bytes(b"c" * c)
    return shared


def _abort_connection(dev: int) -> None:
    try:
        with open(f"/sys/fs/fuse/connections/{os.minor(dev)}/abort", "w") as fh:
            fh.write("1")
    except OSError:
        pass


def _deleted_held(pid: int) -> bool:
    return any(t.endswith("(deleted)") for t in fd_targets(pid))


def test_soak(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    lower, upper, work, mnt, kmnt = (
        tmp_path / n for n in ("lower", "upper", "work", "merged", "kmerged")
    )
    for p in (upper, work, mnt, kmnt):
        p.mkdir()
    shared = _make_lower(lower, rnd)
    stop = threading.Event()
    workers = [Worker(i, mnt, stop, rnd.randrange(1 << 30)) for i in range(WORKERS)]
    hung: list[str] = []
    with layerfs_daemon([lower], upper, work, mnt) as d:
        dev = os.stat(mnt).st_dev
        for w in workers:
            w.start()
        time.sleep(min(2.0, SECONDS / 5))  # warm the caches before taking the baseline
        fds0, rss0 = fd_count(d.pid), rss_kib(d.pid)
        deadline = time.monotonic() + SECONDS
        samples = []
        while time.monotonic() < deadline and not hung:
            time.sleep(0.5)
            now = time.monotonic()
            for w in workers:
                since = w.busy_since
                if since is not None and now - since > WATCHDOG:
                    hung.append(f"{w.name}: {w.current} running for {now - since:.0f}s")
            if not d.alive():
                break
            samples.append((fd_count(d.pid), rss_kib(d.pid)))
        stop.set()
        if hung:
            _abort_connection(dev)  # unblock the stuck threads so the test can end
        for w in workers:
            w.join(timeout=WATCHDOG)
        assert not hung, f"requests stuck (deadlock?) (seed {seed}):\n" + "\n".join(hung)
        assert d.alive(), f"the daemon died (seed {seed}):\n{d.log_text()[-3000:]}"
        assert not any(w.is_alive() for w in workers), "a worker did not stop"
        time.sleep(1.0)  # let the kernel send the last releases and forgets
        # ... and wait for the forgets of unlinked files, however slow a loaded host: a held
        # one never goes (the daemon closes a node's descriptor at its FORGET)
        deadline = time.monotonic() + WATCHDOG
        while _deleted_held(d.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        fds1, rss1 = fd_count(d.pid), rss_kib(d.pid)
        held = Counter(
            "deleted" if t.endswith("(deleted)") else t.split(":")[0] if ":" in t else "path"
            for t in fd_targets(d.pid)
        )
        n_dirs = sum(1 for layer in (lower, upper) for _ in os.walk(layer))
        total = Counter[str]()
        for w in workers:
            total.update(w.ops)
        max_fds = max(f for f, _ in samples) if samples else fds1
        max_rss = max(r for _, r in samples) if samples else rss1
        print(
            f"soak {SECONDS:.0f}s x {WORKERS} workers (seed {seed}): {sum(total.values())} ops "
            f"{dict(total)}; expected errors "
            f"{sum(sum(w.expected_errors.values()) for w in workers)}; "
            f"fds {fds0} -> {fds1} (max {max_fds}, {n_dirs} dirs in the layers); "
            f"RSS {rss0} -> {rss1} KiB (max {max_rss})"
        )
        problems = [f"{w.name}: {p}" for w in workers for p in w.problems]
        assert not problems, f"seed {seed}:\n" + "\n".join(problems)
        # No record appended to a shared file was lost, none torn, and the lower data intact.
        lost = []
        for name, data in shared.items():
            got = (mnt / "shared" / name).read_bytes()
            tail = got[len(data) :]
            want = sum(w.appends[name] for w in workers)
            if got[: len(data)] != data or len(tail) != want * REC:
                lost.append(f"{name}: {len(tail) // REC} records of {want}")
        assert not lost, f"seed {seed}: " + ", ".join(lost)
        ours = snapshot(mnt)
    assert d.proc.returncode == 0
    assert "Traceback" not in d.log_text() and " ERROR " not in d.log_text(), d.log_text()
    with mount_kernel([lower], upper, work, kmnt):
        theirs = snapshot(kmnt)
    diffs = compare(theirs, ours)
    assert not diffs, f"kernel vs layerfs on one upper (seed {seed}):\n" + "\n".join(diffs[:40])
    # The daemon caches one fd per directory of each layer (bounded): that much growth is fine.
    assert fds1 <= fds0 + 50 + n_dirs, f"daemon fds grew from {fds0} to {fds1}: {dict(held)}"
    assert held["deleted"] == 0, f"the daemon still holds deleted files: {dict(held)}"
    assert rss1 <= 2 * rss0 + 64 * 1024, f"daemon RSS grew from {rss0} to {rss1} KiB"

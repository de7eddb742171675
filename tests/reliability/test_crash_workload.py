"""kill -9 at random points of a random workload, then remount (issue 6, faults).

Two workers (``_workload.py``) run journaled random operations (appends that copy up lower files,
creates with fsync, renames, unlinks, chmods, truncates, mkdir/rmdir, reads checked against their
model) on disjoint parts of one mount; the daemon is killed at a random moment. After
``layerfs umount`` of the stale mount and a remount, every path must hold the value the journal
says (or, for the operation in flight, its value before or after it): every completed write is
there, fsynced or not (layerfs runs without the writeback cache, so a write that returned is in
the upper), and no copy-up is partial. The workdir must be empty after the remount, and kernel
overlayfs mounted on the same upper must show the same tree as layerfs.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.mounts import is_mounted, mount_kernel
from support.snapshot import compare, snapshot

from ._helpers import layerfs_daemon, layerfs_umount, needs_root, wait_until
from ._workload import ABSENT, owned, replay, value_of, walk

pytestmark = [pytest.mark.fuse, pytest.mark.kernel_overlay, pytest.mark.slow, needs_root]

WORKLOAD = Path(__file__).with_name("_workload.py")
ROUNDS = 3


def _make_lower(lower: Path, rnd: random.Random) -> None:
    for d in ("l/a/b", "n/w0", "n/w1"):
        (lower / d).mkdir(parents=True)
    sizes = [0, 1000, 70_000, 2 << 20, 6 << 20]
    for i in range(12):
        sub = ("l", "l/a", "l/a/b")[i % 3]
        path = lower / sub / f"f{i:02d}"
        size = sizes[i % len(sizes)]
        with open(path, "wb") as fh:
            if size > (1 << 20):  # sparse: data, a hole, data
                fh.truncate(size)
                fh.write(rnd.randbytes(1 << 20))
                fh.seek(size - 4096)
                fh.write(rnd.randbytes(4096))
            else:
                fh.write(rnd.randbytes(size))
        os.chmod(path, 0o644)
    for home in ("w0", "w1"):
        (lower / "n" / home / "c0").write_bytes(b"lower file in the worker's home\n")
        # Lower directories the worker may rename (redirects) and fill.
        for j in range(3):
            ldir = lower / "n" / home / f"ld{j}" / "d0"
            ldir.mkdir(parents=True)
            for k in range(3):
                (ldir.parent / f"c{k}").write_bytes(rnd.randbytes(100 * k))
                (ldir / f"c{k}").write_bytes(rnd.randbytes(50 * k))


def _wait_started(journals: list[Path]) -> None:
    def started(j: Path) -> bool:
        return j.exists() and '"start"' in j.read_text()

    wait_until(lambda: all(started(j) for j in journals), 60, "the workers to start")


def _check_against_journals(root: Path, journals: list[Path], what: str) -> None:
    problems: list[str] = []
    actual = set(walk(str(root)))
    for owner, journal in enumerate(journals):
        allowed, found = replay(journal.read_text().splitlines(keepends=True))
        problems += found
        for rel, values in sorted(allowed.items()):
            got = value_of(str(root / rel))
            if got not in values:
                problems.append(f"{what}: {rel} is {got}, journal allows {sorted(values)}")
        for rel in sorted(actual):
            if owned(rel, owner) and rel not in allowed:
                problems.append(f"{what}: {rel} exists, never made by worker {owner}")
        assert allowed, f"worker {owner} journaled nothing"
        assert not any(v == {ABSENT} for v in [allowed.get("n")] if v)
    assert not problems, "\n".join(problems[:40])


def test_kill9_random_workload(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    lower, upper, work, mnt, kmnt = (
        tmp_path / n for n in ("lower", "upper", "work", "merged", "kmerged")
    )
    for path in (lower, upper, work, mnt, kmnt):
        path.mkdir(exist_ok=True)
    _make_lower(lower, rnd)
    temps_left = []
    for rnd_i in range(ROUNDS):
        journals = [tmp_path / f"journal-{rnd_i}-{w}" for w in range(2)]
        workers: list[subprocess.Popen[bytes]] = []
        with layerfs_daemon([lower], upper, work, mnt) as d:
            try:
                for w, journal in enumerate(journals):
                    cmd = [sys.executable, str(WORKLOAD), str(mnt), str(journal)]
                    workers.append(subprocess.Popen([*cmd, str(rnd.randrange(1 << 30)), str(w)]))
                # The kill comes at a random moment once both workers have begun.
                _wait_started(journals)
                time.sleep(rnd.uniform(0.1, 1.5))
                stopped = [
                    j for p, j in zip(workers, journals, strict=True) if p.poll() is not None
                ]
                assert not stopped, f"a worker stopped (seed {seed}): " + "\n".join(
                    [*(j.read_text()[-600:] for j in stopped), d.log_text()[-3000:]]
                )
                d.kill9()
                for p, journal in zip(workers, journals, strict=True):
                    if p.wait(timeout=60) != 0:
                        tail = journal.read_text().splitlines()[-3:]
                        raise AssertionError(f"worker failed (seed {seed}): " + "\n".join(tail))
            finally:
                for p in workers:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
            assert "Traceback" not in d.log_text(), d.log_text()
            r = layerfs_umount(mnt)
            assert r.returncode == 0, r.stderr
            assert not is_mounted(mnt)
        temps_left.append(len(os.listdir(work / "work")))
        with layerfs_daemon([lower], upper, work, mnt) as d2:
            assert os.listdir(work / "work") == [], "the remount must clean the workdir"
            _check_against_journals(mnt, journals, f"layerfs after crash {rnd_i} (seed {seed})")
            ours = snapshot(mnt)
            assert "Traceback" not in d2.log_text(), d2.log_text()
        with mount_kernel([lower], upper, work, kmnt):
            _check_against_journals(kmnt, journals, f"kernel after crash {rnd_i} (seed {seed})")
            theirs = snapshot(kmnt)
        diffs = compare(theirs, ours)
        assert not diffs, f"kernel vs layerfs on one upper (seed {seed}):\n" + "\n".join(diffs)
    print(f"seed {seed}: temp files left by each crash: {temps_left}")

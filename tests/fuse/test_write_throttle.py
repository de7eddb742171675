"""A write the page cache throttles does not stall the other requests of the mount
(layerfs.dirty, layerfs.files: ``_write``; docs/concurrency.md).

A write is made on the trio thread only while the dirty pages are below the freerun ceiling
of every writeback domain it falls in; otherwise on a worker thread, so that a writer held in
``balance_dirty_pages`` holds up only its own request. Before session 14 a WRITE of
``files.BIG_IO`` or more always went to a thread and a smaller one never did: a throttled
small write stopped the whole mount. Here the throttle is real and private to the test: the
upper is an ext4 on a loop device of its own whose backing device has ``strict_limit`` and a
1 MiB ``max_bytes`` (it throttles on its own share, as every FUSE device does) and whose
writes the block layer lets out at 64 KiB/s (``blkio.throttle.write_bps_device``, cgroup v1's
root). A writer then waits in ``balance_dirty_pages`` for minutes; while it does, another
client's lookups must be answered. A watchdog, not a timing: a stalled loop answers none.
Each case runs on both loops: the poll loop (pyfuse3's WRITE handler) and the compiled raw
path (WRITE answered in C by ``Files.write_now`` unless the write might be throttled).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.mounts import Layout, _threads, subject_named

from layerfs import fusehooks

pytestmark = pytest.mark.fuse

WATCHDOG = 60.0  # seconds; the lookups take milliseconds, the throttled writer minutes
THROTTLE = Path("/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device")


def _write(path: Path, text: str) -> None:
    path.write_text(text)


@contextlib.contextmanager
def _throttled_ext4(tmp: Path, *, partition: bool = False) -> Iterator[Path]:
    """An ext4 on a fresh loop device whose buffered writes the page cache throttles;
    PARTITION: on a partition of it (made with addpart: no table to parse), whose backing
    device is the disk's (its bdi is named after the disk, not after the partition)."""
    if not THROTTLE.exists():
        pytest.skip("no cgroup v1 blkio throttle at /sys/fs/cgroup/blkio")
    img, point = tmp / "disk.img", tmp / "disk"
    point.mkdir()
    with open(img, "wb") as f:
        f.truncate(256 << 20)
    r = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"no loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    rdev = os.stat(dev).st_rdev
    mm = f"{os.major(rdev)}:{os.minor(rdev)}"
    bdi = Path("/sys/class/bdi") / mm
    fs = dev
    try:
        if not (bdi / "max_ratio_fine").exists():
            pytest.skip("no per-device max_bytes and max_ratio_fine (Linux 6.2+)")
        if partition:
            r = subprocess.run(["addpart", dev, "1", "2048", str((255 << 20) // 512)], check=False)
            fs = f"{dev}p1"
            if r.returncode != 0 or not Path(fs).exists():
                pytest.skip("no partition of a loop device (addpart)")
        subprocess.run(["mkfs.ext4", "-q", "-F", fs], check=True, capture_output=True)
        subprocess.run(["mount", fs, str(point)], check=True)
        # the device's settings outlive this use of it (the next user of the loop device
        # number finds them): put back what was there
        strict, ratio = (bdi / "strict_limit").read_text(), (bdi / "max_ratio_fine").read_text()
        try:
            _write(bdi / "strict_limit", "1")
            _write(bdi / "max_bytes", str(1 << 20))
            _write(THROTTLE, f"{mm} 65536")
            try:
                yield point
            finally:
                _write(THROTTLE, f"{mm} 0")  # the writes drain at full speed again
                _write(bdi / "max_ratio_fine", ratio.strip())
                _write(bdi / "strict_limit", strict.strip())
        finally:
            subprocess.run(["umount", str(point)], check=False)
    finally:
        if fs != dev:
            subprocess.run(["delpart", dev, "1"], check=False)
        subprocess.run(["losetup", "--detach", dev], check=False)


def _wait_throttled(pid: int, writer: subprocess.Popen[bytes]) -> None:
    """Until a thread of the daemon PID waits in balance_dirty_pages."""
    for _ in range(int(WATCHDOG / 0.05)):
        if any(wchan == "balance_dirty_pages" for _, _, wchan in _threads(pid)):
            return
        if writer.poll() is not None:
            pytest.fail(f"the writer ended ({writer.returncode}) before it was throttled")
        threading.Event().wait(0.05)
    pytest.fail(f"no write throttled after {WATCHDOG}s: {_threads(pid)}")


@pytest.mark.parametrize("loop", ["poll", "craw"])
@pytest.mark.parametrize(
    ("size", "partition"),
    [(64 << 10, False), (1 << 20, False), (64 << 10, True)],  # below files.BIG_IO, above it
)
def test_lookups_answered_while_a_write_is_throttled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, partition: bool, loop: str
) -> None:
    """... and on a partition, whose disk's strict_limit the gauge looked for under the
    partition's device number (no such bdi: not strict) and so wrote inline. On both loops:
    the compiled raw path answers a WRITE in C where ``Files.write_now`` finds the gauge's
    room, and hands the others to pyfuse3 (the poll loop: always pyfuse3's handler)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, sysfs)")
    if loop == "craw" and fusehooks.craw_module() is None:
        pytest.skip("layerfs._craw is not built (scripts/setup.sh builds it: Cython and gcc)")
    monkeypatch.setenv("LAYERFS_LOOP", loop)
    lower = tmp_path / "lower"
    (lower / "d").mkdir(parents=True)
    (lower / "d" / "old").write_bytes(b"lower\n")
    mnt = tmp_path / "merged"
    mnt.mkdir()
    with _throttled_ext4(tmp_path, partition=partition) as disk:
        (disk / "upper").mkdir()
        (disk / "work").mkdir()
        layout = Layout(tmp_path, [lower], disk / "upper", disk / "work", mnt)
        with layout.mount(subject_named("layerfs")) as m:
            assert m.proc is not None
            count = (64 << 20) // size  # minutes at 64 KiB/s: still waiting at the end
            writer = subprocess.Popen(
                ["dd", "if=/dev/zero", f"of={mnt / 'd' / 'new'}", f"bs={size}", f"count={count}"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                _wait_throttled(m.proc.pid, writer)
                answered: list[object] = []

                def client() -> None:
                    for i in range(50):
                        answered.append(os.path.exists(mnt / "d" / f"missing{i}"))
                    answered.append((mnt / "d" / "old").read_bytes())

                t = threading.Thread(target=client, daemon=True)
                t.start()
                t.join(WATCHDOG)
                where = _threads(m.proc.pid)
                assert not t.is_alive(), f"lookups not answered in {WATCHDOG}s: {where}"
                assert answered == [False] * 50 + [b"lower\n"]
                assert writer.poll() is None, "the write was not held up meanwhile"
            finally:
                writer.kill()
                writer.wait()

"""Signals and the end of a mount: SIGTERM/SIGINT unmount cleanly, SIGHUP is ignored, and a
daemon whose mount went away (``fusermount3 -u`` or ``umount -l`` by someone else, as container
engines do it) exits by itself, foreground or detached, leaving no process behind."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support.mounts import is_mounted

from ._helpers import (
    EXIT_TIMEOUT,
    Daemon,
    copy_in_progress,
    layerfs_daemon,
    mount_cmd,
    needs_root,
    pids_naming,
    unmount_any,
    wait_until,
)

pytestmark = [pytest.mark.fuse, needs_root]


def _layout(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for p in (lower, upper, work, mnt):
        p.mkdir()
    (lower / "f").write_text("lower\n")
    return lower, upper, work, mnt


def _assert_exits_cleanly(d: Daemon) -> None:
    d.proc.wait(timeout=EXIT_TIMEOUT)
    assert not is_mounted(d.mnt), "the mount outlived its daemon"
    assert "Traceback" not in d.log_text(), d.log_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_term_and_int_unmount(tmp_path: Path, sig: signal.Signals) -> None:
    lower, upper, work, mnt = _layout(tmp_path)
    with layerfs_daemon([lower], upper, work, mnt) as d:
        (mnt / "new").write_text("upper\n")
        os.kill(d.pid, sig)
        _assert_exits_cleanly(d)
        assert d.proc.returncode == 0, d.log_text()
    # What was written before the signal is in the upper.
    assert (upper / "new").read_text() == "upper\n"


def test_hup_is_ignored(tmp_path: Path) -> None:
    lower, upper, work, mnt = _layout(tmp_path)
    with layerfs_daemon([lower], upper, work, mnt) as d:
        for _ in range(3):
            os.kill(d.pid, signal.SIGHUP)
        (mnt / "after-hup").write_text("x")
        assert sorted(os.listdir(mnt)) == ["after-hup", "f"]
        assert d.alive()
        assert is_mounted(mnt)


@pytest.mark.parametrize("how", ["fusermount3 -u", "umount -l"])
def test_daemon_exits_when_mount_is_taken_away(tmp_path: Path, how: str) -> None:
    lower, upper, work, mnt = _layout(tmp_path)
    with layerfs_daemon([lower], upper, work, mnt) as d:
        assert (mnt / "f").read_text() == "lower\n"
        subprocess.run([*how.split(), str(mnt)], check=True)
        _assert_exits_cleanly(d)
        assert d.proc.returncode == 0, d.log_text()


def test_lazy_unmount_with_open_file_serves_it_then_exits(tmp_path: Path) -> None:
    """After ``umount -l`` an open file still works; the daemon exits once it is closed."""
    lower, upper, work, mnt = _layout(tmp_path)
    with layerfs_daemon([lower], upper, work, mnt) as d:
        fd = os.open(mnt / "f", os.O_RDWR | os.O_APPEND)
        try:
            subprocess.run(["umount", "-l", str(mnt)], check=True)
            assert not is_mounted(mnt)
            os.write(fd, b"written after umount -l\n")
            assert os.pread(fd, 100, 0) == b"lower\nwritten after umount -l\n"
            assert d.alive(), "the daemon quit while a file was still open"
        finally:
            os.close(fd)
        _assert_exits_cleanly(d)
    assert (upper / "f").read_text() == "lower\nwritten after umount -l\n"


@pytest.mark.parametrize("how", ["fusermount3 -u", "umount -l"])
def test_detached_daemon_exits_when_unmounted(tmp_path: Path, how: str) -> None:
    """Without -f (as container engines run it): mount returns once live; no process stays."""
    lower, upper, work, mnt = _layout(tmp_path)
    try:
        r = subprocess.run(
            mount_cmd([lower], upper, work, mnt, foreground=False),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout == "" and r.stderr == ""
        assert is_mounted(mnt), "mount returned before the mount was live"
        assert (mnt / "f").read_text() == "lower\n"
        pids = pids_naming(mnt)
        assert len(pids) == 1, pids
        subprocess.run([*how.split(), str(mnt)], check=True)
        wait_until(lambda: not pids_naming(mnt), EXIT_TIMEOUT, "the detached daemon to exit")
    finally:
        unmount_any(mnt)
        for pid in pids_naming(mnt):
            os.kill(pid, signal.SIGKILL)


def test_term_during_copy_up(tmp_path: Path) -> None:
    """SIGTERM while a large copy-up runs: a clean exit, no temporary file, no partial copy."""
    lower, upper, work, mnt = _layout(tmp_path)
    size = 256 << 20
    with open(lower / "big", "wb") as fh:
        fh.truncate(size)
        for off in range(0, size, 16 << 20):
            fh.seek(off)
            fh.write(os.urandom(4 << 20))
    lower_bytes = (lower / "big").read_bytes()
    writer = None
    with layerfs_daemon([lower], upper, work, mnt) as d:
        try:
            writer = subprocess.Popen(
                [sys.executable, "-c", f"open({str(mnt / 'big')!r}, 'ab').close()"],
                stderr=subprocess.DEVNULL,
            )
            w = writer
            wait_until(
                lambda: copy_in_progress(d.pid, work) or w.poll() is not None,
                60,
                "the copy-up to start",
                interval=0.001,
            )
            os.kill(d.pid, signal.SIGTERM)
            _assert_exits_cleanly(d)
            assert d.proc.returncode == 0, d.log_text()
        finally:
            if writer is not None:
                writer.wait(timeout=60)
    assert os.listdir(work / "work") == []
    if (upper / "big").exists():
        assert (upper / "big").read_bytes() == lower_bytes


def test_term_with_busy_mount(tmp_path: Path) -> None:
    """SIGTERM while a file is open in the mount: the daemon still exits and the mount goes
    (detached lazily); the open file then fails with ENOTCONN instead of hanging."""
    lower, upper, work, mnt = _layout(tmp_path)
    with layerfs_daemon([lower], upper, work, mnt) as d:
        fd = os.open(mnt / "f", os.O_RDONLY)
        try:
            os.kill(d.pid, signal.SIGTERM)
            _assert_exits_cleanly(d)
            with pytest.raises(OSError) as exc:
                os.pread(fd, 10, 0)
            assert exc.value.errno == errno.ENOTCONN
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

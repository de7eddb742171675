"""Process and kernel helpers: timed commands, cache drops, daemon lookup, machine facts."""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from layerfs import mountinfo

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


class CommandError(RuntimeError):
    """An external command failed; the message carries its stderr."""


def run(
    cmd: list[str],
    *,
    cwd: Path | str | None = None,
    timeout: float | None = None,
    stdout: int | None = subprocess.DEVNULL,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``cmd``, raising CommandError with its stderr when it fails."""
    proc = subprocess.run(
        cmd, cwd=cwd, timeout=timeout, stdout=stdout, stderr=subprocess.PIPE, check=False
    )
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-800:]
        raise CommandError(
            f"{' '.join(cmd[:4])}{' ...' if len(cmd) > 4 else ''}: exit {proc.returncode}: {err}"
        )
    return proc


def timed(cmd: list[str], *, cwd: Path | str | None = None, timeout: float | None = None) -> float:
    """Run ``cmd`` and return its wall-clock seconds (stdout goes to /dev/null)."""
    t0 = time.perf_counter_ns()
    run(cmd, cwd=cwd, timeout=timeout)
    return (time.perf_counter_ns() - t0) / 1e9


def sync() -> None:
    os.sync()


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000


def spread_subdirs(path: Path) -> bool:
    """Mark PATH as a top of a directory hierarchy (chattr +T), so that ext4 places each new
    subdirectory in a fresh block group. Returns False where the filesystem refuses.

    Why: ext4 without a journal skips inodes deleted in the last 60-360 s when it allocates one
    (recently_deleted), scanning them one by one; in a block group where the previous run just
    deleted thousands of files, a create then costs ~800 us instead of ~30 us. With the flag,
    every run's upper starts in a group of its own, and no target pays for another's rm -rf.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = array.array("l", [0])
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
        flags[0] |= FS_TOPDIR_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags, True)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def drop_caches(level: int = 3) -> bool:
    """Write back dirty pages, then drop clean caches (3: pages + dentries/inodes, 2: the
    latter only). Returns False where the kernel refuses (not root, read-only /proc/sys)."""
    os.sync()
    try:
        DROP_CACHES.write_text(f"{level}\n")
    except OSError:
        return False
    return True


def can_drop_caches() -> bool:
    try:
        with DROP_CACHES.open("w") as f:
            f.write("1\n")
    except OSError:
        return False
    return True


def find_daemon(mountpoint: Path) -> int | None:
    """The pid of the process whose argv names ``mountpoint`` (the FUSE daemon), if any; for
    a layerfs mount served with others (``-o share=K``), the pid its statistics name.

    Mountpoints are unique per mount in this harness, so only the daemon carries one in its
    argv while nothing else runs."""
    want = os.fsencode(str(mountpoint))
    me = os.getpid()
    found: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if want in argv:
            found.append(int(entry.name))
    if not found:  # a process serving several mounts (-o share=K) is named after its first
        import json

        try:
            stats = json.loads(os.getxattr(mountpoint, "trusted.layerfs.statistics"))
            return int(stats["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return min(found)


def rss_mib(pid: int) -> float:
    """VmRSS of ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process PID (all its threads) so far, or None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fuse_requests(mountpoint: Path) -> int | None:
    """The requests a layerfs daemon has served (its statistics xattr), or None."""
    import json

    try:
        stats = json.loads(os.getxattr(mountpoint, "trusted.layerfs.statistics"))
    except (OSError, ValueError):
        return None
    return sum(v for k, v in stats.items() if k.startswith("req_") and isinstance(v, int))


HOG = "while True: pass"


@contextlib.contextmanager
def busy_host(hogs: int) -> Iterator[list[int]]:
    """A busy host: HOGS processes that each spin on a core, at normal priority, for the
    block's life (the same for every target, as they alternate); yields their pids."""
    procs = [
        subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.DEVNULL) for _ in range(hogs)
    ]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return not pid_alive(pid)


def is_mountpoint(path: Path) -> bool:
    return os.path.ismount(path)


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below ROOT in our mount namespace, deepest first."""
    prefix = os.fsencode(str(root).rstrip("/")) + b"/"
    found = {
        Path(os.fsdecode(m.point))
        for m in mountinfo.mounts()
        if m.point == prefix[:-1] or m.point.startswith(prefix)
    }
    return sorted(found, key=lambda p: -len(p.parts))


def pss_kib(pid: int) -> int:
    """Proportional set size of process PID (/proc/PID/smaps_rollup), KiB: its private pages
    plus its share of each page it shares, so that summing it over processes counts every
    page once."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Pss for pid {pid}")


FORKSERVER = b"layerfs-forkserver"


def daemon_processes(pid: int) -> set[int]:
    """A mount's daemon PID and, where it was forked by a layerfs fork server (a process whose
    command line starts with ``layerfs-forkserver``), that server: what the mount costs."""
    found = {pid}
    try:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        if Path(f"/proc/{ppid}/cmdline").read_bytes().startswith(FORKSERVER):
            found.add(ppid)
    except (OSError, ValueError, IndexError):
        pass
    return found


def fuse_abort(conn: int | None) -> None:
    """Abort a FUSE connection (unsticks processes blocked on a hung daemon)."""
    if conn is None:
        return
    with contextlib.suppress(OSError):
        Path(f"/sys/fs/fuse/connections/{conn}/abort").write_text("1\n")


def force_unmount(path: Path, conn: int | None) -> None:
    """Last resort after a failed unmount: abort the connection and detach lazily."""
    fuse_abort(conn)
    for cmd in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        if not is_mountpoint(path):
            return
        if shutil.which(cmd[0]):
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def detach(path: Path) -> None:
    """Lazy unmount of PATH, whatever it is (a bind mount of a directory on itself, which
    is_mountpoint cannot see, included)."""
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (out.stdout or out.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else "unavailable"


def command_version(cmd: list[str]) -> str:
    return _first_line(cmd)


def filesystem_of(path: Path) -> str:
    """fstype and mount options of the filesystem holding ``path`` (from findmnt)."""
    try:
        out = subprocess.run(
            ["findmnt", "-n", "-o", "FSTYPE,OPTIONS", "-T", str(path)],
            capture_output=True,
            timeout=30,
            check=False,
        )
        return out.stdout.decode().strip() or "unknown"
    except OSError:
        return "unknown"


def machine_info(data_dir: Path) -> dict[str, object]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "layer_filesystem": filesystem_of(data_dir),
        "python": sys.version.split()[0],
        "fio": command_version(["fio", "--version"]) if shutil.which("fio") else None,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }

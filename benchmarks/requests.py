"""FUSE requests per operation, counted by the kernel: ``python -m benchmarks.requests``.

The kernel's ``fuse:fuse_request_send`` tracepoint (Linux 6.14+) fires for every request it
queues on a FUSE connection, whatever the daemon. A histogram trigger on it, in a tracefs
instance of our own and filtered on the mount's connection (its st_dev), counts them by
opcode without a trace buffer, for layerfs and fuse-overlayfs alike. Each workload runs on a
fresh mount of the same small tree; the table shows requests per file (per MiB for the
sequential write) and the daemon's CPU (user + system) per request.

Root only (tracefs, mounts). Not part of the timed benchmark: request counts do not depend on
the machine's load, so one run is the measurement.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
EVENT = "events/fuse/fuse_request_send"
BLOCK = b"\xa5" * 4096
OPCODES = {
    1: "LOOKUP", 2: "FORGET", 3: "GETATTR", 4: "SETATTR", 5: "READLINK", 6: "SYMLINK",
    8: "MKNOD", 9: "MKDIR", 10: "UNLINK", 11: "RMDIR", 12: "RENAME", 13: "LINK", 14: "OPEN",
    15: "READ", 16: "WRITE", 17: "STATFS", 18: "RELEASE", 20: "FSYNC", 21: "SETXATTR",
    22: "GETXATTR", 23: "LISTXATTR", 24: "REMOVEXATTR", 25: "FLUSH", 26: "INIT", 27: "OPENDIR",
    28: "READDIR", 29: "RELEASEDIR", 30: "FSYNCDIR", 31: "GETLK", 32: "SETLK", 33: "SETLKW",
    34: "ACCESS", 35: "CREATE", 36: "INTERRUPT", 39: "IOCTL", 42: "BATCH_FORGET",
    43: "FALLOCATE", 44: "READDIRPLUS", 45: "RENAME2", 46: "LSEEK", 50: "SYNCFS", 52: "STATX",
}  # fmt: skip


def available() -> str | None:
    """Why requests cannot be counted here, or None."""
    if os.geteuid() != 0:
        return "tracefs needs root"
    if not (TRACEFS / EVENT).is_dir():
        return "no fuse:fuse_request_send tracepoint (Linux 6.14+, tracefs mounted)"
    return None


@contextlib.contextmanager
def counting(dev: int) -> Iterator[collections.Counter[str]]:
    """Count the requests queued on FUSE connection DEV by opcode while the body runs."""
    inst = TRACEFS / "instances" / f"layerfs-requests-{os.getpid()}"
    inst.mkdir()
    counts: collections.Counter[str] = collections.Counter()
    try:
        (inst / "buffer_size_kb").write_text("32768")
        (inst / EVENT / "filter").write_text(f"connection == {dev}")
        (inst / EVENT / "enable").write_text("1")
        yield counts
        (inst / EVENT / "enable").write_text("0")
        text = (inst / "trace").read_text()
        written = re.search(r"entries-in-buffer/entries-written: (\d+)/(\d+)", text)
        if written and written[1] != written[2]:
            raise RuntimeError(f"trace buffer overran: {written[0]}")
        for m in re.finditer(r" opcode (\d+) ", text):
            counts[OPCODES.get(int(m[1]), m[1])] += 1
    finally:
        inst.rmdir()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def profile(where: str | None, pid: int, name: str) -> subprocess.Popen[bytes] | None:
    """Record PID's stacks into WHERE until interrupted, or None: py-spy's collapsed stacks of
    the thread holding the GIL (the Python CPU), NAME.txt, or with PERF=1 in the environment
    ``perf record -g``, NAME.perf (the whole CPU, kernel included), or with STRACE=1 the
    daemon's syscalls counted (``strace -f -c``), NAME.strace, or with PERFSTAT=1 its
    instructions and cycles, user and kernel (``perf stat``: what the load changes least),
    NAME.perfstat."""
    if where is None:
        return None
    if os.environ.get("STRACE"):
        cmd = ["strace", "-f", "-c", "-p", str(pid), "-o", f"{where}/{name}.strace"]
    elif os.environ.get("PERFSTAT"):
        events = "instructions:u,instructions:k,cycles:u,cycles:k"
        cmd = ["perf", "stat", "-e", events, "-p", str(pid), "-o", f"{where}/{name}.perfstat"]
    elif os.environ.get("PERF"):
        cmd = ["perf", "record", "-F", "4000", "-g", "-p", str(pid), "-o", f"{where}/{name}.perf"]
    else:
        spy = str(Path(sys.executable).with_name("py-spy"))
        cmd = [spy, "record", "-p", str(pid), "-r", "1000", "-f", "raw", "--gil"]
        cmd += ["-o", f"{where}/{name}.txt"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached
    return proc


def make_tree(root: Path, n: int) -> Path:
    """A lower with tmp/, usr/share/d0..d9 and mergeddir/; a tarball of N 4 KiB files into
    usr/share's existing directories."""
    lower = root / "lower"
    for d in ("tmp", "mergeddir", *(f"usr/share/d{i}" for i in range(10))):
        (lower / d).mkdir(parents=True)
    for i in range(100):
        (lower / "mergeddir" / f"f{i}").write_bytes(b"x")
    src = root / "src"
    for i in range(n):
        p = src / "usr" / "share" / f"d{i % 10}" / f"new{i:05d}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(BLOCK)
    with tarfile.open(root / "files.tar", "w") as tar:
        tar.add(src / "usr", arcname="usr")
    return lower


def mount(
    kind: str, lower: Path, root: Path, layerfs: str, opts: str
) -> tuple[Path, subprocess.Popen[bytes]]:
    tag = f"{kind}-{len(list(root.iterdir()))}"
    upper, work, mnt = root / f"{tag}-upper", root / f"{tag}-work", root / f"{tag}-mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    if kind == "fuse-overlayfs":
        o = f"lowerdir={lower},upperdir={upper},workdir={work}"
        cmd = ["fuse-overlayfs", "-f", "-o", o + (f",{opts}" if opts else ""), str(mnt)]
    else:
        cmd = [layerfs, "mount", "-f", str(lower), str(upper), str(mnt), "--workdir", str(work)]
        cmd += ["-o", opts] if opts else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return wait_mounted(root, mnt, proc, kind, tries=300, interval=0.02)


def wait_mounted(
    root: Path, mnt: Path, proc: subprocess.Popen[bytes], what: str, *, tries: int, interval: float
) -> tuple[Path, subprocess.Popen[bytes]]:
    """Wait until MNT (in ROOT) is PROC's mount and answers a listing; else unmount, raise."""
    dev0 = os.stat(root).st_dev
    for _ in range(tries):
        if os.stat(mnt).st_dev != dev0:
            os.listdir(mnt)
            return mnt, proc
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}")
        time.sleep(interval)
    umount(mnt, proc)  # nothing left behind, mounted late or not
    raise RuntimeError(f"{what} did not mount")


def umount(mnt: Path, proc: subprocess.Popen[bytes]) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def workloads(
    n: int, mib: int, tarball: Path, lower: Path | None = None
) -> dict[str, tuple[Callable[[Path], None], Callable[[Path], None], int]]:
    """name -> (setup, run, units): requests are divided by UNITS (files, or MiB). LOWER:
    where "chmod" makes its N lower files (in chmoddir/, before the mount)."""
    names = [f"f{i:05d}" for i in range(n)]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL

    def create(m: Path) -> None:
        dfd = os.open(m / "tmp" / "churn", os.O_RDONLY | os.O_DIRECTORY)
        for name in names:
            fd = os.open(name, flags, 0o644, dir_fd=dfd)
            os.write(fd, BLOCK)
            os.close(fd)
        os.close(dfd)

    def unlink(m: Path) -> None:
        dfd = os.open(m / "tmp" / "churn", os.O_RDONLY | os.O_DIRECTORY)
        for name in names:
            os.unlink(name, dir_fd=dfd)
        os.close(dfd)

    def failed(m: Path) -> None:
        dfd = os.open(m / "mergeddir", os.O_RDONLY | os.O_DIRECTORY)
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.lstat("missing" + name, dir_fd=dfd)
        os.close(dfd)

    def untar(m: Path) -> None:
        subprocess.run(["tar", "-xf", str(tarball), "-C", str(m)], check=True)

    def seq_write(m: Path) -> None:
        out = m / "tmp" / "seqwrite"
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={out}", "bs=1M", f"count={mib}"],
            check=True,
            capture_output=True,
        )

    def mkchurn(m: Path) -> None:
        os.mkdir(m / "tmp" / "churn")

    def both(m: Path) -> None:
        mkchurn(m)
        create(m)

    def nothing(m: Path) -> None:
        pass

    if lower is not None:  # chmod's files, made in the lower before the mount
        (lower / "chmoddir").mkdir(exist_ok=True)
        for name in names:
            (lower / "chmoddir" / name).write_bytes(BLOCK)

    def chmod(m: Path) -> None:  # a copy-up per file, as the chmod-10k row
        subprocess.run(["chmod", "-R", "g+w", str(m / "chmoddir")], check=True)

    return {
        "create": (mkchurn, create, n),
        "unlink": (both, unlink, n),
        "failed": (nothing, failed, n),
        "untar": (nothing, untar, n),
        "seq-write": (nothing, seq_write, mib),
        "chmod": (nothing, chmod, n),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=1000)
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--targets", default="fuse-overlayfs,layerfs")
    p.add_argument("--only", default="create,unlink,failed,untar,seq-write")
    p.add_argument("--layerfs", default=str(Path(sys.executable).with_name("layerfs")))
    p.add_argument("--layerfs-options", default="")
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--profile", help="py-spy the layerfs daemon; collapsed stacks in this dir")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="layerfs-requests-", dir=args.dir))
    # ext4 spreads the subdirectories over block groups: no target allocates inodes next to
    # the ones a previous run deleted (docs/benchmarks.md, session 4)
    subprocess.run(["chattr", "+T", str(root)], check=False, capture_output=True)
    try:
        lower = make_tree(root, args.files)
        wl = workloads(args.files, args.mib, root / "files.tar")
        rows: dict[tuple[str, str], tuple[collections.Counter[str], float, int]] = {}
        for name in args.only.split(","):
            setup, run, units = wl[name]
            for kind in args.targets.split(","):
                opts = args.layerfs_options if kind == "layerfs" else ""
                mnt, proc = mount(kind, lower, root, args.layerfs, opts)
                try:
                    setup(mnt)
                    spy = profile(args.profile, proc.pid, name) if kind == "layerfs" else None
                    cpu0 = cpu_seconds(proc.pid)
                    with counting(os.stat(mnt).st_dev) as counts:
                        run(mnt)
                    if spy is not None:
                        spy.send_signal(2)
                        spy.wait()
                    cpu = cpu_seconds(proc.pid) - cpu0
                finally:
                    umount(mnt, proc)
                rows[name, kind] = (counts, cpu, units)
        report(rows, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def report(
    rows: dict[tuple[str, str], tuple[collections.Counter[str], float, int]],
    args: argparse.Namespace,
) -> None:
    load = os.getloadavg()
    loads = " ".join(f"{x:.2f}" for x in load)
    print(f"# {args.files} files, {args.mib} MiB; load average {loads}")
    print("| workload | target | requests per unit | total | daemon CPU | CPU per request |")
    print("|---|---|---|---|---|---|")
    for (name, kind), (counts, cpu, units) in rows.items():
        total = sum(counts.values())
        per = ", ".join(f"{op} {c / units:.2f}" for op, c in counts.most_common())
        cpr = f"{cpu / total * 1e6:.0f} µs" if total else "-"
        print(f"| {name} | {kind} | {per} | {total / units:.2f} | {cpu * 1e3:.0f} ms | {cpr} |")


if __name__ == "__main__":
    sys.exit(main())

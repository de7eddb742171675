"""Where a sequential write's time goes: ``python -m benchmarks.seqwrite``.

Mounts each target afresh on the same small lower (kernel overlayfs, fuse-overlayfs, layerfs,
and layerfs again with other daemon environments: ``--variant NAME:VAR=VALUE,...``), writes
``--mib`` MiB into a new file as ``dd bs=1M`` does (a child process writing ``--bs`` KiB, 1 MiB
by default, at a time),
quiet and with ``--busy`` (a CPU hog on every core but one, the benchmarks' busy host), the
targets alternating, ``--rounds`` times. Each run reports:

- the wall time, and the writer's run delay (time runnable but waiting for a CPU, from
  /proc/thread-self/schedstat);
- the daemon's CPU (every thread's schedstat run time: not rounded to clock ticks) and its
  threads' run delay, per MiB; its voluntary and involuntary context switches per MiB;
- the requests the kernel sent per MiB (``benchmarks.requests.counting``);
- the daemon's minor page faults per MiB and its peak RSS (VmHWM).

Root only (mounts, tracefs). docs/benchmarks.md, session 14 (seqwrite).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks import requests
from benchmarks.hostmem import describe, warm_host_memory
from benchmarks.system import busy_host

MiB = 1 << 20


def _tasks(pid: int) -> dict[int, tuple[int, int, int, int]]:
    """tid -> (run ns, run delay ns, voluntary, involuntary switches) of PID's live threads."""
    out: dict[int, tuple[int, int, int, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            run, delay, _ = (int(x) for x in (task / "schedstat").read_text().split())
            status = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread gone meanwhile
        sw = dict(line.split(":\t") for line in status.splitlines() if "ctxt_switches" in line)
        vol = int(sw.get("voluntary_ctxt_switches", "0"))
        invol = int(sw.get("nonvoluntary_ctxt_switches", "0"))
        out[int(task.name)] = (run, delay, vol, invol)
    return out


Tasks = dict[int, tuple[int, int, int, int]]


def _delta(a: Tasks, b: Tasks) -> tuple[int, int, int, int, int]:
    tot = [0, 0, 0, 0]
    for tid, now in b.items():
        was = a.get(tid, (0, 0, 0, 0))
        for i in range(4):
            tot[i] += now[i] - was[i]
    return tot[0], tot[1], tot[2], tot[3], sum(1 for tid in b if tid not in a)


def _minflt(pid: int) -> int:
    """PID's minor page faults so far (all its threads)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def _hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    return 0


def _writer(path: Path, mib: int, bs: int = MiB) -> tuple[float, int, int]:
    """Write MIB MiB to PATH in BS-byte writes from a child process: (seconds, its run ns,
    its run delay ns)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: as dd bs=1M
        try:
            os.close(r)
            buf = b"\xa5" * bs  # touched, as dd's buffer (an untouched one splits WRITEs)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            t0 = time.perf_counter()
            for _ in range(mib * MiB // bs):
                os.write(fd, buf)
            os.close(fd)
            t = time.perf_counter() - t0
            stat = Path("/proc/thread-self/schedstat").read_text().split()
            os.write(w, f"{t} {stat[0]} {stat[1]}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    secs, run, delay = text.split()
    return float(secs), int(run), int(delay)


@contextlib.contextmanager
def _mounted(
    kind: str, lower: Path, root: Path, layerfs: str, env: dict[str, str]
) -> Iterator[tuple[Path, int | None]]:
    if kind == "kernel":
        tag = f"k-{len(list(root.iterdir()))}"
        upper, work, mnt = root / f"{tag}-upper", root / f"{tag}-work", root / f"{tag}-mnt"
        for d in (upper, work, mnt):
            d.mkdir()
        o = f"lowerdir={lower},upperdir={upper},workdir={work}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", o, str(mnt)], check=True)
        try:
            yield mnt, None
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        return
    old = dict(os.environ)
    os.environ.update(env)
    try:
        mnt, proc = requests.mount(kind, lower, root, layerfs, "")
    finally:
        os.environ.clear()
        os.environ.update(old)
    try:
        yield mnt, proc.pid
    finally:
        requests.umount(mnt, proc)


def _one(
    kind: str, lower: Path, root: Path, layerfs: str, env: dict[str, str], mib: int, bs: int
) -> dict[str, float]:
    with _mounted(kind, lower, root, layerfs, env) as (mnt, pid):
        out = mnt / "tmp" / "seqwrite"
        before = _tasks(pid) if pid else {}
        flt0 = _minflt(pid) if pid else 0
        counting = (
            requests.counting(os.stat(mnt).st_dev)
            if requests.available() is None
            else contextlib.nullcontext(collections.Counter[str]())  # no tracefs: not counted
        )
        with counting as counts:
            secs, wrun, wdelay = _writer(out, mib, bs)
        after = _tasks(pid) if pid else {}
        faults = _minflt(pid) - flt0 if pid else 0
        run, delay, vol, invol, new = _delta(before, after) if pid else (0, 0, 0, 0, 0)
        hwm = _hwm(pid) if pid else 0
        os.unlink(out)
    os.sync()
    return {
        "s": secs,
        "MB/s": mib * MiB / secs / 1e6,
        "writer run ms": wrun / 1e6,
        "writer delay ms": wdelay / 1e6,
        "daemon us/MiB": run / 1e3 / mib,
        "daemon delay us/MiB": delay / 1e3 / mib,
        "vol/MiB": vol / mib,
        "invol/MiB": invol / mib,
        "new threads": new,
        "faults/MiB": faults / mib,
        "req/MiB": sum(counts.values()) / mib,
        "hwm MiB": hwm / MiB,
        **{f"{op}/MiB": c / mib for op, c in counts.items()},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bs", type=int, default=1024, help="KiB a write (dd's bs)")
    p.add_argument("--targets", default="kernel,fuse-overlayfs,layerfs")
    p.add_argument("--variant", action="append", default=[], help="NAME:VAR=VALUE,...")
    p.add_argument("--busy", default="quiet,busy", help="quiet,busy or either")
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--layerfs", default=str(Path(sys.executable).with_name("layerfs")))
    args = p.parse_args()
    targets: list[tuple[str, str, dict[str, str]]] = [
        (t, t, {}) for t in args.targets.split(",") if t
    ]
    for v in args.variant:
        name, _, spec = v.partition(":")
        env = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
        targets.append((name, "layerfs", env))
    root = Path(tempfile.mkdtemp(prefix="layerfs-seqwrite-", dir=args.dir))
    lower = root / "lower"
    (lower / "tmp").mkdir(parents=True)
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        with warm_host_memory() as hm:  # the written pages not faulted back from the host
            print(describe(hm.to_json()), flush=True)
            _rounds(args, targets, lower, root, results, hm.refresh)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    _report(args, results)
    return 0


def _rounds(
    args: argparse.Namespace,
    targets: list[tuple[str, str, dict[str, str]]],
    lower: Path,
    root: Path,
    results: dict[tuple[str, str], list[dict[str, float]]],
    refresh: Callable[[], float | None],
) -> None:
    for rnd in range(args.rounds):
        for mode in args.busy.split(","):
            hogs = max(0, (os.cpu_count() or 1) - 1) if mode == "busy" else 0
            with busy_host(hogs):
                for name, kind, env in targets if rnd % 2 == 0 else targets[::-1]:
                    refresh()  # touched again once half of min_free_ms has passed
                    r = _one(kind, lower, root, args.layerfs, env, args.mib, args.bs << 10)
                    results.setdefault((mode, name), []).append(r)
                    print(mode, name, {k: round(v, 2) for k, v in r.items()}, flush=True)


def _report(
    args: argparse.Namespace, results: dict[tuple[str, str], list[dict[str, float]]]
) -> None:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\n# {args.mib} MiB a run in {args.bs} KiB writes, {args.rounds} rounds, medians;", end=""
    )
    print(f" load average now {load}")
    keys = list(dict.fromkeys(k for rs in results.values() for r in rs for k in r))
    print("| mode | target | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 2) + "|")
    for (mode, name), rs in results.items():
        med = [statistics.median(r.get(k, 0.0) for r in rs) for k in keys]
        print(f"| {mode} | {name} | " + " | ".join(f"{m:.2f}" for m in med) + " |")


if __name__ == "__main__":
    sys.exit(main())

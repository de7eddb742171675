"""Where a request's daemon CPU goes: ``python -m benchmarks.loopprof``.

Mounts layerfs in the foreground (``layerfs mount -f``, optionally under a wrapper such as
``valgrind --tool=callgrind``), runs one of ``benchmarks.requests``' workloads (failed
lookups, creates, unlinks, an untar of N files, a ``dd bs=1M`` of N MiB: ``--op seq-write``,
``chmod -R`` of N lower files: a copy-up each) on it and measures only that workload, with the
requests counted by the kernel (``benchmarks.requests.counting``) to divide by:

- ``--tool cpu``: the daemon's user+sys CPU per request (/proc/PID/stat);
- ``--tool strace``: ``strace -c -f`` of the daemon, syscalls per request;
- ``--tool perf``: ``perf record -g`` of the daemon into DIR/OP.perf (``--out``);
- ``--tool perfstat``: ``perf stat -e task-clock`` of the daemon;
- ``--tool pyspy``: ``py-spy record --native --gil`` (raw) into DIR/OP.txt;
- ``--tool callgrind``: the daemon runs under ``valgrind --tool=callgrind
  --instr-atstart=no``; collection is switched on for the workload alone
  (``callgrind_control -i on/off``), the profile dumped into DIR/callgrind.out.OP. Load does
  not change instruction counts: ``callgrind_annotate`` divided by the request count is the
  instructions per request, split by function.

Environment for the daemon (``LAYERFS_LOOP=...``) is passed with ``--env NAME=VALUE``.
Root only (mounts, tracefs). docs/benchmarks.md, session 11 (loopprof).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import requests


def _mount(
    lower: Path, root: Path, layerfs: str, wrap: list[str], env: dict[str, str], opts: str
) -> tuple[Path, subprocess.Popen[bytes]]:
    tag = f"m{len(list(root.iterdir()))}"
    pre, post = ([], wrap) if wrap[:1] == ["-m"] else (wrap, [])
    upper, work, mnt = root / f"{tag}-upper", root / f"{tag}-work", root / f"{tag}-mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    cmd = [*pre, sys.executable, *post, layerfs, "mount", "-f", str(lower), str(upper), str(mnt)]
    cmd += ["--workdir", str(work)] + (["-o", opts] if opts else [])
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env}
    )
    # under valgrind the start takes a minute
    return requests.wait_mounted(root, mnt, proc, "layerfs", tries=6000, interval=0.05)


def _handled(mnt: Path) -> dict[str, int]:
    """The requests the daemon of MNT counted, by opcode (its req_ statistics)."""
    stats = json.loads(os.getxattr(mnt, "trusted.layerfs.statistics"))
    return {k[4:].upper(): v for k, v in stats.items() if k.startswith("req_")}


def run_ns(pid: int) -> int:
    """The CPU time of PID's live threads, in ns (schedstat: not rounded to clock ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread gone meanwhile
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ops = ("failed", "create", "unlink", "untar", "seq-write", "chmod")
    p.add_argument("--op", default="failed", choices=ops)
    p.add_argument("--n", type=int, default=3000, help="files, lookups; MiB for seq-write")
    p.add_argument("--tool", default="cpu")
    p.add_argument("--out", default=".")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("-o", dest="opts", default="", help="mount options (fsync=volatile, ...)")
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--layerfs", default=str(Path(sys.executable).with_name("layerfs")))
    args = p.parse_args()
    env = dict(e.split("=", 1) for e in args.env)
    out = Path(args.out).resolve()
    wrap: list[str] = []
    if args.tool == "callgrind":
        wrap = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
        wrap += [f"--callgrind-out-file={out}/callgrind.out.{args.op}"]
    elif args.tool == "cprofile":  # every Python call of the daemon's life: counts per request
        wrap = ["-m", "cProfile", "-o", f"{out}/cprofile.{args.op}"]
    root = Path(tempfile.mkdtemp(prefix="layerfs-loopprof-", dir=args.dir))
    try:
        lower = requests.make_tree(root, args.n if args.op == "untar" else 1)  # N files
        setup, run, _units = requests.workloads(
            args.n, args.n, root / "files.tar", lower if args.op == "chmod" else None
        )[args.op]
        mnt, proc = _mount(lower, root, args.layerfs, wrap, env, args.opts)
        tool: subprocess.Popen[bytes] | None = None
        try:
            setup(mnt)
            pid = str(proc.pid)
            if args.tool == "strace":
                cmd = ["strace", "-c", "-f", "-p", pid, "-o", f"{out}/strace.{args.op}"]
            elif args.tool == "perf":
                cmd = ["perf", "record", "-F", "2000", "-g", "-p", pid]
                cmd += ["-o", f"{out}/{args.op}.perf"]
            elif args.tool == "perfstat":
                cmd = ["perf", "stat", "-e", "task-clock", "-p", pid]
                cmd += ["-o", f"{out}/perfstat.{args.op}"]
            elif args.tool == "pyspy":
                spy = str(Path(sys.executable).with_name("py-spy"))
                cmd = [spy, "record", "-p", pid, "-r", "1000", "-f", "raw", "--gil", "--native"]
                cmd += ["-o", f"{out}/{args.op}.txt"]
            elif args.tool == "callgrind":
                cmd = ["callgrind_control", "-i", "on", pid]
            else:
                cmd = []
            if cmd:
                if args.tool == "callgrind":
                    subprocess.run(cmd, check=True)
                else:
                    quiet = subprocess.DEVNULL
                    tool = subprocess.Popen(cmd, stdout=quiet, stderr=quiet)
                    time.sleep(1.0)  # attached
            cpu0, ns0 = requests.cpu_seconds(proc.pid), run_ns(proc.pid)
            traced = requests.available() is None
            before = {} if traced else _handled(mnt)
            counting = (
                requests.counting(os.stat(mnt).st_dev)
                if traced
                else contextlib.nullcontext(collections.Counter[str]())
            )
            with counting as counts:
                run(mnt)
            if not traced:  # no tracefs: the daemon's own counts (kernel-side FORGETs not)
                after = _handled(mnt)
                counts.update({k: after[k] - before.get(k, 0) for k in after})
            cpu, ns = requests.cpu_seconds(proc.pid) - cpu0, run_ns(proc.pid) - ns0
            if args.tool == "callgrind":
                subprocess.run(["callgrind_control", "-i", "off", pid], check=True)
            stats = json.loads(os.getxattr(mnt, "trusted.layerfs.statistics"))
            waits = {k: v for k, v in stats.items() if k.startswith(("loop_", "req_"))}
            if tool is not None:
                tool.send_signal(signal.SIGINT)
                tool.wait()
        finally:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
            try:
                proc.wait(300)  # valgrind writes its profile at the exit
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if tool is not None and tool.poll() is None:
                tool.kill()
                tool.wait()
        total = sum(counts.values())
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        what = f"{args.op} x {args.n}, tool {args.tool}, env {env}, -o {args.opts!r}"
        print(f"# {what}; load average {load}")
        print(f"requests {total} ({dict(counts.most_common())}); the daemon's waits {waits}")
        per = f"{cpu / max(total, 1) * 1e6:.1f} us per request"
        print(f"daemon CPU {cpu * 1e3:.0f} ms, {per}; schedstat {ns / max(total, 1) / 1e3:.1f} us")
        if args.tool == "strace":
            print((out / f"strace.{args.op}").read_text())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

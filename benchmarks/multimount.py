"""Prototype: one process serving several mounts (issue 17's memory goal), measured.

Not the product: a throwaway server shaped like the fork server (layerfs.forkserver), so that
its figures compare with the pss row's. A parent imports what a daemon imports
(``layerfs.mount._preload``), freezes the collector and forks P children; each child serves
K = MOUNTS / P mounts of the base stack (3 layers, a fresh upper each), every mount on its
own thread with its own ``trio.run``. pyfuse3 keeps its session in its extension's C globals,
so the child's first mount uses the imported pyfuse3 and each further mount a private copy of
the extension file (``copy-N.so``, made once per run in a directory of the parent's, shared by
every child's Nth mount: its text pages are one file's page cache), loaded under the name
``pyfuse3`` (a fresh dlopen: fresh globals, a fresh ``pyfuse3._pyfuse3``, so each mount has its
own FUSEError, Operations and EntryAttributes), and a fresh ``layerfs.ops`` imported against
it (ops names ``pyfuse3`` at module level). The engine (layerfs.overlay and below) is shared.

K = 1 is today's layout (a forked daemon a mount) measured the same way.

- ``pss``: MOUNTS mounts, each read once as the pss row reads (benchmarks.scenarios.mounting.
  read_once), then the PSS of the children and the parent (smaps_rollup) per mount; and the
  time a child took to add each mount (setup until its root answers a stat).
- ``busy``: B mounts, each with a client process doing N failed lookups (unique names) or N
  creates of 4 KiB files at once: the clients' wall time, and the serving processes' CPU
  (user+sys of every thread) per request, for K = 1 (B daemons) and K = B (one process).

Run as root: ``python -m benchmarks.multimount pss --per-process 1 5 10 20``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Any

from benchmarks.dataset import DEFAULT_DATA_DIR
from benchmarks.scenarios.mounting import read_once
from benchmarks.system import cpu_seconds, pss_kib

LAYERS = DEFAULT_DATA_DIR / "full" / "layers"


# --- the serving child ----------------------------------------------------------------------


def load_pyfuse3_copy(path: str) -> tuple[types.ModuleType, types.ModuleType]:
    """A private pyfuse3 (extension at PATH, a copy of the real one) and a layerfs.ops bound
    to it: the option's own loader (layerfs.share.load_copy)."""
    from layerfs.share import load_copy

    return load_copy(path)


def serve_one(
    fuse: types.ModuleType,
    opsmod: types.ModuleType,
    config: Any,
    fuse_fd: int,
    live: threading.Event,
    failed: list[BaseException],
) -> None:
    """One mount's thread: what layerfs.mount._session and _run do, without signals (only the
    main thread may take them). LIVE is set once it serves, or with FAILED holding why not."""
    import trio

    from layerfs import mount, premount
    from layerfs.overlay import Overlay

    try:
        overlay = Overlay(config)
        ops = opsmod.Operations(overlay)
        fuse.init(ops, f"/dev/fd/{fuse_fd}", premount.options(config))
        overlay.copyup.requests_waiting = mount._readable(fuse_fd)
        ops.skip_open_requests()
        if ops.hooks is None:
            raise RuntimeError("fusehooks not installed on the copy")
    except BaseException as e:
        failed.append(e)
        live.set()
        premount.unmount_lazy(config.mountpoint)
        raise

    async def main() -> None:
        ops.answer_init()
        live.set()
        await fuse.main()

    try:
        trio.run(main)
    finally:
        fuse.close(unmount=False)
        overlay.close()


def child(
    mounts: list[tuple[str, str, str]],
    copies: list[str],
    report: int,
    loaded: list[tuple[types.ModuleType, types.ModuleType]],
    lowers: tuple[str, ...],
) -> int:
    """Serve MOUNTS (mountpoint, upper, workdir) on threads; write one JSON line per mount to
    REPORT (its setup time), then "ready"; return once every mount is gone."""
    import pyfuse3

    import layerfs.ops
    from layerfs import mount
    from layerfs.config import MountConfig

    os.chdir("/")
    mount._raise_fd_limit()
    os.umask(0)
    threads = []
    out = os.fdopen(report, "w", buffering=1)
    for i, (point, upper, work) in enumerate(mounts):
        t0 = time.perf_counter()
        if i == 0:
            fuse, opsmod = pyfuse3, layerfs.ops
        elif loaded:
            fuse, opsmod = loaded[i - 1]
        else:
            fuse, opsmod = load_pyfuse3_copy(copies[i - 1])
        t_load = time.perf_counter() - t0
        config = MountConfig(lowers, point, upper, work).validate()
        fuse_fd, _lock = mount._mount(config)
        live = threading.Event()
        failed: list[BaseException] = []
        args = (fuse, opsmod, config, fuse_fd, live, failed)
        t = threading.Thread(target=serve_one, args=args)
        t.start()
        live.wait()
        if failed:
            raise RuntimeError(f"mount {i} not served") from failed[0]
        os.stat(point)  # the root answers: the mount is live
        threads.append(t)
        took = time.perf_counter() - t0
        out.write(json.dumps({"mount": i, "s": took, "load_s": t_load}) + "\n")
    out.write("ready\n")
    out.close()
    for t in threads:
        t.join()
    return 0


# --- the parent -----------------------------------------------------------------------------


class Server:
    """The parent: everything imported, then one child per group of mounts."""

    def __init__(
        self,
        work: Path,
        mounts: int,
        per_process: int,
        preload_copies: bool = False,
        layers: Path = LAYERS,
    ):
        from layerfs import mount

        mount._preload()
        import pyfuse3

        self.copydir = Path(tempfile.mkdtemp(prefix="copies-", dir=work))
        self.copies = []
        for n in range(1, per_process):
            dst = self.copydir / f"copy-{n}.so"
            shutil.copyfile(pyfuse3.__file__, dst)
            self.copies.append(str(dst))
        # the copies imported here, before the fork, shared by the children as the rest is
        loaded = [load_pyfuse3_copy(c) for c in self.copies] if preload_copies else []
        self.points: list[Path] = []
        self.children: list[int] = []
        self.setup: list[dict[str, float]] = []
        lowers = tuple(str(layers / name) for name in ("l2", "l1", "l0"))
        gc.freeze()
        try:
            self._start(work, mounts, per_process, loaded, lowers)
        except BaseException:
            self.close()  # the mounts made so far, dead or alive
            raise

    def _start(
        self,
        work: Path,
        mounts: int,
        per_process: int,
        loaded: list[tuple[types.ModuleType, types.ModuleType]],
        lowers: tuple[str, ...],
    ) -> None:
        for first in range(0, mounts, per_process):
            group = []
            for i in range(first, min(first + per_process, mounts)):
                d = work / f"m{i:03d}"
                for sub in ("mnt", "upper", "work"):
                    (d / sub).mkdir(parents=True)
                group.append((str(d / "mnt"), str(d / "upper"), str(d / "work")))
                self.points.append(d / "mnt")
            r, w = os.pipe()
            t0 = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(r)
                    gc.enable()
                    code = child(group, self.copies, w, loaded, lowers)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    os._exit(code)
            os.close(w)
            self.children.append(pid)
            with os.fdopen(r) as f:
                for line in f:
                    if line.strip() == "ready":
                        break
                    rec = json.loads(line)
                    rec["since_fork_s"] = time.perf_counter() - t0
                    self.setup.append(rec)
                else:
                    raise RuntimeError("a child died before its mounts were live")

    def pss_per_mount(self) -> float:
        total = pss_kib(os.getpid()) + sum(pss_kib(p) for p in self.children)
        return total / 1024 / len(self.points)

    def cpu(self) -> float:
        return sum(cpu_seconds(p) or 0.0 for p in self.children)

    def close(self) -> None:
        for p in self.points:
            subprocess.run(["fusermount3", "-u", "-z", str(p)], check=False, capture_output=True)
        for pid in self.children:
            os.waitpid(pid, 0)


def _pss(args: argparse.Namespace) -> None:
    for k in args.per_process:
        work = Path(tempfile.mkdtemp(prefix="mm-", dir=args.work))
        # the measurement in a child of ours: the parent then is a fresh process each time
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                srv = Server(work, args.mounts, k, args.preload_copies, args.layers)
                try:
                    for p in srv.points:
                        read_once(p)
                    time.sleep(1)
                    pss = srv.pss_per_mount()
                    first = [r["s"] for r in srv.setup if r["mount"] == 0]
                    extra = [r["s"] for r in srv.setup if r["mount"] > 0]
                    load = [r["load_s"] for r in srv.setup if r["mount"] > 0]
                    row = {
                        "per_process": k,
                        "preload_copies": args.preload_copies,
                        "processes": len(srv.children),
                        "mounts": len(srv.points),
                        "pss_mib_per_mount": round(pss, 2),
                        "first_mount_ms": [round(s * 1000, 1) for s in first],
                        "fork_to_first_live_ms": [
                            round(r["since_fork_s"] * 1000, 1) for r in srv.setup if r["mount"] == 0
                        ],
                        "extra_mount_ms": [round(s * 1000, 1) for s in extra],
                        "extra_load_ms": [round(s * 1000, 1) for s in load],
                        "loadavg": os.getloadavg()[0],
                    }
                    print(json.dumps(row), flush=True)
                finally:
                    srv.close()
                code = 0
            finally:
                os._exit(code)
        failed = os.waitpid(pid, 0)[1] != 0
        shutil.rmtree(work, ignore_errors=True)
        if failed:
            raise SystemExit(f"the run of {k} mounts a process failed")


def _client(point: Path, op: str, n: int, tag: str) -> None:
    if op == "lookup":
        for i in range(n):
            try:
                os.stat(point / "usr" / f"nope-{tag}-{i}")
            except FileNotFoundError:
                pass
    else:
        data = b"x" * 4096
        d = point / f"c-{tag}"
        d.mkdir()
        for i in range(n):
            fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)
        if len(os.listdir(d)) != n or os.stat(d / "f0").st_size != len(data):
            raise RuntimeError(f"{d}: not what was written")


def _busy(args: argparse.Namespace) -> None:
    for rnd in range(args.rounds):
        for k in args.per_process:
            work = Path(tempfile.mkdtemp(prefix="mmb-", dir=args.work))
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(r)
                    srv = Server(work, args.mounts, k, args.preload_copies, args.layers)
                    try:
                        cpu0 = srv.cpu()
                        t0 = time.perf_counter()
                        clients = []
                        for j, p in enumerate(srv.points):
                            c = os.fork()
                            if c == 0:
                                ok = 1
                                try:
                                    _client(p, args.op, args.n, f"{rnd}-{j}")
                                    ok = 0
                                finally:
                                    os._exit(ok)
                            clients.append(c)
                        for c in clients:
                            if os.waitpid(c, 0)[1] != 0:
                                raise RuntimeError("a client failed")
                        wall = time.perf_counter() - t0
                        cpu = srv.cpu() - cpu0
                        reqs = args.n * len(srv.points)
                        row = {
                            "op": args.op,
                            "round": rnd,
                            "per_process": k,
                            "busy_mounts": len(srv.points),
                            "wall_s": round(wall, 3),
                            "daemon_cpu_us_per_op": round(cpu / reqs * 1e6, 1),
                            "wall_us_per_op_per_mount": round(wall / args.n * 1e6, 1),
                            "loadavg": os.getloadavg()[0],
                        }
                        os.write(w, (json.dumps(row) + "\n").encode())
                    finally:
                        srv.close()
                    code = 0
                finally:
                    os._exit(code)
            os.close(w)
            with os.fdopen(r) as f:
                sys.stdout.write(f.read())
                sys.stdout.flush()
            failed = os.waitpid(pid, 0)[1] != 0
            shutil.rmtree(work, ignore_errors=True)
            if failed:
                raise SystemExit(f"the run of {k} mounts a process failed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["pss", "busy"])
    ap.add_argument("--mounts", type=int, default=20)
    ap.add_argument("--per-process", type=int, nargs="+", default=[1, 5, 10, 20])
    ap.add_argument("--work", default="/var/tmp")
    ap.add_argument("--op", choices=["lookup", "create"], default="lookup")
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument(
        "--preload-copies", action="store_true", help="the parent imports the copies, not a child"
    )
    ap.add_argument(
        "--layers", type=Path, default=LAYERS, help="a directory of lowers l0 (bottom), l1, l2"
    )
    args = ap.parse_args()
    if not args.layers.is_dir():
        raise SystemExit(f"no layers at {args.layers} (python -m benchmarks builds them)")
    (_pss if args.what == "pss" else _busy)(args)


if __name__ == "__main__":
    main()

"""The run loop: for each round, for each scenario, each target in turn (the order rotates so
no target always goes first) gets a fresh mount, the scenario runs in a forked child (so a
hung FUSE daemon can be aborted without hanging the harness), and the mount is taken down.
Results: median and p95 per metric and target, a table of ratios to kernel overlayfs, JSON."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import dataset as dataset_mod
from benchmarks.dataset import Dataset
from benchmarks.hostmem import HostMemory, describe, warm_host_memory
from benchmarks.model import Measurement, Mounted, Scenario, Skip
from benchmarks.scenarios import MODULES, all_scenarios
from benchmarks.system import (
    busy_host,
    can_drop_caches,
    cpu_seconds,
    detach,
    drop_caches,
    fuse_abort,
    fuse_requests,
    machine_info,
    mounts_under,
    spread_subdirs,
)
from benchmarks.targets import Target

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA = 1
MAX_TIMEOUTS = 3
TRASH = "trash"  # work directories of finished runs, removed when the whole run ends
BIG_FILE = 1 << 20  # removed at once: few inodes, much space


def remove_big_files(root: Path) -> None:
    """Unlink the regular files of ROOT of BIG_FILE bytes or more."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and st.st_size >= BIG_FILE:
                    os.unlink(path)


def say(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class Cell:
    """What one target did on one scenario, over all rounds."""

    metrics: dict[str, Measurement] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    skipped: str | None = None
    wall: float = 0.0  # seconds spent on it, mount to cleanup (to plan runs)

    def add(self, m: Measurement) -> None:
        if m.metric in self.metrics:
            self.metrics[m.metric].samples.extend(m.samples)
        else:
            self.metrics[m.metric] = Measurement(m.metric, list(m.samples), m.unit)


@dataclass
class Results:
    size: str
    rounds: int
    targets: list[str]
    scenarios: list[Scenario]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)  # (scenario, target)
    info: dict[str, object] = field(default_factory=dict)

    def cell(self, scenario: str, target: str) -> Cell:
        return self.cells.setdefault((scenario, target), Cell())

    def rows(self) -> list[tuple[Scenario, str, str]]:
        """(scenario, metric, unit) in table order; a scenario without any metric yet gets
        one row under its own name."""
        out: list[tuple[Scenario, str, str]] = []
        for sc in self.scenarios:
            seen: dict[str, str] = {}
            for t in self.targets:
                for name, m in self.cell(sc.name, t).metrics.items():
                    seen.setdefault(name, m.unit)
            if not seen:
                seen[sc.name] = "s"
            out.extend((sc, name, unit) for name, unit in seen.items())
        return out


def p95(samples: list[float]) -> float:
    s = sorted(samples)
    if len(s) == 1:
        return s[0]
    # Nearest-rank on the sorted samples (with 3 samples that is the largest).
    return s[min(len(s) - 1, max(0, round(0.95 * len(s) + 0.5) - 1))]


def summarise(samples: list[float]) -> dict[str, float | int]:
    return {
        "median": statistics.median(samples),
        "p95": p95(samples),
        "min": min(samples),
        "n": len(samples),
    }


# --- running one scenario on one target -------------------------------------------------------


def daemon_cpu(
    sc: Scenario, mnt: Mounted, cpu0: float | None, req0: int | None
) -> list[Measurement]:
    """The FUSE daemon's CPU time (user + system, all threads) over the scenario's run, and,
    where the daemon counts its requests (layerfs), the CPU time per request: what a busy
    host runs short of, visible even when the wall clock is noisy."""
    cpu1 = cpu_seconds(mnt.pid) if mnt.pid and cpu0 is not None else None
    if cpu0 is None or cpu1 is None:
        return []
    out = [Measurement(f"{sc.name}: daemon CPU", [cpu1 - cpu0])]
    req1 = fuse_requests(mnt.path) if req0 is not None else None
    if req0 is not None and req1 is not None and req1 > req0 + 1:
        per = (cpu1 - cpu0) / (req1 - req0 - 1)  # less the statistics read itself
        out.append(Measurement(f"{sc.name}: daemon CPU/request", [per * 1e6], "µs"))
    return out


def run_in_child(sc: Scenario, mnt: Mounted, timeout: float) -> list[Measurement]:
    """Run ``sc.run(mnt)`` in a forked child; abort the FUSE connection if it hangs."""
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rfd)
        os.setpgid(0, 0)
        try:
            payload: dict[str, object] = {"ok": [m.to_json() for m in sc.run(mnt)]}
        except Skip as e:
            payload = {"skip": str(e)}
        except BaseException as e:
            tb = traceback.extract_tb(e.__traceback__)
            where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
            payload = {"error": f"{type(e).__name__}: {e}{where}"}
        data = json.dumps(payload).encode()
        with os.fdopen(wfd, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(wfd)
    try:
        return _collect(pid, rfd, mnt, timeout)
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM): take the child and its commands down with us.
        try:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        raise


def _collect(pid: int, rfd: int, mnt: Mounted, timeout: float) -> list[Measurement]:
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    timed_out = False
    with os.fdopen(rfd, "rb", buffering=0) as f:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([f], [], [], min(left, 1.0))
            if ready:
                chunk = f.read(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    if timed_out:
        fuse_abort(mnt.fuse_conn)  # unblocks the child if it waits on a hung daemon
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        raise TimeoutError(f"no result after {timeout:.0f} s (killed)")
    os.waitpid(pid, 0)
    if not chunks:
        raise RuntimeError("the scenario process died without a result")
    result: dict[str, Any] = json.loads(b"".join(chunks))
    if "skip" in result:
        raise Skip(result["skip"])
    if "error" in result:
        raise RuntimeError(result["error"])
    return [Measurement.from_json(m) for m in result["ok"]]


class Runner:
    def __init__(
        self,
        ds: Dataset,
        targets: list[Target],
        workroot: Path,
        *,
        cold_ok: bool,
        profile_dir: Path | None = None,
        hostmem: HostMemory | None = None,
    ):
        self.ds = ds
        self.hostmem = hostmem
        self.profile_dir = profile_dir
        self.round = 0
        self.targets = targets
        self.workroot = workroot
        self.cold_ok = cold_ok
        self.n = 0
        self.timeouts: dict[str, int] = {}  # a target that hangs this often is given up

    def once(self, target: Target, sc: Scenario, cell: Cell) -> str:
        """One fresh mount, one run. Returns a short status for the progress line."""
        if self.hostmem is not None and (took := self.hostmem.refresh()) is not None:
            say(f"  host memory: pre-touched again ({took:.1f} s)")
        self.n += 1
        t0 = time.monotonic()
        work = self.workroot / f"{self.n:05d}-{target.name}"
        work.mkdir(parents=True)
        mnt: Mounted | None = None
        resident: Mounted | None = None
        status = ""
        try:
            if sc.resident and target.fuse:
                (work / "resident").mkdir()
                resident = target.mount(self.ds, sc, work / "resident")
            mnt = target.mount(self.ds, sc, work)
            mnt.work = work
            if resident is not None:
                mnt.others.append(resident)  # unmounted with the others
                resident = None
            try:
                mnt.mount_program = target.podman_mount_program()
                mnt.podman = True
            except Skip:
                pass
            if mnt.pid is not None:  # several mounts at once: of daemons (PSS per mount)
                for i in range(1, sc.mounts):
                    extra = work / f"extra{i:03d}"
                    extra.mkdir()
                    mnt.others.append(target.mount(self.ds, sc, extra))
            if sc.writable:
                os.sync()  # the native copy's writeback must not land inside the timing
            if sc.cold and self.cold_ok:
                drop_caches(3)
            spy = self.start_profile(mnt, sc)
            cpu0 = cpu_seconds(mnt.pid) if mnt.pid and sc.daemon_cpu else None
            req0 = fuse_requests(mnt.path) if cpu0 is not None else None
            try:
                timeout = max(self.ds.params.timeout, sc.timeout or 0)
                measurements = run_in_child(sc, mnt, timeout)
            finally:
                stop_profile(spy)
            measurements += daemon_cpu(sc, mnt, cpu0, req0)
            for m in measurements:
                cell.add(m)
                status += f" {m.metric}={fmt_value(m.samples[-1], m.unit)}"
        except Skip as e:
            cell.skipped = str(e)
            status = f" skipped: {e}"
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
            cell.errors.append(msg)
            if isinstance(e, TimeoutError | subprocess.TimeoutExpired):
                self.timeouts[target.name] = self.timeouts.get(target.name, 0) + 1
            status = f" ERROR {msg[:300]}"
        finally:
            if mnt is not None and mnt.path != self.ds.stack_native(sc.stack):
                for one in [*mnt.others, mnt]:
                    try:
                        target.umount(one)
                    except Exception as e:
                        cell.errors.append(f"umount: {e}")
                        status += f" (umount ERROR {str(e)[:200]})"
            if resident is not None:  # the run's own mount failed
                try:
                    target.umount(resident)
                except Exception as e:
                    cell.errors.append(f"umount: {e}")
            if sc.writable:
                os.sync()  # write-back of this run must not land in the next one
            self.cleanup(work)
            cell.wall += time.monotonic() - t0
        return f"{status} [{time.monotonic() - t0:.1f} s]"

    def start_profile(self, mnt: Mounted, sc: Scenario) -> subprocess.Popen[bytes] | None:
        """py-spy on a Python daemon for the length of one run (``--profile DIR``)."""
        pyspy = Path(sys.executable).parent / "py-spy"
        pyspy_cmd = str(pyspy) if pyspy.exists() else shutil.which("py-spy")
        if self.profile_dir is None or mnt.pid is None or not pyspy_cmd:
            return None
        try:
            exe = os.readlink(f"/proc/{mnt.pid}/exe")
        except OSError:
            return None
        if "python" not in Path(exe).name:
            return None  # py-spy reads Python stacks only
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        out = self.profile_dir / f"r{self.round + 1}-{sc.name}-{mnt.target}.svg"
        spy = subprocess.Popen(
            [
                pyspy_cmd,
                "record",
                "--pid",
                str(mnt.pid),
                "--rate",
                "250",
                "--nonblocking",
                "--format",
                "flamegraph",
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # py-spy samples only once attached
        return spy

    def cleanup(self, work: Path, *, defer: bool = True) -> None:
        """Unmount and remove WORK. DEFER: remove only its big files now and park the rest in
        the trash until the run ends: on ext4 without a journal, thousands of inodes deleted in
        the last minutes make every create in their block group scan them (recently_deleted),
        so a target measured after another's cleanup would pay for it."""
        # the mount, the extra mounts, a private podman store's: deepest first
        for mnt in mounts_under(work):
            detach(mnt)
        left = mounts_under(work)
        if left:
            say(f"  warning: {left[0]} is still mounted; leaving {work} in place")
            return
        if defer and work.name != TRASH:
            remove_big_files(work)
            trash = self.workroot / TRASH
            try:
                trash.mkdir(exist_ok=True)
                work.rename(trash / work.name)
                return
            except OSError as e:  # cannot park it: remove it now rather than fail the run
                say(f"  warning: cannot move {work} to the trash ({e.strerror}); removing it")
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)

    def check_tree(self, target: Target, stack: str) -> str:
        """Compare the mounted tree's names, types and sizes with the native reference."""
        probe = Scenario(f"check-{stack}", "tree check", lambda m: [], stack=stack)
        work = self.workroot / f"check-{stack}-{target.name}"
        work.mkdir(parents=True)
        mnt: Mounted | None = None
        try:
            mnt = target.mount(self.ds, probe, work)
            got = dataset_mod.tree_listing(mnt.path)
        except Exception as e:
            return f"error: {e}"
        finally:
            if mnt is not None and target.name != "native":
                try:
                    target.umount(mnt)
                except Exception as e:
                    say(f"  umount after check: {e}")
            self.cleanup(work)
        want = self.ds.tree_listing(stack)
        if got == want:
            return "ok"
        extra = sorted(set(got) - set(want))
        missing = sorted(set(want) - set(got))
        return (
            f"MISMATCH: {len(extra)} unexpected, {len(missing)} missing; "
            f"e.g. +{extra[:3]} -{missing[:3]}"
        )


def stop_profile(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is None:
        return
    spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        spy.wait(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


# --- the run ----------------------------------------------------------------------------------


def select_scenarios(ds: Dataset, only: list[str] | None) -> list[Scenario]:
    chosen = []
    for sc in all_scenarios():
        if ds.params.name not in sc.sizes:
            continue
        if only and not any(sc.name.startswith(o) for o in only):
            continue
        if sc.explicit and not (only and sc.name in only):
            continue
        chosen.append(sc)
    if only and not chosen:
        names = ", ".join(s.name for s in all_scenarios())
        raise SystemExit(f"--only {only} matches no scenario; known: {names}")
    return chosen


def run_benchmarks(
    ds: Dataset,
    targets: list[Target],
    *,
    rounds: int,
    only: list[str] | None,
    out: Path,
    check: bool,
    profile_dir: Path | None = None,
    budget: float | None = None,
    busy: bool = False,
    warm_memory: bool = True,
) -> Results:
    """Run every scenario on every target, ROUNDS times; with BUSY, on a busy host: a CPU hog
    on every core but one for the whole run (busy_host). WARM_MEMORY: free pages kept
    host-backed for the run, where the VM gives them back (benchmarks.hostmem)."""
    hogs = max(0, (os.cpu_count() or 1) - 1) if busy else 0
    scenarios = select_scenarios(ds, only)
    for mod in MODULES:
        if any(sc in scenarios for sc in mod.SCENARIOS):
            mod.prepare(ds)
    with busy_host(hogs), warm_host_memory(warm_memory) as hm:
        say(describe(hm.to_json()))
        return _run_benchmarks(
            ds, targets, scenarios, rounds, out, check, profile_dir, budget, hogs, hm
        )


def _run_benchmarks(
    ds: Dataset,
    targets: list[Target],
    scenarios: list[Scenario],
    rounds: int,
    out: Path,
    check: bool,
    profile_dir: Path | None,
    budget: float | None,
    hogs: int,
    hm: HostMemory,
) -> Results:
    cold_ok = can_drop_caches()
    res = Results(ds.params.name, rounds, [t.name for t in targets], scenarios)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    res.info = {
        "schema": SCHEMA,
        "started": started,
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks", *sys.argv[1:]]),
        "machine": machine_info(ds.root),
        "cache_drop": "echo 3 > /proc/sys/vm/drop_caches before cold runs"
        if cold_ok
        else "unavailable: cold runs are not cold",
        "dataset": {"path": str(ds.root), **ds.meta},
        "busy_host": f"{hogs} CPU hog(s) spinning for the whole run" if hogs else "no",
        "host_memory": hm.to_json(),
        "target_info": {},
    }
    workroot = ds.root.parent / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    workroot.mkdir(parents=True)
    res.info["workroot_spread"] = spread_subdirs(workroot)
    runner = Runner(ds, targets, workroot, cold_ok=cold_ok, profile_dir=profile_dir, hostmem=hm)
    target_info: dict[str, dict[str, object]] = {}
    for t in targets:
        info: dict[str, object] = {"version": t.version()}
        if check:
            stacks = ["base", f"s{max(ds.params.stack_depths)}"]
            for stack in stacks:
                info[f"tree_check_{stack}"] = verdict = runner.check_tree(t, stack)
                say(f"tree check {t.name:15s} {stack:5s} {verdict}")
        target_info[t.name] = info
    res.info["target_info"] = target_info
    say(
        f"{len(scenarios)} scenarios x {len(targets)} targets x {rounds} rounds; work in {workroot}"
    )
    t_start = time.monotonic()
    res.info["rounds_done"] = 0
    try:
        for r in range(rounds):
            elapsed = time.monotonic() - t_start
            if budget is not None and r > 0 and elapsed + elapsed / r > budget:
                say(f"stopping after {r} round(s): another would pass the time budget")
                break
            runner.round = r
            for i, sc in enumerate(scenarios):
                reason = sc.requires(ds) if sc.requires else None
                if reason:
                    for t in targets:
                        res.cell(sc.name, t.name).skipped = reason
                    if r == 0:
                        say(f"[{r + 1}/{rounds}] {sc.name:22s} skipped: {reason}")
                    continue
                for p in range(sc.passes):
                    shift = (r + i + p) % len(targets)
                    for t in targets[shift:] + targets[:shift]:
                        cell = res.cell(sc.name, t.name)
                        if runner.timeouts.get(t.name, 0) >= MAX_TIMEOUTS:
                            cell.errors.append(f"not run: {MAX_TIMEOUTS} timeouts earlier")
                            continue
                        status = runner.once(t, sc, cell)
                        say(f"[{r + 1}/{rounds}] {sc.name:22s} {t.name:15s}{status}")
            res.info["rounds_done"] = r + 1
            res.info["host_memory"] = hm.to_json()
            write_json(res, out, finished=False)
    finally:
        # Per directory, so nothing is deleted through a mount that is still live.
        for child in workroot.iterdir():
            runner.cleanup(child, defer=False)
        for d in (workroot, workroot.parent):
            try:
                d.rmdir()
            except OSError:
                pass
    res.info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    res.info["host_memory"] = hm.to_json()
    write_json(res, out, finished=True)
    return res


# --- output -----------------------------------------------------------------------------------


def to_json(res: Results) -> dict[str, object]:
    rows = []
    for sc, metric, unit in res.rows():
        per_target: dict[str, object] = {}
        for t in res.targets:
            cell = res.cell(sc.name, t)
            entry: dict[str, object] = {}
            m = cell.metrics.get(metric)
            if m and m.samples:
                entry.update(samples=m.samples, **summarise(m.samples))
            if cell.errors:
                entry["errors"] = cell.errors
            if cell.skipped:
                entry["skipped"] = cell.skipped
            if cell.wall:
                entry["wall_seconds"] = round(cell.wall, 2)
            per_target[t] = entry
        ratios = {}
        for t in res.targets:
            r = ratio(res, sc, metric, t, "kernel")
            if t != "kernel" and r is not None:
                ratios[f"{t}/kernel"] = r
        rows.append(
            {
                "scenario": sc.name,
                "metric": metric,
                "unit": unit,
                "summary": sc.summary,
                "targets": per_target,
                "ratios": ratios,
            }
        )
    return {
        **res.info,
        "size": res.size,
        "rounds": res.rounds,
        "targets": res.targets,
        "results": rows,
    }


def write_json(res: Results, out: Path, *, finished: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    from benchmarks.goals import evaluate  # goals builds on this module

    data = to_json(res)
    data["goals"] = evaluate(res)
    data["complete"] = finished
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(out)


def median_of(res: Results, sc: Scenario, metric: str, target: str) -> float | None:
    if target not in res.targets:
        return None
    m = res.cell(sc.name, target).metrics.get(metric)
    return statistics.median(m.samples) if m and m.samples else None


def ratio(res: Results, sc: Scenario, metric: str, target: str, base: str) -> float | None:
    a, b = median_of(res, sc, metric, target), median_of(res, sc, metric, base)
    if a is None or b is None or b <= 0:
        return None
    return a / b


def fmt_value(v: float, unit: str) -> str:
    if unit != "s":
        return f"{v:.1f} {unit}"
    if v < 1e-3:
        return f"{v * 1e6:.0f} µs"
    if v < 1:
        return f"{v * 1e3:.1f} ms"
    return f"{v:.2f} s"


TABLE_TARGETS = ["native", "kernel", "fuse-overlayfs", "layerfs"]


def render_table(res: Results, *, p95s: bool = False) -> str:
    """The Markdown table: absolute medians per target (with ``p95s``, "median / p95"), then
    the ratios of the medians to kernel overlayfs."""
    head = ["scenario", *TABLE_TARGETS, "fuse-ovl/kernel", "layerfs/kernel"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sc, metric, unit in res.rows():
        cells = [metric]
        for t in TABLE_TARGETS:
            if t not in res.targets:
                cells.append("n/a")
                continue
            cell = res.cell(sc.name, t)
            med = median_of(res, sc, metric, t)
            if med is not None:
                text = fmt_value(med, unit)
                m = cell.metrics[metric]
                if p95s and len(m.samples) > 1:
                    text += f" / {fmt_value(p95(m.samples), unit)}"
                cells.append(text + (" (err)" if cell.errors else ""))
            elif cell.errors:
                cells.append("ERR")
            elif cell.skipped:
                cells.append("skip")
            else:
                cells.append("-")
        for t in ("fuse-overlayfs", "layerfs"):
            r = ratio(res, sc, metric, t, "kernel")
            cells.append(f"{r:.2f}x" if r is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_errors(res: Results) -> str:
    out = []
    for (scn, t), cell in res.cells.items():
        for e in dict.fromkeys(cell.errors):
            out.append(f"- {scn} / {t}: {e}")
    return "\n".join(out)


def results_from_json(data: dict[str, object]) -> Results:
    """Rebuild enough of a Results from a JSON file to render its table."""
    rows = data["results"]
    assert isinstance(rows, list)
    targets = data["targets"]
    assert isinstance(targets, list)
    scen: dict[str, Scenario] = {}
    res = Results(str(data["size"]), int(str(data["rounds"])), [str(t) for t in targets], [])
    res.info = {k: v for k, v in data.items() if k != "results"}
    for row in rows:
        name = row["scenario"]
        if name not in scen:
            scen[name] = Scenario(name, row.get("summary", ""), lambda m: [])
            res.scenarios.append(scen[name])
        for t, entry in row["targets"].items():
            cell = res.cell(name, t)
            if "samples" in entry:
                cell.add(Measurement(row["metric"], entry["samples"], row["unit"]))
            cell.errors = list(entry.get("errors", []))
            cell.skipped = entry.get("skipped")
    return res


def default_out(size: str) -> Path:
    return RESULTS_DIR / f"{time.strftime('%Y-%m-%d-%H%M', time.gmtime())}-{size}.json"


def render_header(res: Results) -> str:
    """Who ran, where: printed above the table."""
    info = res.info
    machine = info.get("machine", {})
    assert isinstance(machine, dict)
    lines = [
        f"size {res.size}, {info.get('rounds_done', res.rounds)} round(s), "
        f"{info.get('started', '?')}; "
        f"Linux {machine.get('kernel')}, {machine.get('cpus')} x {machine.get('cpu')}, "
        f"layers on {str(machine.get('layer_filesystem', '?')).split()[0]}, "
        f"load {machine.get('loadavg_at_start')}",
    ]
    if info.get("busy_host", "no") != "no":
        lines.append(f"  busy host: {info['busy_host']}")
    lines.append(f"  {describe(info.get('host_memory'))}")
    tinfo = info.get("target_info", {})
    assert isinstance(tinfo, dict)
    for name, ti in tinfo.items():
        checks = ", ".join(
            f"{k[len('tree_check_') :]} {v}" for k, v in ti.items() if k.startswith("tree_check_")
        )
        lines.append(
            f"  {name}: {ti.get('version')}" + (f" (tree check: {checks})" if checks else "")
        )
    return "\n".join(lines)


def render_compare(old: Results, new: Results, target: str) -> str:
    """Before/after of one target, for the journal: medians and ratios to kernel."""
    head = [
        "scenario",
        f"{target} before",
        f"{target} after",
        "after/before",
        "/kernel before",
        "/kernel after",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    old_rows = {metric: (sc, unit) for sc, metric, unit in old.rows()}
    for sc, metric, unit in new.rows():
        if metric not in old_rows:
            continue
        osc = old_rows[metric][0]
        a = median_of(old, osc, metric, target)
        b = median_of(new, sc, metric, target)
        ra = ratio(old, osc, metric, target, "kernel")
        rb = ratio(new, sc, metric, target, "kernel")
        lines.append(
            "| "
            + " | ".join(
                [
                    metric,
                    fmt_value(a, unit) if a is not None else "-",
                    fmt_value(b, unit) if b is not None else "-",
                    f"{b / a:.2f}x" if a and b is not None else "-",
                    f"{ra:.2f}x" if ra is not None else "-",
                    f"{rb:.2f}x" if rb is not None else "-",
                ]
            )
            + " |"
        )
    return "\n".join(lines)

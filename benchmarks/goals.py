"""The performance targets of issues 17, 5 and 3, checked against the medians of one run, or of
several (``python -m benchmarks goals QUIET.json BUSY.json DURABILITY.json``: a quiet run, a
``--busy-host`` run and a run of the durability targets, merged into one table).

Each goal is judged for layerfs and, for comparison, fuse-overlayfs, from one run: the first
run given, of the kind the goal asks for (quiet or busy host, as the run's JSON says under
``busy_host``), that measured its rows; a goal whose rows no run measured (not selected,
skipped, failed) is "n/a"."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.harness import Results, median_of, ratio
from benchmarks.targets import SHARE


@dataclass(frozen=True)
class Verdict:
    met: bool | None  # None: not measured in this run
    detail: str


Check = Callable[[Results, str], Verdict]


@dataclass(frozen=True)
class Run:
    res: Results
    label: str  # the JSON file's name, to say which run a verdict came from

    @property
    def busy(self) -> bool:
        return str(self.res.info.get("busy_host", "no")) != "no"


@dataclass(frozen=True)
class Goal:
    name: str
    check: Check | None = None  # judged on one run ...
    kind: str = "quiet"  # ... the first of this kind that measured it: "quiet" or "busy"
    over_runs: Callable[[list[Run], str], Verdict] | None = None  # or on all the runs at once


def _ratio(res: Results, metric: str, target: str, base: str = "kernel") -> float | None:
    rows = res.rows()
    for sc, m, _ in rows:
        if m == metric:
            return ratio(res, sc, m, target, base)
    return None


def _median(res: Results, metric: str, target: str) -> float | None:
    for sc, m, _ in res.rows():
        if m == metric:
            return median_of(res, sc, m, target)
    return None


def _within(metrics: list[str], limit: float) -> Callable[[Results, str], Verdict]:
    def check(res: Results, target: str) -> Verdict:
        worst: tuple[float, str] | None = None
        for metric in metrics:
            r = _ratio(res, metric, target)
            if r is not None and (worst is None or r > worst[0]):
                worst = (r, metric)
        if worst is None:
            return Verdict(None, "not measured")
        return Verdict(worst[0] <= limit, f"worst {worst[0]:.2f}x ({worst[1]})")

    return check


def _not_worse_than_fuse_overlayfs(res: Results, target: str) -> Verdict:
    if target == "fuse-overlayfs":
        return Verdict(None, "the reference")
    worse = []
    total = 0
    for sc, metric, unit in res.rows():
        if unit != "s":
            continue
        mine = ratio(res, sc, metric, target, "kernel")
        theirs = ratio(res, sc, metric, "fuse-overlayfs", "kernel")
        if mine is None or theirs is None:
            continue
        total += 1
        if mine > theirs:
            worse.append((mine / theirs, metric))
    if not total:
        return Verdict(None, "not measured")
    worse.sort(reverse=True)
    top = ", ".join(f"{m} {w:.1f}x" for w, m in worse[:4])
    detail = f"at or ahead on {total - len(worse)}/{total} rows"
    if worse:
        detail += f"; furthest behind: {top}"
    return Verdict(not worse, detail)


def _flat(res: Results, target: str) -> Verdict:
    parts = []
    ok = True
    seen = False
    for kind in ("stat bottom files", "walk"):
        one = _median(res, f"{kind}, 1 layers cold", target)
        deep = _median(res, f"{kind}, 128 layers cold", target)
        if one is None or deep is None or one <= 0:
            continue
        seen = True
        ok = ok and deep / one <= 1.2
        parts.append(f"{kind.split()[0]} {deep / one:.2f}x")
    if not seen:
        return Verdict(None, "not measured")
    return Verdict(ok, "128 vs 1 layer: " + ", ".join(parts))


def _memory(res: Results, target: str) -> Verdict:
    walked = forgot = None
    entries = 0
    for _, metric, _ in res.rows():
        if metric.startswith("daemon RSS after walk, "):
            entries = int(metric.split(", ")[1].split()[0])
            walked = _median(res, metric, target)
            forgot = _median(res, f"daemon RSS after forget, {entries} entries", target)
    if walked is None:
        return Verdict(None, "not measured (run --only rss-many)")
    detail = f"{walked:.0f} MiB after walking {entries:,} entries"
    if forgot is not None:
        detail += f", {forgot:.0f} MiB after forget"
    down = forgot is not None and forgot < walked * 0.8
    met = walked < 300 and down
    if entries < 1_000_000:
        return Verdict(None, detail + " (goal is for 1,000,000)")
    return Verdict(met, detail)


def _below(metric: str, limit: float, unit: str, scale: float = 1.0) -> Check:
    """The target's median of METRIC under LIMIT (in the row's unit; shown times SCALE)."""

    def check(res: Results, target: str) -> Verdict:
        v = _median(res, metric, target)
        if v is None:
            return Verdict(None, "not measured")
        return Verdict(v < limit, f"{v * scale:.1f} {unit}")

    return check


def _pss(res: Results, target: str) -> Verdict:
    metric = "PSS per mount, 20 mounts"
    v = _median(res, metric, target)
    if v is None:
        return Verdict(None, "not measured (run --only pss)")
    if target == "layerfs":  # the opt-in variants shown beside the default, which is judged
        variants = []
        if (k := _median(res, metric, "layerfs-ksm")) is not None:
            variants.append(f"with -o ksm and the host's ksmd on: {k:.2f} MiB")
        if (s := _median(res, metric, "layerfs-share")) is not None:
            variants.append(f"with -o share={SHARE} ({20 // SHARE} processes): {s:.2f} MiB")
        if variants:
            return Verdict(v <= 5.0, "; ".join([f"{v:.2f} MiB a mount", *variants]))
    idle = _median(res, "daemon RSS idle, one of 20 mounts", target)
    detail = f"{v:.2f} MiB a mount" + (f" (one idle daemon: {idle:.1f} MiB RSS)" if idle else "")
    return Verdict(v <= 5.0, detail)


def _vs_fuse_overlayfs(metric: str, limit: float) -> Check:
    """The target's median of METRIC at most LIMIT times fuse-overlayfs' in the same run."""

    def check(res: Results, target: str) -> Verdict:
        if target == "fuse-overlayfs":
            v = _median(res, metric, target)
            return Verdict(None, "the reference" + (f": {v:.3f} s" if v is not None else ""))
        r = _ratio(res, metric, target, "fuse-overlayfs")
        if r is None:
            return Verdict(None, "not measured")
        mine = _median(res, metric, target)
        return Verdict(r <= limit, f"{r:.2f}x fuse-overlayfs ({mine:.3f} s)")

    return check


# The rows every request of which reaches the daemon: issue 17's "per request" goal.
PER_REQUEST = [
    "untar",
    "create 4k files",
    "unlink files",
    "failed lookups cold",
    "failed lookups warm",
    "seq write big",
    "seq write big + fsync",
]


def _at_fuse_overlayfs_ratio(metrics: list[str]) -> Check:
    """On each of METRICS, target/kernel <= fuse-overlayfs/kernel."""

    def check(res: Results, target: str) -> Verdict:
        if target == "fuse-overlayfs":
            return Verdict(None, "the reference")
        behind: list[tuple[float, str, float, float]] = []
        total = 0
        for metric in metrics:
            mine = _ratio(res, metric, target)
            theirs = _ratio(res, metric, "fuse-overlayfs")
            if mine is None or theirs is None:
                continue
            total += 1
            if mine > theirs:
                behind.append((mine / theirs, metric, mine, theirs))
        if not total:
            return Verdict(None, "not measured")
        behind.sort(reverse=True)
        detail = f"at or ahead on {total - len(behind)}/{total} rows"
        if behind:
            detail += "; behind: " + ", ".join(
                f"{m} {a:.2f}x vs {b:.2f}x" for _, m, a, b in behind[:4]
            )
        return Verdict(not behind, detail)

    return check


# Copy-up rows compared at equal durability (issue 17, "Durability, decided").
DURABILITY_ROWS = ["chmod 10k lower files", "copy-up big (append 1 byte)", "chmod big lower file"]
DURABILITY_PAIRS = [
    ("", "kernel"),  # layerfs' default fsync=auto against the kernel's
    ("-volatile", "kernel-volatile"),
    ("-strict", "kernel-strict"),
]
REQUIRED_PAIRS = 2  # auto and volatile; strict is judged when measured


def _equal_durability(runs: list[Run], target: str) -> Verdict:
    if target != "layerfs":
        return Verdict(None, "layerfs' goal")
    ratios: list[tuple[float, str]] = []
    pairs_seen: set[str] = set()
    missing = []
    for suffix, base in DURABILITY_PAIRS:
        mine = target + suffix
        for metric in DURABILITY_ROWS:
            for run in runs:
                if run.busy:
                    continue
                r = _ratio(run.res, metric, mine, base)
                if r is not None:
                    ratios.append((r, f"{metric}, {mine}/{base}"))
                    pairs_seen.add(base)
                    break
            else:
                if base != "kernel-strict":
                    missing.append(f"{metric}, {mine}/{base}")
    if not ratios:
        return Verdict(None, "not measured (run the durability targets)")
    worst = max(ratios)
    over = [f"{what} {r:.2f}x" for r, what in sorted(ratios, reverse=True) if r > 1.0]
    detail = (
        f"worst {worst[0]:.2f}x ({worst[1]}); {len(ratios) - len(over)}/{len(ratios)} at or ahead"
    )
    if over:
        detail += "; behind: " + ", ".join(over[:4])
    if missing:
        return Verdict(False if over else None, detail + f"; not measured: {', '.join(missing)}")
    return Verdict(not over, detail)


GOALS: list[Goal] = [
    Goal(
        "issue 17: mount exec < 50 ms (quiet machine), first mount on the host",
        _below("mount exec", 0.05, "ms", 1e3),
    ),
    Goal(
        "issue 17: mount exec < 50 ms (quiet machine), another mount live",
        _below("mount exec (another mount live)", 0.05, "ms", 1e3),
    ),
    Goal(
        "issue 17: podman run --rm IMG true <= 1.15x fuse-overlayfs",
        _vs_fuse_overlayfs("podman run --rm true", 1.15),
    ),
    Goal("issue 17: PSS per mount <= 5 MiB with 20 mounts", _pss),
    Goal(
        "issue 17: per request at fuse-overlayfs' ratio to kernel or better, quiet",
        _at_fuse_overlayfs_ratio(PER_REQUEST),
    ),
    Goal(
        "issue 17: per request at fuse-overlayfs' ratio to kernel or better, busy host",
        _at_fuse_overlayfs_ratio(PER_REQUEST),
        kind="busy",
    ),
    Goal(
        "issue 17: chmod-10k and copy-up <= 1.0x kernel at equal durability",
        over_runs=_equal_durability,
    ),
    Goal(
        "issue 17: no regression: warm walk, tar, readdir, starts <= 1.25x kernel",
        _within(
            [
                "walk lstat warm",
                "tar tree warm",
                "readdir 10k warm",
                "readdir merged warm",
                "start sh warm",
                "start python3 warm",
            ],
            1.25,
        ),
    ),
    Goal(
        "no slower than fuse-overlayfs, relative to kernel (issue 5)",
        _not_worse_than_fuse_overlayfs,
    ),
    Goal(
        "warm reads, walks, container start <= 1.25x kernel (issue 5)",
        _within(
            [
                "walk lstat warm",
                "tar tree warm",
                "seq read big warm",
                "random 4k reads warm",
                "start sh warm",
                "start python3 warm",
            ],
            1.25,
        ),
    ),
    Goal("lookup and walk flat: 128 layers <= 1.2x 1 layer (issue 5)", _flat),
    Goal("RSS < 300 MB after 1M entries, down after forget (issue 5)", _memory),
    Goal(
        "copy-up of the big file <= 1.2x kernel (issue 3)",
        _within(["copy-up big (append 1 byte)"], 1.2),
    ),
    Goal(
        "chmod of lower files <= 1.0x kernel (issue 3)",
        _within(["chmod 10k lower files", "chmod big lower file"], 1.0),
    ),
]


TARGETS = ("layerfs", "fuse-overlayfs")


def judge(goal: Goal, runs: list[Run], target: str) -> Verdict:
    """GOAL for TARGET, from the first run of the goal's kind that measured it."""
    if goal.over_runs is not None:
        return goal.over_runs(runs, target)
    assert goal.check is not None
    kind = [r for r in runs if r.busy == (goal.kind == "busy")]
    if not kind:
        return Verdict(None, f"no {'busy-host' if goal.kind == 'busy' else 'quiet'} run")
    first: Verdict | None = None
    for run in kind:
        if target not in run.res.targets:
            continue
        v = goal.check(run.res, target)
        if len(runs) > 1:
            v = Verdict(v.met, f"{v.detail} [{run.label}]")
        if v.met is not None:
            return v
        first = first or v
    return first or Verdict(None, "not measured")


def evaluate_runs(runs: list[Run]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for goal in GOALS:
        entry: dict[str, object] = {"goal": goal.name}
        for target in TARGETS:
            if any(target in r.res.targets for r in runs):
                v = judge(goal, runs, target)
                entry[target] = {"met": v.met, "detail": v.detail}
        out.append(entry)
    return out


def evaluate(res: Results) -> list[dict[str, object]]:
    """The goals of one run (stored in its JSON under ``goals``)."""
    return evaluate_runs([Run(res, "this run")])


def render_goals(res: Results | list[Run]) -> str:
    runs = res if isinstance(res, list) else [Run(res, "this run")]
    lines = ["| goal | layerfs | fuse-overlayfs |", "|---|---|---|"]
    for entry in evaluate_runs(runs):
        cells = [str(entry["goal"])]
        for target in TARGETS:
            v = entry.get(target)
            if not isinstance(v, dict):
                cells.append("n/a")
                continue
            mark = {True: "met", False: "NOT met", None: "n/a"}[v["met"]]
            cells.append(f"{mark}: {v['detail']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

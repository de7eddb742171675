"""The performance targets of issues 5 and 3, checked against one run's medians.

Each goal is judged for layerfs and, for comparison, fuse-overlayfs; a goal whose rows are
missing from the run (not selected, skipped, failed) is "n/a"."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.harness import Results, median_of, ratio


@dataclass(frozen=True)
class Verdict:
    met: bool | None  # None: not measured in this run
    detail: str


@dataclass(frozen=True)
class Goal:
    name: str
    check: Callable[[Results, str], Verdict]


def _ratio(res: Results, metric: str, target: str) -> float | None:
    rows = res.rows()
    for sc, m, _ in rows:
        if m == metric:
            return ratio(res, sc, m, target, "kernel")
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


GOALS: list[Goal] = [
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


def evaluate(res: Results) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for goal in GOALS:
        entry: dict[str, object] = {"goal": goal.name}
        for target in ("layerfs", "fuse-overlayfs"):
            if target in res.targets:
                v = goal.check(res, target)
                entry[target] = {"met": v.met, "detail": v.detail}
        out.append(entry)
    return out


def render_goals(res: Results) -> str:
    lines = ["| goal | layerfs | fuse-overlayfs |", "|---|---|---|"]
    for entry in evaluate(res):
        cells = [str(entry["goal"])]
        for target in ("layerfs", "fuse-overlayfs"):
            v = entry.get(target)
            if not isinstance(v, dict):
                cells.append("n/a")
                continue
            mark = {True: "met", False: "NOT met", None: "n/a"}[v["met"]]
            cells.append(f"{mark}: {v['detail']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

"""Command line: ``python -m benchmarks run|list|dataset|table|goals|compare|chart``
(docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from benchmarks import harness
from benchmarks.dataset import DEFAULT_DATA_DIR, load_or_build
from benchmarks.goals import Run, evaluate_runs, render_goals
from benchmarks.model import SIZES
from benchmarks.scenarios import all_scenarios
from benchmarks.targets import ALL_TARGETS, Layerfs, make_targets


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    # `... | head` should end quietly, not with a BrokenPipeError traceback.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # Ctrl-C and SIGTERM unwind through the harness's cleanup (unmount, remove the work
    # directory), also when started in the background, where SIGINT comes in ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--size", choices=list(SIZES), default="tiny")
        p.add_argument(
            "--data-dir",
            type=Path,
            default=DEFAULT_DATA_DIR,
            help=f"where data sets are built and cached (default {DEFAULT_DATA_DIR})",
        )
        p.add_argument("--rebuild", action="store_true", help="rebuild the data set")

    r = sub.add_parser("run", help="run the benchmarks and print the table")
    common(r)
    r.add_argument(
        "--targets",
        type=_csv,
        default=None,
        help=f"comma-separated, from {','.join(ALL_TARGETS)} (default: all available)",
    )
    r.add_argument(
        "--rounds", type=int, default=None, help="rounds (default: 1 for tiny, 3 otherwise)"
    )
    r.add_argument(
        "--only",
        type=_csv,
        default=None,
        help="comma-separated scenario names or prefixes (see `list`)",
    )
    r.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON file (default benchmarks/results/<date>-<size>.json)",
    )
    r.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="MIN",
        help="start no round that would end past MIN minutes (judged by the rounds so far)",
    )
    r.add_argument(
        "--no-check",
        action="store_true",
        help="skip the check that every target shows the native tree",
    )
    r.add_argument(
        "--busy-host",
        action="store_true",
        help="run with a CPU hog on every core but one (the same for every target)",
    )
    r.add_argument(
        "--cold-host-memory",
        action="store_true",
        help="leave the VM's free page reporting as it is (no min_free_ms raise, no pre-touch): "
        "rows that allocate memory then also pay the host's faults (benchmarks/hostmem.py)",
    )
    r.add_argument("--layerfs-cmd", default=None, help="the layerfs command (default: found)")
    r.add_argument("--layerfs-opts", default="", help="-o options for layerfs mounts")
    r.add_argument(
        "--layerfs-rev",
        default=None,
        metavar="REV",
        help="run layerfs from this git revision (e.g. HEAD), extracted once, instead of the "
        "work tree: edits made during the run do not change what is measured",
    )
    r.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="record a py-spy flame graph of the Python daemon per run into DIR",
    )

    d = sub.add_parser("dataset", help="build (or show) the data set only")
    common(d)

    ls = sub.add_parser("list", help="list the scenarios")
    ls.add_argument("--size", choices=list(SIZES), default="full")

    ch = sub.add_parser("chart", help="draw the ratio chart (SVG) of a results JSON file")
    ch.add_argument("file", type=Path)
    ch.add_argument("-o", dest="out", type=Path, default=None, help="default: FILE with .svg")

    t = sub.add_parser("table", help="print the table of a results JSON file")
    t.add_argument("file", type=Path)
    t.add_argument("--p95", action="store_true", help='cells show "median / p95"')

    g = sub.add_parser(
        "goals",
        help="the goals table of one or more results JSON files (e.g. a quiet run, a "
        "--busy-host run and a durability run), each goal judged from one run",
    )
    g.add_argument("files", type=Path, nargs="+")
    g.add_argument("--json", type=Path, default=None, help="also write the verdicts here")

    c = sub.add_parser("compare", help="before/after table of one target from two JSON files")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    c.add_argument("--target", default="layerfs")

    args = ap.parse_args(argv)

    if args.cmd == "list":
        for sc in all_scenarios():
            if args.size in sc.sizes:
                flags = ",".join(
                    f
                    for f, on in (
                        ("cold", sc.cold),
                        ("writes", sc.writable),
                        ("explicit", sc.explicit),
                    )
                    if on
                )
                print(f"{sc.name:22s} {flags:12s} {sc.summary}")
        return 0

    if args.cmd == "compare":
        before = harness.results_from_json(json.loads(args.before.read_text()))
        after = harness.results_from_json(json.loads(args.after.read_text()))
        print(harness.render_compare(before, after, args.target))
        return 0

    if args.cmd == "goals":
        runs = [
            Run(harness.results_from_json(json.loads(f.read_text())), f.name) for f in args.files
        ]
        for run in runs:
            kind = "busy host" if run.busy else "quiet"
            print(f"{run.label}: {kind}; {harness.render_header(run.res).splitlines()[0]}")
        print()
        print(render_goals(runs))
        if args.json:
            verdicts = {"files": [str(f) for f in args.files], "goals": evaluate_runs(runs)}
            args.json.write_text(json.dumps(verdicts, indent=1) + "\n")
        return 0

    if args.cmd == "chart":
        from benchmarks.chart import ratio_chart

        svg = args.out or args.file.with_suffix(".svg")
        svg.write_text(ratio_chart(json.loads(args.file.read_text())))
        print(svg)
        return 0

    if args.cmd == "table":
        data = json.loads(args.file.read_text())
        res = harness.results_from_json(data)
        print(harness.render_header(res))
        print()
        print(harness.render_table(res, p95s=args.p95))
        print()
        print(render_goals(res))
        errs = harness.render_errors(res)
        if errs:
            print("\nErrors:\n" + errs)
        return 0

    if os.geteuid() != 0:
        print(
            "warning: not root: kernel overlayfs, chroot and cache drops need root", file=sys.stderr
        )
    ds = load_or_build(args.data_dir, args.size, rebuild=args.rebuild)
    if args.cmd == "dataset":
        print(json.dumps({"path": str(ds.root), **ds.meta}, indent=2))
        return 0

    names = args.targets or ALL_TARGETS
    targets = make_targets(names, args.layerfs_cmd, args.layerfs_opts, args.layerfs_rev)
    for tg in targets:
        if isinstance(tg, Layerfs) and not tg.unavailable():
            tg.pin(args.data_dir / "layerfs-snapshots")
    usable = []
    for tg in targets:
        why = tg.unavailable()
        if why:
            print(f"target {tg.name}: unavailable ({why})", file=sys.stderr)
            if args.targets:
                return 2
        else:
            usable.append(tg)
    rounds = args.rounds or ds.params.rounds
    out = args.out or harness.default_out(args.size)
    res = harness.run_benchmarks(
        ds,
        usable,
        rounds=rounds,
        only=args.only,
        out=out,
        check=not args.no_check,
        profile_dir=args.profile,
        budget=args.time_budget * 60 if args.time_budget else None,
        busy=args.busy_host,
        warm_memory=not args.cold_host_memory,
    )
    print()
    print(harness.render_header(res))
    print()
    print(harness.render_table(res))
    print()
    print(render_goals(res))
    errs = harness.render_errors(res)
    if errs:
        print("\nErrors:\n" + errs)
    from benchmarks.chart import ratio_chart

    svg = out.with_suffix(".svg")
    svg.write_text(ratio_chart(json.loads(out.read_text())))
    print(f"\nJSON: {out}\nchart: {svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

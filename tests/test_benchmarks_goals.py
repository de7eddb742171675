"""The goals of issue 17 (benchmarks/goals.py), judged from run JSON files that the harness
writes (harness.write_json), one run or several merged (`python -m benchmarks goals`).

Each case puts a figure either side of a goal's limit, so that a rule that compares the wrong
way, reads the wrong row or the wrong run fails here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import harness
from benchmarks.goals import GOALS, Run, evaluate_runs
from benchmarks.model import Measurement, Scenario

REPO = Path(__file__).resolve().parent.parent
TARGETS = [
    "kernel",
    "fuse-overlayfs",
    "layerfs",
    "kernel-volatile",
    "layerfs-volatile",
    "layerfs-ksm",
    "layerfs-share",
]


def write_run(
    path: Path, rows: dict[str, dict[str, float]], *, busy: bool = False, unit: str = "s"
) -> Path:
    """A run's JSON as the harness writes it: ROWS maps a metric to each target's samples
    (one value each), one scenario per metric."""
    scenarios = [Scenario(metric.replace(" ", "-"), metric, lambda m: []) for metric in rows]
    res = harness.Results("tiny", 1, TARGETS, scenarios)
    res.info = {"busy_host": "1 CPU hog(s) spinning for the whole run" if busy else "no"}
    for sc, (metric, per_target) in zip(scenarios, rows.items(), strict=True):
        for target, value in per_target.items():
            u = "MiB" if metric.startswith("PSS") else unit
            res.cell(sc.name, target).add(Measurement(metric, [value], u))
    harness.write_json(res, path, finished=True)
    return path


def load(path: Path) -> Run:
    return Run(harness.results_from_json(json.loads(path.read_text())), path.name)


def verdict(runs: list[Run], goal_start: str, target: str = "layerfs") -> tuple[object, str]:
    for entry in evaluate_runs(runs):
        if str(entry["goal"]).startswith(goal_start):
            v = entry[target]
            assert isinstance(v, dict)
            return v["met"], str(v["detail"])
    raise AssertionError(f"no goal {goal_start!r} in {[g.name for g in GOALS]}")


def test_mount_podman_and_pss_limits(tmp_path: Path) -> None:
    fuse = {"kernel": 0.2, "fuse-overlayfs": 0.2}
    met = write_run(
        tmp_path / "met.json",
        {
            "mount exec": {"kernel": 0.004, "fuse-overlayfs": 0.006, "layerfs": 0.049},
            "mount exec (another mount live)": {"kernel": 0.004, "layerfs": 0.051},
            "podman run --rm true": {**fuse, "layerfs": 0.229},
            "PSS per mount, 20 mounts": {"fuse-overlayfs": 0.4, "layerfs": 5.0},
        },
    )
    missed = write_run(
        tmp_path / "missed.json",
        {
            "mount exec": {"kernel": 0.004, "fuse-overlayfs": 0.006, "layerfs": 0.051},
            "mount exec (another mount live)": {"kernel": 0.004, "layerfs": 0.049},
            "podman run --rm true": {**fuse, "layerfs": 0.232},
            "PSS per mount, 20 mounts": {"fuse-overlayfs": 0.4, "layerfs": 5.1},
        },
    )
    ok, bad = [load(met)], [load(missed)]
    assert verdict(ok, "issue 17: mount exec")[0] is True
    assert verdict(bad, "issue 17: mount exec") == (False, "51.0 ms")
    assert verdict(ok, "issue 17: mount exec", "fuse-overlayfs") == (True, "6.0 ms")
    live = "issue 17: mount exec < 50 ms (quiet machine), another mount live"
    assert verdict(ok, live) == (False, "51.0 ms")
    assert verdict(bad, live) == (True, "49.0 ms")
    assert verdict(ok, "issue 17: podman run")[0] is True
    met_podman, detail = verdict(bad, "issue 17: podman run")
    assert met_podman is False and detail.startswith("1.16x fuse-overlayfs")
    assert verdict(ok, "issue 17: podman run", "fuse-overlayfs")[0] is None  # the reference
    assert verdict(ok, "issue 17: PSS")[0] is True
    assert verdict(bad, "issue 17: PSS")[0] is False
    assert verdict(bad, "issue 17: PSS", "fuse-overlayfs")[0] is True
    # The JSON the harness wrote holds the same verdicts.
    stored = json.loads(missed.read_text())["goals"]
    assert [g["goal"] for g in stored] == [g.name for g in GOALS]
    assert stored[0]["layerfs"]["met"] is False


def test_pss_with_ksm_is_shown_beside_the_default_and_does_not_judge(tmp_path: Path) -> None:
    pss = "PSS per mount, 20 mounts"
    run = write_run(tmp_path / "ksm.json", {pss: {"layerfs": 6.9, "layerfs-ksm": 2.1}})
    met, detail = verdict([load(run)], "issue 17: PSS")
    assert met is False
    assert detail == "6.90 MiB a mount; with -o ksm and the host's ksmd on: 2.10 MiB"


def test_pss_with_share_is_shown_beside_the_default_and_does_not_judge(tmp_path: Path) -> None:
    pss = "PSS per mount, 20 mounts"
    run = write_run(tmp_path / "share.json", {pss: {"layerfs": 7.9, "layerfs-share": 4.2}})
    met, detail = verdict([load(run)], "issue 17: PSS")
    assert met is False
    assert detail == "7.90 MiB a mount; with -o share=5 (4 processes): 4.20 MiB"


def per_request(layerfs: float) -> dict[str, dict[str, float]]:
    """The per-request rows with fuse-overlayfs at 4x the kernel and layerfs at LAYERFS x."""
    return {
        m: {"kernel": 1.0, "fuse-overlayfs": 4.0, "layerfs": layerfs}
        for m in ("untar", "create 4k files", "unlink files", "failed lookups cold")
    }


def test_per_request_is_judged_on_the_right_kind_of_run(tmp_path: Path) -> None:
    quiet = load(write_run(tmp_path / "quiet.json", per_request(3.9)))
    busy = load(write_run(tmp_path / "busy.json", per_request(4.5), busy=True))
    assert busy.busy and not quiet.busy
    stem = "issue 17: per request at fuse-overlayfs' ratio to kernel or better, "
    q, b = stem + "quiet", stem + "busy host"
    met, detail = verdict([quiet, busy], q)
    assert met is True and "4/4" in detail and "[quiet.json]" in detail
    met, detail = verdict([quiet, busy], b)
    assert met is False and "untar 4.50x vs 4.00x" in detail and "[busy.json]" in detail
    # One quiet run says nothing about a busy host.
    assert verdict([quiet], b) == (None, "no busy-host run")
    assert verdict([busy], q) == (None, "no quiet run")


def test_equal_durability_pairs_come_from_any_quiet_run(tmp_path: Path) -> None:
    rows = ("chmod 10k lower files", "copy-up big (append 1 byte)", "chmod big lower file")
    main = load(
        write_run(tmp_path / "main.json", {m: {"kernel": 2.0, "layerfs": 1.9} for m in rows})
    )
    assert verdict([main], "issue 17: chmod-10k")[0] is None  # volatile pair not measured
    vol = {m: {"kernel-volatile": 1.0, "layerfs-volatile": 1.0} for m in rows}
    vol["chmod 10k lower files"]["layerfs-volatile"] = 9.2
    durability = load(write_run(tmp_path / "durability.json", vol))
    met, detail = verdict([main, durability], "issue 17: chmod-10k")
    assert met is False
    assert "worst 9.20x (chmod 10k lower files, layerfs-volatile/kernel-volatile)" in detail
    vol["chmod 10k lower files"]["layerfs-volatile"] = 0.9
    durability = load(write_run(tmp_path / "durability2.json", vol))
    assert verdict([main, durability], "issue 17: chmod-10k")[0] is True


def test_goals_command_merges_files(tmp_path: Path) -> None:
    quiet = write_run(tmp_path / "quiet.json", per_request(3.0))
    busy = write_run(tmp_path / "busy.json", per_request(5.0), busy=True)
    out = tmp_path / "goals.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "goals", str(quiet), str(busy), "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "busy.json: busy host" in proc.stdout
    lines = [ln for ln in proc.stdout.splitlines() if "per request" in ln]
    assert len(lines) == 2
    assert "| met: at or ahead on 4/4 rows [quiet.json]" in lines[0]
    assert "| NOT met: at or ahead on 0/4 rows" in lines[1]
    stored = json.loads(out.read_text())
    assert len(stored["goals"]) == len(GOALS)

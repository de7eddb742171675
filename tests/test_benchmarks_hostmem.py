"""The benchmarks' warm host memory step (benchmarks/hostmem.py): the VM's free page reporting
delay raised for a run and the value found put back, also when the run fails or is
interrupted, and only once the last of overlapping runs ends.

The first and last tests change the real knob (/sys/module/page_reporting/parameters/
min_free_ms) and skip where it is absent or not writable; the sharing rules are checked on a
plain file standing in for it, which takes any value (sysfs refuses some)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.hostmem import KNOB, STATE, describe, warm_host_memory
from benchmarks.model import MiB

REPO = Path(__file__).resolve().parent.parent
DEAD_PID = 2**22 + 12345  # above pid_max's default: no such process


def _read(path: Path) -> int:
    return int(path.read_text().split()[0])


@pytest.fixture
def real_knob() -> Iterator[int]:
    """The real knob set to a value of the test's own (a second off what was there, so that
    the run's change shows), given back as it was after the test."""
    if not KNOB.exists():
        pytest.skip(f"{KNOB} absent: no free page reporting delay in this kernel")
    if os.geteuid() != 0 or not os.access(KNOB, os.W_OK):
        pytest.skip(f"{KNOB} not writable here")
    if STATE.exists():
        users = json.loads(STATE.read_text() or "{}").get("users") or {}
        if any(Path(f"/proc/{pid}").exists() for pid in users.values()):
            pytest.skip("a benchmark run holds the knob now")
    found = _read(KNOB)
    preset = found - 1000 if found >= 2000 else found + 1000
    KNOB.write_text(f"{preset}\n")
    try:
        yield preset
    finally:
        KNOB.write_text(f"{found}\n")


def test_the_knob_goes_back_when_the_run_fails(real_knob: int) -> None:
    with (
        pytest.raises(RuntimeError, match="mid-run"),
        warm_host_memory(pretouch_bytes=16 * MiB) as hm,
    ):
        assert hm.state == "warm"
        assert hm.before_ms == real_knob
        assert hm.during_ms == _read(KNOB)
        assert hm.during_ms >= real_knob
        assert hm.touches and hm.pretouch_bytes == 16 * MiB
        raise RuntimeError("mid-run")
    assert _read(KNOB) == real_knob
    assert "warm: min_free_ms" in describe(hm.to_json())


def test_overlapping_runs_restore_once_the_last_ends(tmp_path: Path) -> None:
    knob, state = tmp_path / "min_free_ms", tmp_path / "state.json"
    knob.write_text("0\n")
    (tmp_path / "reported_kib").write_text("1024\n")
    with warm_host_memory(knob=knob, state=state, want_ms=300_000, pretouch_bytes=0) as a:
        assert _read(knob) == 300_000
        with warm_host_memory(knob=knob, state=state, want_ms=300_000, pretouch_bytes=0) as b:
            assert b.before_ms == 0  # what the first run found, not what it set
            assert b.during_ms == 300_000
        assert _read(knob) == 300_000  # the first run still holds it
    assert _read(knob) == 0
    assert a.to_json()["reported_to_host_mib"] == 0


def test_a_run_that_died_holding_it_is_repaired(tmp_path: Path) -> None:
    knob, state = tmp_path / "min_free_ms", tmp_path / "state.json"
    knob.write_text("300000\n")  # left behind by a run killed before its cleanup
    state.write_text(json.dumps({"users": {"gone": DEAD_PID}, "saved": 5}))
    with warm_host_memory(knob=knob, state=state, pretouch_bytes=0) as hm:
        assert hm.before_ms == 5
        assert hm.during_ms == 300_000
    assert _read(knob) == 5
    assert json.loads(state.read_text()) == {"users": {}}


def test_a_higher_value_is_not_lowered(tmp_path: Path) -> None:
    knob, state = tmp_path / "min_free_ms", tmp_path / "state.json"
    knob.write_text("900000\n")
    with warm_host_memory(knob=knob, state=state, want_ms=300_000, pretouch_bytes=0) as hm:
        assert _read(knob) == 900_000 == hm.during_ms
    assert _read(knob) == 900_000


def test_off_and_absent_change_nothing(tmp_path: Path) -> None:
    knob, state = tmp_path / "min_free_ms", tmp_path / "state.json"
    knob.write_text("0\n")
    with warm_host_memory(False, knob=knob, state=state) as hm:
        assert hm.state == "off" and hm.before_ms == 0 and not hm.touches
    assert _read(knob) == 0 and not state.exists()
    assert "left cold" in describe(hm.to_json())
    with warm_host_memory(knob=tmp_path / "none", state=state) as hm:
        assert hm.state == "absent" and not hm.touches
    assert not state.exists()
    assert "no free page reporting knob" in describe(hm.to_json())
    assert "not recorded" in describe(None)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_interrupted_benchmark_run_puts_the_knob_back(real_knob: int, tmp_path: Path) -> None:
    """`python -m benchmarks run`, Ctrl-C once its memory is warm: the knob as it was."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "run",
            "--size",
            "tiny",
            "--targets",
            "native",
            "--only",
            "seqwrite",
            "--rounds",
            "1",
            "--no-check",
            "--data-dir",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "r.json"),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("host memory: warm"):
                assert _read(KNOB) >= real_knob
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert any(line.startswith("host memory: warm") for line in seen), "".join(seen)[-3000:]
    assert proc.returncode != 0, rest[-3000:]
    assert _read(KNOB) == real_knob

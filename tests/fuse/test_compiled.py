"""The engine compiled by mypyc (layerfs.compiled, scripts/build_compiled.py): a daemon runs
the build when the switch asks for it, the sources otherwise, and never a build of other
sources.

scripts/setup.sh builds it; these tests fail where it has not been built (run
``scripts/build_compiled.py``), so that CI cannot pass while testing the interpreted engine
only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.mounts import Layout, subject_named

from layerfs import compiled

pytestmark = pytest.mark.fuse

LIB = f"{compiled.GROUP.replace('.', '/')}__mypyc"  # the group's library, in the maps


def _built() -> Path:
    built = Path(compiled.DIR)
    assert (built / "MANIFEST").is_file(), f"no compiled engine in {built}: build_compiled.py"
    assert (built / "MANIFEST").read_text() == compiled.manifest(), "stale: build_compiled.py"
    return built


def _maps(pid: int) -> set[str]:
    return {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()}


@pytest.mark.parametrize("switch", ["1", "0", ""])
def test_daemon_runs_the_engine_the_switch_asks_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, switch: str
) -> None:
    built = _built()
    monkeypatch.setenv("LAYERFS_COMPILED", switch)
    layout = Layout.create(tmp_path / "fs", 1)
    (layout.lowers[0] / "f").write_text("lower\n")
    with layout.mount(subject_named("layerfs")) as m:
        assert m.proc is not None
        assert (m.mnt / "f").read_text() == "lower\n"
        (m.mnt / "g").write_text("upper\n")  # a create and a write through the engine
        maps = _maps(m.proc.pid)
    libs = [p for p in maps if p.startswith(f"{built}/") and LIB in p]
    want = compiled.DEFAULT if switch == "" else switch == "1"
    assert bool(libs) == want, (switch, sorted(p for p in maps if "layerfs" in p))
    assert layout.upper is not None and (layout.upper / "g").read_text() == "upper\n"


def test_a_build_of_other_sources_is_not_loaded(tmp_path: Path) -> None:
    """A copy of the package beside a copy of the build: loaded as is; with one engine
    module's source changed by a byte, the engine runs interpreted and says why."""
    built = _built()
    pkg = Path(compiled.__file__).parent
    shutil.copytree(pkg, tmp_path / "layerfs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(built, tmp_path / "build" / "mypyc")
    # what is mapped: a compiled module's __file__ is not the file it came from (mypyc's)
    probe = "from layerfs import compiled; s = compiled.use(); import layerfs.overlay as o; "
    probe += f"m = [p for p in open('/proc/self/maps').read().split() if {LIB!r} in p]; "
    probe += "print(s); print(sorted(set(m)) or o.__file__)"

    def run() -> tuple[str, str]:
        env = {**os.environ, "PYTHONPATH": str(tmp_path), "LAYERFS_COMPILED": "1"}
        out = subprocess.run(
            [sys.executable, "-c", probe],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )
        state, where = out.stdout.splitlines()
        return state, where

    lib = tmp_path / "build" / "mypyc" / "layerfs" / next(built.glob(f"layerfs/{LIB[8:]}*")).name
    assert run() == ("compiled", repr([str(lib)]))
    source = tmp_path / "layerfs" / f"{compiled.MODULES[-1]}.py"
    source.write_bytes(source.read_bytes() + b"\n")
    state, where = run()
    assert state.startswith("interpreted (") and "other sources" in state, state
    assert where == str(tmp_path / "layerfs" / f"{compiled.MODULES[-1]}.py"), where

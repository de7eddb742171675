"""The engine compiled by mypyc (layerfs.compiled, scripts/build_compiled.py): a daemon runs
the build when the switch asks for it, the sources otherwise, and never a build of other
sources.

scripts/setup.sh builds it; these tests fail where it has not been built (run
``scripts/build_compiled.py``), so that CI cannot pass while testing the interpreted engine
only.
"""

from __future__ import annotations

import json
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


# One engine in a fresh process: an Overlay over a lower of N empty files (no FUSE), each
# looked up once; what stays allocated per entry (tracemalloc: blocks, and bytes in
# pymalloc's 16-byte steps), and whether the node table shares the nodes' key objects.
_PER_ENTRY = """
import json, os, sys, tracemalloc
from layerfs import compiled
state = compiled.use()
from layerfs.config import MountConfig
from layerfs.overlay import Overlay
root, n = sys.argv[1], int(sys.argv[2])
low, up, work, mnt = (os.path.join(root, d) for d in ("low", "up", "work", "mnt"))
for d in (low, up, work, mnt):
    os.mkdir(d)
for i in range(n):
    open(os.path.join(low, f"f{i:05d}"), "wb").close()
ov = Overlay(MountConfig(lowers=(low,), upper=up, workdir=work, mountpoint=mnt).validate())
names = sorted(os.fsencode(name) for name in os.listdir(low))
ov.lookup(1, names[0])  # the lower listing, read once
mine = [tracemalloc.Filter(False, tracemalloc.__file__)]
def kept(snap):
    traces = snap.filter_traces(mine).traces
    return len(traces), sum((t.size + 15) // 16 * 16 for t in traces)
tracemalloc.start()
blocks0, bytes0 = kept(tracemalloc.take_snapshot())
for name in names[1:]:
    ov.lookup(1, name)
blocks, size = kept(tracemalloc.take_snapshot())
nodes = [node for node in ov.table.nodes.values() if node.name]
print(json.dumps({
    "state": state,
    "blocks": (blocks - blocks0) / (n - 1),
    "bytes": (size - bytes0) / (n - 1),
    "unshared": sum(1 for node in nodes if node.origin is not node.key)
    + sum(1 for key, node in ov.table.nodes.items() if node.name and key is not node.key),
}))
"""


def test_compiled_nodes_take_no_more_memory(tmp_path: Path) -> None:
    """What the walk of a tree keeps per entry is no more compiled than interpreted. mypyc
    stores an int attribute unboxed and boxes a new int wherever one is stored: a table
    keyed by a node's id, or a key chosen by ``origin or real``, kept an int of its own
    per node (session 14: 4 blocks an entry against 2, +80 MiB after a 1M-entry walk)."""
    _built()
    got = {}
    for switch in ("1", "0"):
        (tmp_path / switch).mkdir()
        out = subprocess.run(
            [sys.executable, "-c", _PER_ENTRY, str(tmp_path / switch), "3000"],
            env={**os.environ, "LAYERFS_COMPILED": switch},
            capture_output=True,
            text=True,
            check=True,
        )
        got[switch] = json.loads(out.stdout)
    compiled_, interpreted = got["1"], got["0"]
    assert compiled_["state"] == "compiled", compiled_
    assert interpreted["state"].startswith("interpreted"), interpreted
    assert compiled_["unshared"] == interpreted["unshared"] == 0, got
    assert compiled_["blocks"] <= interpreted["blocks"] + 0.05, got
    assert compiled_["bytes"] <= interpreted["bytes"] + 1, got

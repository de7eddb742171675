"""The fork server's objects made immortal before it forks (forkserver.immortalize, PEP 683).

On CPython 3.12+ the interpreter skips the reference count of an immortal object, so a child
that uses what the server preloaded leaves those pages shared. What these hold: a forked child
that walks and uses what its parent imported makes fewer pages of its own when the parent
immortalized them first than when it did not (same script, same interpreter, the only
difference the call); on 3.11, which has no immortal objects, the call does nothing.

The comparison needs a 3.12+ interpreter: the venv's, else one found on PATH or in pyenv's
versions (the project's venv is Debian's 3.11); without one the comparison is skipped.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest
from compat.helpers import REPO

# A process that imports a heap's worth of modules, then (argv[1] == "1") immortalizes them,
# freezes the collector and forks, as the fork server does; the child uses what it inherited
# (every module's globals and classes' attributes looked at, some of the code run) and reports
# its Private_Dirty (KiB) and the count immortalize() returned.
CHILD = r"""
import gc, os, sys
import argparse, asyncio, decimal, email.parser, json, logging.handlers, tarfile, zipfile
from layerfs import forkserver
gc.disable()
marked = forkserver.immortalize() if sys.argv[1] == "1" else 0
gc.freeze()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    gc.enable()
    held = []
    for m in list(sys.modules.values()):
        for v in list(getattr(m, "__dict__", {}).values()):
            held.append(v)
            if isinstance(v, type):
                held.extend(v.__dict__.values())
    for _ in range(20):
        json.loads(json.dumps({"a": [1, 2.5, "x"]}))
        argparse.ArgumentParser().parse_args([])
        email.parser.Parser().parsestr("A: b\n\nbody")
        decimal.Decimal("1.5") * 2
    with open("/proc/self/smaps_rollup") as f:
        dirty = [int(l.split()[1]) for l in f if l.startswith("Private_Dirty:")][0]
    os.write(w, b"%d" % dirty)
    os._exit(0)
os.close(w)
got = os.read(r, 64)
os.waitpid(pid, 0)
print(int(got), marked)
"""


def _newer_python() -> str | None:
    """A CPython >= 3.12 that runs here: ours, else python3.1X on PATH or in pyenv's versions."""
    if sys.version_info >= (3, 12):
        return sys.executable
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = [shutil.which(f"python3.{minor}") for minor in (13, 12, 14)]
    found += sorted(glob.glob(f"{root}/versions/3.1[2-9]*/bin/python3.1[2-9]"), reverse=True)
    for exe in filter(None, found):
        probe = [exe, "-c", "import sys; print(sys.version_info >= (3, 12))"]
        r = subprocess.run(probe, capture_output=True, text=True, check=False)
        if r.returncode == 0 and r.stdout.strip() == "True":  # not a shim of another version
            return exe
    return None


def _child(python: str, immortal: bool) -> tuple[int, int]:
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
    r = subprocess.run(
        [python, "-c", CHILD, "1" if immortal else "0"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    dirty, marked = r.stdout.split()
    return int(dirty), int(marked)


def test_an_immortalized_parent_leaves_a_child_fewer_pages_of_its_own() -> None:
    python = _newer_python()
    if python is None:
        pytest.skip("no CPython >= 3.12 here")
    mortal, none = zip(*(_child(python, False) for _ in range(3)), strict=True)
    immortal, marked = zip(*(_child(python, True) for _ in range(3)), strict=True)
    # each count a child takes and drops copies the page its object is on: without them the
    # child's own pages fall by more than a third
    assert max(immortal) < min(mortal) * 2 // 3, (immortal, mortal)
    assert set(none) == {0} and min(marked) > 0


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.11 and before: no immortal objects")
def test_immortalize_does_nothing_without_immortal_objects() -> None:
    from layerfs import forkserver

    before = sys.getrefcount(forkserver)
    assert forkserver.immortalize() == 0
    held = [forkserver] * 3
    assert sys.getrefcount(forkserver) == before + len(held)

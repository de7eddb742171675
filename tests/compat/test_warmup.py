"""The fork server's warm-up (layerfs.warmup, LAYERFS_WARM=1): a container start's requests
run once on a throwaway stack before the daemons are forked.

What these hold: after the preload with the warm-up, the engine's and the handlers' code a
container start runs is quickened (CPython 3.11: ``_co_code_adaptive`` differs from
``co_code``) where without it it is not, and the warm-up leaves nothing behind: one thread (the
server forks alone), no new descriptor, nothing in its temporary directory's parent, no
request counted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from compat.helpers import REPO

CHECK = """
import os, sys, threading
from layerfs.mount import _preload
fds = set(os.listdir("/proc/self/fd"))
_preload()
from layerfs import ops
from layerfs.overlay import Overlay
from layerfs.namespace import Namespace
def quick(f):
    code = getattr(f, "__wrapped__", f).__code__
    return code._co_code_adaptive != code.co_code
print(quick(Overlay.lookup), quick(Overlay.counted), quick(Namespace.mknod))
print(len(os.listdir("/proc/self/task")), threading.active_count())
print(sorted(set(os.listdir("/proc/self/fd")) - fds), dict(ops.REQUESTS))
"""


def _run(tmp: Path, warm: str) -> list[str]:
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO), LAYERFS_WARM=warm, TMPDIR=str(tmp))
    env["LAYERFS_COMPILED"] = "0"  # interpreted: the quickening is what is seen
    r = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, check=False
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="3.11's quickening is what is seen")
def test_the_warm_up_runs_the_handlers_and_leaves_nothing(tmp_path: Path) -> None:
    # the fds line: the listing's own descriptor of /proc/self/fd is a new number each time
    # only if something else was left open; the same number is reused otherwise
    assert _run(tmp_path, "0")[:2] == ["False False False", "1 1"]
    assert _run(tmp_path, "1") == ["True True True", "1 1", "[] {}"]
    assert os.listdir(tmp_path) == []

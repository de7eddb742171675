"""benchmarks.handlercost drives every handler it names on real files and times each."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from benchmarks import handlercost


def test_every_handler_runs_on_its_files(tmp_path: Path) -> None:
    only = set(handlercost.ALL.split(","))
    out = trio.run(handlercost._run, tmp_path, 20, 2, only)
    assert set(out) == only
    assert all(len(v) == 2 and min(v) > 0 for v in out.values())
    # the rounds' files were made in the upper and are all gone again
    d0 = tmp_path / "upper" / "usr" / "share" / "d0"
    assert d0.is_dir() and os.listdir(d0) == []

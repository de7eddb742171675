"""Fixtures of the mount.layerfs compatibility tests (helpers live in compat/helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from compat import helpers
from compat.helpers import c_front_built, reap


@pytest.fixture
def layers(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """lower (with a file), upper, work and merged directories; merged is unmounted and freed
    of daemons after the test, whatever happens (error tests expect no mount, but a bug may
    make one)."""
    d = {name: tmp_path / name for name in ("lower", "upper", "work", "merged")}
    for p in d.values():
        p.mkdir()
    (d["lower"] / "f").write_text("x")
    try:
        yield d
    finally:
        reap(d["merged"])


@pytest.fixture
def stacks(tmp_path: Path) -> Iterator[list[dict[str, Path]]]:
    """Three stacks over one lower (with a file f); their mounts are reaped afterwards."""
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "f").write_text("x")
    out = []
    for i in range(3):
        d = {"lower": lower}
        for name in ("upper", "work", "merged"):
            d[name] = tmp_path / f"{name}{i}"
            d[name].mkdir()
        out.append(d)
    try:
        yield out
    finally:
        for d in out:
            reap(d["merged"])


@pytest.fixture(params=["c", "python"])
def front(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with each front end of mount.layerfs (the C one skipped where it was not
    built: scripts/setup.sh without gcc)."""
    if request.param == "c" and not c_front_built():
        pytest.skip("the C front end of mount.layerfs is not built (scripts/setup.sh)")
    monkeypatch.setattr(helpers, "FRONT", request.param)
    return str(request.param)

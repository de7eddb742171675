"""benchmarks.loopcost serves every round trip both ways and measures some CPU for it."""

from __future__ import annotations

import pytest

from benchmarks import loopcost


@pytest.mark.parametrize("kind", ["plain", "pyfuse3-shape"])
def test_both_loops_serve_every_round_trip(kind: str) -> None:
    # the client sends N requests and a last "q": a loop that lost one would hang (timeout)
    assert loopcost.server_cpu(kind, 300) > 0

"""Failed lookups over a few lowers: a directory where a name was missing answers its next
lookups from one index of its lowers' names (layers.LowerIndexes, lookup.resolve's
``Node.missed``), not by asking each layer's listing. Below 8 lowers the index was built for
no directory before (a miss asked every layer: docs/benchmarks.md, session 16 lookups). What
each lookup answers is the kernel's, on both loops: whiteouts of each dialect, an opaque
directory, a file over a directory, names the index holds first in a lower layer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support.diff import Pair, check_lookups, check_merged
from support.layerspec import LayerSpec, d, f, sym, wh
from support.mounts import subject_named

pytestmark = [pytest.mark.fuse, pytest.mark.kernel_overlay]


def _stack(style: str) -> LayerSpec:
    return LayerSpec(
        [
            d(
                {
                    b"dir": d(
                        {b"top": f(b"t"), b"gone": wh(style), b"both": f(b"top"), b"sub": wh(style)}
                    ),
                    b"opq": d({b"new": f(b"n")}, opaque="oci" if style == "oci" else "trusted"),
                }
            ),
            d(
                {
                    b"dir": d({b"mid": sym(b"top"), b"both": f(b"mid"), b"gone": f(b"g")}),
                    b"opq": d({b"hidden": f(b"h")}),
                }
            ),
            d(
                {
                    b"dir": d({b"low": f(b"l"), b"sub": d({b"x": f()}), b"mid": d({b"y": f()})}),
                    b"opq": d({b"old": f(b"o")}),
                }
            ),
        ]
    )


def _stats(mnt: Path) -> dict[str, int]:
    stats: dict[str, int] = json.loads(os.getxattr(mnt, "trusted.layerfs.statistics"))
    return stats


@pytest.mark.parametrize("loop", ["craw", "poll"])
@pytest.mark.parametrize("style", ["char", "oci", "xattr"])
@pytest.mark.parametrize("upper", [True, False], ids=["upper", "readonly"])
def test_misses_then_names_through_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str, style: str, upper: bool
) -> None:
    monkeypatch.setenv("LAYERFS_LOOP", loop)
    subject = subject_named("layerfs")
    pair = Pair.create(tmp_path, subject, _stack(style), upper=upper)
    with pair.mounted() as (s, k):
        assert _stats(s.mnt)["lower_indexes"] == 0
        check_lookups(pair, s, k, what=f"{style} {loop}")
        # the root, dir, opq (opaque: only its top layer is asked), dir/mid and dir/sub are
        # merged or single; the root and dir merge 3 lowers and had a miss each
        assert _stats(s.mnt)["lower_indexes"] >= 2, _stats(s.mnt)
        for i in range(50):
            assert not os.path.lexists(s.mnt / "dir" / f"missing{i}")
        check_merged(s, k, what=f"{style} {loop}")

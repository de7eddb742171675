"""The ratio chart is an SVG with one bar per ratio, at the length its ratio gives."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from benchmarks.chart import _x, ratio_chart

NS = "{http://www.w3.org/2000/svg}"


def test_chart_has_a_bar_per_ratio() -> None:
    data: dict[str, object] = {
        "size": "tiny",
        "results": [
            {
                "metric": "walk",
                "unit": "s",
                "ratios": {"fuse-overlayfs/kernel": 2.0, "layerfs/kernel": 0.5},
            },
            {"metric": "untar", "unit": "s", "ratios": {"layerfs/kernel": 8.0}},
            {"metric": "daemon RSS", "unit": "MiB", "ratios": {"layerfs/kernel": 3.0}},
            {"metric": "no kernel", "unit": "s", "ratios": {}},
        ],
    }
    root = ET.fromstring(ratio_chart(data))
    bars = {t.text: r for r in root.iter(f"{NS}rect") if (t := r.find(f"{NS}title")) is not None}
    assert set(bars) == {"walk: 2.00x", "walk: 0.50x", "untar: 8.00x"}
    width = float(bars["untar: 8.00x"].get("width", "0"))
    assert abs(width - (_x(8.0) - _x(1.0))) < 0.1
    assert float(bars["walk: 0.50x"].get("x", "0")) < _x(1.0)  # faster: left of 1x
    labels = [t.text for t in root.iter(f"{NS}text")]
    assert "daemon RSS" not in labels and "no kernel" not in labels

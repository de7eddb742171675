"""The ratio chart: each row's time relative to kernel overlayfs, fuse-overlayfs beside layerfs,
as an SVG written here (no plotting library). Log scale: 1x is the kernel, left of it faster.

Made from a run's JSON (``to_json``), so any stored result can be drawn again:
``python -m benchmarks chart RESULT.json [-o OUT.svg]``.
"""

from __future__ import annotations

import math
from xml.sax.saxutils import escape

SERIES = (
    ("fuse-overlayfs/kernel", "fuse-overlayfs", "#8a8a8a"),
    ("layerfs/kernel", "layerfs", "#1f6fb4"),
)
LO, HI = 1 / 8, 256.0  # the axis, in ratios
LABEL_W, PLOT_W, ROW_H, TOP = 260, 560, 22, 46


def _x(r: float) -> float:
    r = min(max(r, LO), HI)
    return LABEL_W + PLOT_W * (math.log2(r) - math.log2(LO)) / (math.log2(HI) - math.log2(LO))


def ratio_chart(data: dict[str, object]) -> str:
    """The SVG text for the rows of DATA (a run's JSON) that have a ratio to the kernel."""
    results = data.get("results", [])
    assert isinstance(results, list)
    rows = [
        (str(r["metric"]), r["ratios"])
        for r in results
        if r.get("unit") == "s" and any(k in r.get("ratios", {}) for k, _, _ in SERIES)
    ]
    height = TOP + ROW_H * len(rows) + 30
    width = LABEL_W + PLOT_W + 80
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="8" y="16" font-size="13">Time relative to kernel overlayfs (log scale; '
        f"{escape(str(data.get('size', '?')))}, {escape(str(data.get('started', '')))})</text>",
    ]
    for i, (_, name, colour) in enumerate(SERIES):
        x = LABEL_W + 160 * i
        out.append(f'<rect x="{x}" y="24" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{x + 14}" y="33">{name}</text>')
    k = LO
    while k <= HI:
        x = _x(k)
        out.append(
            f'<line x1="{x:.1f}" y1="{TOP - 4}" x2="{x:.1f}" y2="{height - 26}" '
            f'stroke="{"#000" if k == 1 else "#ddd"}"/>'
        )
        label = f"{k:g}x" if k >= 1 else f"1/{1 / k:g}"
        out.append(f'<text x="{x:.1f}" y="{height - 12}" text-anchor="middle">{label}</text>')
        k *= 2
    for n, (metric, ratios) in enumerate(rows):
        y = TOP + ROW_H * n
        out.append(
            f'<text x="{LABEL_W - 6}" y="{y + 14}" text-anchor="end">{escape(metric)}</text>'
        )
        for i, (key, _, colour) in enumerate(SERIES):
            r = ratios.get(key) if isinstance(ratios, dict) else None
            if r is None:
                continue
            x0, x1 = sorted((_x(1.0), _x(float(r))))
            by = y + 3 + 8 * i
            out.append(
                f'<rect x="{x0:.1f}" y="{by}" width="{max(x1 - x0, 1):.1f}" height="7" '
                f'fill="{colour}"><title>{escape(metric)}: {float(r):.2f}x</title></rect>'
            )
            if key == "layerfs/kernel":
                out.append(f'<text x="{_x(float(r)) + 4:.1f}" y="{by + 7}">{float(r):.2f}x</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"

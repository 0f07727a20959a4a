"""Drawing helpers: figures with matplotlib's object API, PNGs embedded as base64 next to the data they plot.

Each image is followed by a `<script type="application/json" class="figure-data">` block holding, per axes, its
limits, scales and every plotted point (line vertices, scatter offsets, bar and histogram corners, arrow ends), so a
test can check that no point lies outside its axes without reading pixels.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.text import Annotation

COLORS = {
    "correct": "#2a9d8f",
    "incorrect": "#e76f51",
    "r2w": "#457b9d",
    "w2r": "#e9c46a",
    "critical": "#c44569",
    "dto": "#8d6cab",
}
MODEL_COLORS = ("#264653", "#e76f51", "#2a9d8f", "#8d6cab", "#e9c46a", "#457b9d")
NOT_RUN = "not run"
PAD = 0.06  # share of a data range added on each side, so markers at the extremes are drawn whole


def figure(ncols: int = 1, width: float = 6.4, height: float = 3.6) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(width * ncols if ncols > 1 else width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, list(axes)


def padded(values: Sequence[float], floor: float | None = None, ceiling: float | None = None) -> tuple[float, float]:
    """Axis limits holding every value with a margin on both sides; `floor`/`ceiling` (e.g. 0 and 1) are always
    inside the range, so the axis shows the scale's natural ends."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    vals += [v for v in (floor, ceiling) if v is not None]
    if not vals:
        return (0.0, 1.0)
    lo, hi = min(vals), max(vals)
    span = hi - lo or max(abs(hi), 1.0)
    return (lo - PAD * span, hi + PAD * span)


def axes_data(ax: Any) -> dict[str, Any]:
    """One axes' limits, scales and plotted data (see the module docstring): `markers` are points drawn as symbols
    (scatter, line markers), which must lie strictly inside the axes to be drawn whole; `points` are every plotted
    coordinate (markers included, bar and histogram corners, line vertices, arrow ends), which must lie within."""
    points: list[list[float]] = []
    markers: list[list[float]] = []
    for line in ax.get_lines():
        xy = [[float(x), float(y)] for x, y in line.get_xydata() if np.isfinite(x) and np.isfinite(y)]
        points += xy
        if line.get_marker() not in (None, "None", "", " "):
            markers += xy
    for coll in ax.collections:
        if isinstance(coll, PathCollection):
            xy = [[float(x), float(y)] for x, y in coll.get_offsets()]
            points += xy
            markers += xy
    for patch in ax.patches:
        if isinstance(patch, Rectangle) and patch.get_height() and patch.get_width():
            x, y, w, h = patch.get_x(), patch.get_y(), patch.get_width(), patch.get_height()
            points += [[float(x), float(y)], [float(x + w), float(y + h)]]
    for child in ax.get_children():
        if isinstance(child, Annotation) and child.arrow_patch is not None:
            points += [[float(v) for v in child.xy], [float(v) for v in child.xyann]]
    return {
        "title": ax.get_title(),
        "xlabel": ax.get_xlabel(),
        "ylabel": ax.get_ylabel(),
        "xlim": [float(v) for v in ax.get_xlim()],
        "ylim": [float(v) for v in ax.get_ylim()],
        "xscale": ax.get_xscale(),
        "yscale": ax.get_yscale(),
        "points": points,
        "markers": markers,
    }


def img(fig: Figure, alt: str) -> str:
    """The figure as an embedded PNG followed by its plotted data as JSON."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    data = base64.b64encode(buf.getvalue()).decode()
    payload = json.dumps({"alt": alt, "axes": [axes_data(ax) for ax in fig.axes]}, separators=(",", ":"))
    # "</" cannot end the script block early: JSON allows escaping the slash.
    payload = payload.replace("</", "<\\/")
    return (
        f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
        f'<script type="application/json" class="figure-data">{payload}</script>'
    )


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def caption(text: str) -> str:
    return f'<p class="caption">{html.escape(text)}</p>'


def format_number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def format_counts(counts: Any) -> str:
    """'stop 40, length 8' for {'stop': 40, 'length': 8}, largest first; '-' for none."""
    if not counts:
        return "-"
    return ", ".join(f"{k} {format_number(v)}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def signed(value: float, digits: int = 3) -> str:
    """A difference with its sign (a true minus sign), 0 without one."""
    text = format_number(abs(value), digits)
    if value > 0 and text.strip("0.,") != "":
        return "+" + text
    if value < 0 and text.strip("0.,") != "":
        return "−" + text
    return text


def interval_text(iv: dict[str, Any] | None, digits: int = 3, what: str = "Δ") -> str:
    """'Δ +0.083 [−0.042, +0.208], no significant change' (ratios: 'eta 1.12 [0.95, 1.31], ...')."""
    if not iv or iv.get("low") is None or not math.isfinite(iv["low"]):
        return ""
    if iv.get("null", 0) == 0:
        body = f"{what} {signed(iv['estimate'], digits)} [{signed(iv['low'], digits)}, {signed(iv['high'], digits)}]"
    else:
        body = f"{format_number(iv['estimate'], digits)} [{format_number(iv['low'], digits)}, "
        body += f"{format_number(iv['high'], digits)}]"
    return body + (", significant" if iv.get("significant") else ", no significant change")

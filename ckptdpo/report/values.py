"""The report's section about checkpoint values: value curves with their intervals and critical points, what the
search cost against probing every checkpoint, where the first errors fall, and the critical pairs' lengths."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from matplotlib.ticker import MaxNLocator

from ckptdpo.report.draw import COLORS, MODEL_COLORS, NOT_RUN, caption, figure, img, note, padded

Rows = Sequence[Mapping[str, Any]] | pa.Table | None
SEARCH_COLORS = {"binary": MODEL_COLORS[0], "exhaustive": MODEL_COLORS[1]}
CRITICAL_COLOR = "#111111"


def _rows(table: Rows) -> list[Mapping[str, Any]] | None:
    if table is None:
        return None
    return table.to_pylist() if isinstance(table, pa.Table) else list(table)


def _curve_samples(trajectories: list[Mapping[str, Any]], by_sample: Mapping[str, list], k: int) -> list:
    """Up to k trajectories to draw: those with a critical point first, then the others, by sample_id."""
    drawable = [t for t in trajectories if len(by_sample.get(t["sample_id"], [])) >= 1]
    drawable.sort(key=lambda t: (t["critical_index"] is None, t["sample_id"]))
    return drawable[:k]


def _draw_curves(ax: Any, picked: list, by_sample: Mapping[str, list], threshold: float | None) -> None:
    xs_all: list[float] = []
    for n, t in enumerate(picked):
        rows = sorted(by_sample[t["sample_id"]], key=lambda r: r["checkpoint_index"])
        x = np.array([r["checkpoint_index"] for r in rows], dtype=float)
        y = np.array([r["value"] for r in rows], dtype=float)
        err = np.array([[r["value"] - r["ci_low"] for r in rows], [r["ci_high"] - r["value"] for r in rows]])
        color = MODEL_COLORS[n % len(MODEL_COLORS)]
        label = f"{t['sample_id'][:8]} ({t['status']}, {t['num_checkpoints']} ckpt)"
        ax.errorbar(x, y, yerr=np.clip(err, 0, None), fmt="o-", ms=4, capsize=2, color=color, label=label, alpha=0.85)
        c = t["critical_index"]
        hit = [r["value"] for r in rows if r["checkpoint_index"] == c]
        if hit:
            ax.scatter([c], hit, s=90, marker="X", color=CRITICAL_COLOR, zorder=5)
        xs_all += list(x)
    xlim = padded(xs_all, floor=1)
    ax.set_xlim(*xlim)
    ax.set_ylim(*padded([0.0, 1.0]))
    if threshold is not None:
        ax.plot(list(xlim), [threshold, threshold], ":", color="#888888", label=f"threshold {threshold:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("checkpoint index")
    ax.set_ylabel("value (share of rollouts correct)")
    ax.set_title("value curves (95% Wilson intervals; X: critical checkpoint)")
    ax.legend(fontsize=7)


def _cost_text(trajectories: list[Mapping[str, Any]], per_probe: Mapping[str, int]) -> str:
    """Rollouts by search; against exhaustive measured beside it when the rows hold both, else against its cost."""
    by_search: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for t in trajectories:
        by_search[t["search"]].append(t)
    parts = []
    for search, ts in sorted(by_search.items()):
        used = sum(t["rollouts_used"] for t in ts)
        checkpoints = sum(t["num_checkpoints"] for t in ts)
        probed = sum(t["probed"] for t in ts)
        full = sum(t["num_checkpoints"] * per_probe.get(t["sample_id"], 0) for t in ts)
        text = f"{search}: {len(ts)} trajectories, {used:,} rollouts, {probed} of {checkpoints} checkpoints probed"
        if search != "exhaustive" and full:
            text += f" ({used / full:.0%} of the {full:,} rollouts probing every checkpoint would take)"
        parts.append(text)
    if {"binary", "exhaustive"} <= set(by_search):
        per = {s: sum(t["rollouts_used"] for t in ts) / max(1, sum(t["num_checkpoints"] for t in ts))
               for s, ts in by_search.items()}  # fmt: skip
        parts.append(f"rollouts per checkpoint, binary / exhaustive: {per['binary'] / per['exhaustive']:.2f}")
    return "; ".join(parts) + "."


def section_values(values: Rows, trajectories: Rows, pairs: Rows, stats: Mapping[str, Any] | None = None,
                   threshold: float | None = 0.5, max_curves: int = 6) -> str:  # fmt: skip
    """HTML: value curves of a few trajectories, search cost, critical positions and critical pair lengths.

    `values`, `trajectories`: VALUES and VALUE_TRAJECTORIES rows (tables or row lists); `pairs`: PAIRS rows (only
    `critical` ones are used); `stats`: stats.json `values`, for its counters when given; `threshold`: the recipe's
    `values.threshold`, drawn as a line.
    """
    value_rows, traj_rows, pair_rows = _rows(values), _rows(trajectories), _rows(pairs) or []
    if value_rows is None or traj_rows is None:
        return note(f"{NOT_RUN}: no values stage in this run.")
    if not traj_rows:
        return note("the values stage ran but probed no trajectory (none selected had a checkpoint).")
    by_sample: dict[str, list] = defaultdict(list)
    for r in value_rows:
        by_sample[r["sample_id"]].append(r)
    per_probe = {sid: rows[0]["rollouts"] for sid, rows in by_sample.items()}
    critical = [t for t in traj_rows if t["critical_index"] is not None]
    ratios = [p["chosen_tokens"] / p["rejected_tokens"] for p in pair_rows
              if p["pair_type"] == "critical" and p["rejected_tokens"]]  # fmt: skip

    parts = []
    picked = _curve_samples(traj_rows, by_sample, max_curves)
    if picked:
        fig, (ax,) = figure(width=7.2, height=4.0)
        _draw_curves(ax, picked, by_sample, threshold)
        parts.append(img(fig, "checkpoint value curves with intervals and critical checkpoints"))

    fig, (ax1, ax2, ax3) = figure(3, width=3.6)
    rel = np.array([t["critical_index"] / t["num_checkpoints"] for t in critical], dtype=float)
    if len(rel):
        ax1.hist(rel, bins=np.linspace(0, 1, 11), color=COLORS["incorrect"], alpha=0.7)
    ax1.set_xlim(*padded([0.0, 1.0]))
    ax1.set_xlabel("critical index / checkpoints")
    ax1.set_ylabel("trajectories")
    ax1.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_title("where first errors fall")
    ns = [t["num_checkpoints"] for t in traj_rows]
    used = [t["rollouts_used"] for t in traj_rows]
    full = [t["num_checkpoints"] * per_probe.get(t["sample_id"], 0) for t in traj_rows]
    for search in sorted({t["search"] for t in traj_rows}):
        xs = [n for n, t in zip(ns, traj_rows, strict=True) if t["search"] == search]
        ys = [u for u, t in zip(used, traj_rows, strict=True) if t["search"] == search]
        ax2.scatter(xs, ys, s=16, alpha=0.7, color=SEARCH_COLORS.get(search, "#999999"), label=search)
    order = np.argsort(ns)
    ax2.plot(np.array(ns)[order], np.array(full)[order], "--", color="#888888", label="every checkpoint")
    ax2.set_xlim(*padded(ns, floor=0))
    ax2.set_ylim(*padded([*used, *full], floor=0))
    ax2.set_xlabel("checkpoints in trajectory")
    ax2.set_ylabel("rollouts used")
    ax2.set_title("search cost")
    ax2.legend(fontsize=7)
    if ratios:
        bins = np.linspace(0, max(2.0, max(ratios) * 1.001), 21)
        ax3.hist(ratios, bins=bins, color=COLORS.get("w2r"), alpha=0.8)
        ax3.set_xlim(*padded(list(bins)))
    else:
        ax3.set_xlim(*padded([0.0, 2.0]))
    ax3.set_xlabel("chosen tokens / rejected tokens")
    ax3.set_ylabel("critical pairs")
    ax3.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax3.set_title("critical pairs' lengths")
    parts.append(img(fig, "critical positions, search cost and critical pair lengths"))

    lines = [_cost_text(traj_rows, per_probe)]
    lines.append(
        f"{len(critical)} of {len(traj_rows)} trajectories have a critical checkpoint"
        + (f", median relative position {np.median(rel):.2f}." if len(rel) else ".")
    )
    lines.append(
        f"{len(ratios)} critical pairs"
        + (f", median chosen/rejected length {np.median(ratios):.2f}." if ratios else ".")
    )
    if stats and stats.get("generated_tokens") is not None:
        lines.append(f"The rollouts generated {stats['generated_tokens']:,} tokens.")
    return "".join(parts) + "".join(caption(line) for line in lines)

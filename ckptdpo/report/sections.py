"""The report's sections about the data factory: trajectory lengths, checkpoints, pairs and their quality,
resampling rounds, DTO reductions and training curves. Each takes what `ckptdpo.report.data` read and returns HTML."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
from matplotlib.ticker import MaxNLocator

from ckptdpo.report.data import DTOFigures
from ckptdpo.report.draw import COLORS, MODEL_COLORS, NOT_RUN, caption, figure, format_number, img, note, padded

PAIR_ORDER = ("r2w", "w2r", "critical", "dto")


def _mean(values: np.ndarray) -> str:
    return f"{values.mean():.0f}" if len(values) else "-"


def _bins(values: np.ndarray, n: int = 40, low: float = 0.0) -> np.ndarray:
    """Histogram bins from `low` (or the smallest value, if below) to the largest value: every value falls in one."""
    lo = min(low, float(values.min())) if len(values) else low
    hi = max(float(values.max()) if len(values) else 1.0, lo + 1.0)
    return np.linspace(lo, hi, n + 1)


def _split(traj: pa.Table, values: np.ndarray) -> dict[str, np.ndarray]:
    ok = traj.column("is_correct").to_pylist()
    return {"correct": values[[c is True for c in ok]], "incorrect": values[[c is not True for c in ok]]}


def section_lengths(traj: pa.Table | None) -> str:
    if traj is None:
        return note(f"{NOT_RUN}: no generate + verify stages in this run.")
    tokens = np.asarray(traj.column("completion_tokens").to_numpy(zero_copy_only=False), dtype=float)
    if not len(tokens):
        return note("no trajectories were generated.")
    groups = _split(traj, tokens)
    fig, (ax,) = figure()
    bins = _bins(tokens)
    for name, values in groups.items():
        if len(values):
            ax.hist(values, bins=bins, alpha=0.6, color=COLORS[name], label=f"{name} (n={len(values)})")
    ax.set_xlabel("completion tokens")
    ax.set_ylabel("trajectories")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    text = (
        f"{len(tokens)} trajectories; mean tokens correct {_mean(groups['correct'])}, "
        f"not correct {_mean(groups['incorrect'])} (incorrect, no answer, timeout)."
    )
    return img(fig, "trajectory length distribution, correct vs incorrect") + caption(text)


def section_checkpoints(traj: pa.Table | None) -> str:
    if traj is None or "num_checkpoints" not in traj.column_names:
        return note(f"{NOT_RUN}: no checkpoints stage in this run.")
    if not traj.num_rows:
        return note("no trajectories were generated.")
    counts = np.asarray(traj.column("num_checkpoints").to_numpy(zero_copy_only=False), dtype=int)
    fig, (ax,) = figure()
    top = int(np.percentile(counts, 99))
    bins = np.arange(0, max(top, 1) + 2) - 0.5
    for name, values in _split(traj, counts).items():
        if len(values):
            label = f"{name} (mean {values.mean():.1f})"
            ax.hist(np.minimum(values, top + 1), bins=bins, alpha=0.6, color=COLORS[name], label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("checkpoints per trajectory" + (f" (>{top} counted at {top + 1})" if counts.max() > top else ""))
    ax.set_ylabel("trajectories")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    share = float((counts > 0).mean())
    return img(fig, "checkpoints per trajectory") + caption(f"{share:.0%} of trajectories have a checkpoint.")


def _order(types: list[str]) -> list[str]:
    return [t for t in PAIR_ORDER if t in types] + sorted(set(types) - set(PAIR_ORDER))


def section_pairs(pairs: pa.Table | None, traj: pa.Table | None) -> str:
    if pairs is None:
        return note(f"{NOT_RUN}: no pairs in this run (resample or dto stage).")
    if not pairs.num_rows:
        return note("the pair stages ran but made no pairs.")
    types = pairs.column("pair_type").to_pylist()
    order = _order(types)
    fig, (ax1, ax2) = figure(2, width=4.6)
    ax1.bar(order, [types.count(t) for t in order], color=[COLORS.get(t, "#999999") for t in order])
    ax1.set_ylabel("pairs")
    ax1.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_title("pairs by type")
    index = pairs.column("checkpoint_index").to_pylist()
    sources = pairs.column("source_sample_id").to_pylist()
    per_traj: dict[str, int] = {}
    if traj is not None and "num_checkpoints" in traj.column_names:
        ids, counts = traj.column("sample_id").to_pylist(), traj.column("num_checkpoints").to_pylist()
        per_traj = dict(zip(ids, counts, strict=True))
    resampled = [t for t in ("r2w", "w2r") if t in types]
    relative = bool(per_traj)
    for t in resampled:
        picked = [(i, s) for ty, i, s in zip(types, index, sources, strict=True) if ty == t and i is not None]
        if relative:
            values = [i / per_traj[s] for i, s in picked if per_traj.get(s)]
            ax2.hist(values, bins=np.linspace(0, 1, 11), alpha=0.6, color=COLORS[t], label=t)
        else:
            values = [i for i, _ in picked]
            ax2.hist(values, bins=np.arange(0.5, max(values, default=1) + 1.5), alpha=0.6, color=COLORS[t], label=t)
    if not relative:
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xlabel("checkpoint position (index / checkpoints in trajectory)" if relative else "checkpoint index")
    ax2.set_title("r2w / w2r pairs by checkpoint position")
    if resampled:
        ax2.legend()
    text = ", ".join(f"{t}: {types.count(t)}" for t in order) + f"; {pairs.num_rows} pairs in all."
    return img(fig, "pairs by type and by checkpoint position") + caption(text)


def _count_text(counts: Mapping[str, int]) -> str:
    total = sum(counts.values())
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{k} {v} ({v / total:.0%})" for k, v in ordered) if total else "none"


def section_pair_quality(pairs: pa.Table | None, quality: Mapping[str, Any] | None) -> str:
    """chosen/rejected length ratio per pair type (from the pair shards); label sources and filter drops (from the
    `pair_quality` section of stats.json, see `ckptdpo.summary.summarize_pair_quality`) when the run recorded them."""
    if pairs is None or not pairs.num_rows:
        return note(f"{NOT_RUN}: no pairs in this run (resample or dto stage).")
    types = pairs.column("pair_type").to_pylist()
    chosen = pairs.column("chosen_tokens").to_pylist()
    rejected = pairs.column("rejected_tokens").to_pylist()
    ratios: dict[str, list[float]] = {}
    for t, c, r in zip(types, chosen, rejected, strict=True):
        if c is not None and r:
            ratios.setdefault(t, []).append(c / r)
    fig, (ax,) = figure()
    every = np.array([v for vs in ratios.values() for v in vs], dtype=float)
    bins = np.linspace(0, max(2.0, float(every.max()) * 1.001), 21)
    for t in _order(list(ratios)):
        ax.hist(ratios[t], bins=bins, alpha=0.6, color=COLORS.get(t, "#999999"), label=f"{t} (n={len(ratios[t])})")
    ax.axvline(1.0, ls=":", color="#888888")
    ax.set_xlim(*padded(list(bins)))
    ax.set_xlabel("chosen tokens / rejected tokens")
    ax.set_ylabel("pairs")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    lines = [
        f"{t}: median chosen/rejected {np.median(ratios[t]):.2f} (10%-90%: {np.quantile(ratios[t], 0.1):.2f}-"
        f"{np.quantile(ratios[t], 0.9):.2f})"
        for t in _order(list(ratios))
    ]
    parts = [img(fig, "chosen/rejected length ratio per pair type"), caption("; ".join(lines) + ".")]
    quality = quality or {}
    for t, q in (quality.get("by_type") or {}).items():
        labels = [
            f"{side} labels from {_count_text(q.get(f'{side}_extracted_from') or {})}"
            for side in ("chosen", "rejected")
        ]
        parts.append(caption(f"{t}: " + "; ".join(labels) + "."))
    for source, d in (quality.get("dropped") or {}).items():
        filters = d.get("by_filter") or {}
        ordered = sorted(filters.items(), key=lambda kv: (-kv[1]["count"], kv[0]))
        text = ", ".join(f"{f} {v['count']} ({v['share']:.0%})" for f, v in ordered) or "none"
        parts.append(caption(f"{source}: {format_number(d.get('candidates'))} candidate pairs; dropped by {text}."))
    if not quality:
        parts.append(note("label sources and filter drops: not recorded in stats.json (pair_quality)."))
    return "".join(parts)


def section_rounds(stats: Mapping[str, Any]) -> str:
    resample = stats.get("resample") or {}
    rounds = resample.get("rounds") or []
    if not rounds:
        return note(f"{NOT_RUN}: no resample stage in this run.")
    by_round = (resample.get("pairs") or {}).get("by_round") or {}
    x = np.arange(1, len(rounds) + 1)
    attempts = np.array([r.get("attempts", 0) for r in rounds], dtype=float)
    made = np.array([sum((by_round.get(str(r.get("round", i))) or {}).values()) for i, r in enumerate(rounds, 1)])
    tokens = np.array([r.get("tokens", 0) for r in rounds], dtype=float)
    fig, (ax1, ax2) = figure(2, width=4.6)
    for offset, direction in ((-0.2, "r2w"), (0.2, "w2r")):
        values = [(r.get(direction) or {}).get("attempts", 0) for r in rounds]
        ax1.bar(x + offset, values, width=0.4, color=COLORS[direction], label=f"{direction} attempts")
    ax1.set_xlabel("round")
    ax1.set_ylabel("continuations drawn")
    ax1.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_xticks(x)
    ax1.legend()
    per_100 = np.divide(100 * made, attempts, out=np.zeros_like(attempts), where=attempts > 0)
    per_1k = np.divide(1000 * made, tokens, out=np.zeros_like(tokens), where=tokens > 0)
    ax2.plot(x, per_100, "o-", color=MODEL_COLORS[0])
    ax2.set_ylabel("pairs per 100 attempts", color=MODEL_COLORS[0])
    ax2.set_ylim(*padded(per_100, floor=0))
    # Two units on one plot: attempts and tokens differ by orders of magnitude, so the second gets its own axis.
    twin = ax2.twinx()
    twin.plot(x, per_1k, "s--", color=MODEL_COLORS[1])
    twin.set_ylabel("pairs per 1k tokens", color=MODEL_COLORS[1])
    twin.set_ylim(*padded(per_1k, floor=0))
    twin.spines[["top"]].set_visible(False)
    ax2.set_xlim(*padded(x))
    twin.set_xlim(*padded(x))
    ax2.set_xlabel("round")
    ax2.set_xticks(x)
    ax2.set_title("yield per round")
    text = "; ".join(
        f"round {i}: {int(a)} attempts, {int(m)} pairs" for i, a, m in zip(x, attempts, made, strict=True)
    )
    return img(fig, "resampling yield per round") + caption(text + ".")


def dto_totals_text(fig: DTOFigures) -> str:
    """The DTO sentence the report and its headline share: totals over the optimized trajectories."""
    if not fig.num_optimized:
        return f"DTO optimized none of the {fig.num_looked_at} correct trajectories it probed (no exit found)."
    return (
        f"DTO optimized {fig.num_optimized} of {fig.num_looked_at} correct trajectories: their tokens "
        f"{fig.tokens_before:,} → {fig.tokens_after_truncation:,} after truncation → {fig.tokens_after:,} after "
        f"pruning, a reduction of {fig.token_reduction:.0%} ({fig.truncation_reduction:.0%} from truncation alone)."
    )


def section_dto(dto_pairs: list[tuple[int, int]], figures: DTOFigures | None, stats: Mapping[str, Any]) -> str:
    """Per-trajectory reductions and the DTO pairs' lengths; every figure over the optimized trajectories."""
    dto_stats = stats.get("dto") or {}
    if not dto_pairs and figures is None and not dto_stats:
        return note(f"{NOT_RUN}: no dto stage in this run.")
    optimized = figures is not None and figures.num_optimized > 0
    panels = int(optimized) + int(bool(dto_pairs))
    parts = []
    if panels:
        fig, axes = figure(panels, width=4.6)
        if optimized:
            ax = axes[0]
            both = np.concatenate([figures.truncation_per_trajectory, figures.per_trajectory])
            bins = _bins(both, n=20, low=0.0) if both.max() > 1 else np.linspace(min(0.0, both.min()), 1, 21)
            ax.hist(figures.truncation_per_trajectory, bins=bins, alpha=0.6, color=COLORS["r2w"], label="truncation")
            ax.hist(figures.per_trajectory, bins=bins, alpha=0.6, color=COLORS["dto"], label="truncation + pruning")
            ax.set_xlabel("token reduction per trajectory (1 - new / original)")
            ax.set_ylabel("optimized trajectories")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend()
            med = float(np.median(figures.per_trajectory))
            parts.append(caption(f"{figures.num_optimized} optimized trajectories; median reduction {med:.0%}."))
        if dto_pairs:
            ax = axes[-1]
            c = np.array([p[0] for p in dto_pairs], dtype=float)
            r = np.array([p[1] for p in dto_pairs], dtype=float)
            ax.scatter(r, c, s=14, color=COLORS["dto"], alpha=0.7)
            lim = padded([*r, *c], floor=0)
            ax.plot([0, lim[1]], [0, lim[1]], ":", color="#888888", label="no reduction")
            ax.set_xlim(*lim)
            ax.set_ylim(*lim)
            ax.set_xlabel("rejected (longest original) tokens")
            ax.set_ylabel("chosen (shortest optimized) tokens")
            ax.set_title("DTO pairs")
            ax.legend()
            parts.append(caption(f"{len(dto_pairs)} DTO pairs; median chosen/rejected {np.median(c / r):.2f}."))
        parts.insert(0, img(fig, "DTO token reductions"))
    if figures is not None:
        parts.append(caption(dto_totals_text(figures)))
    elif dto_stats.get("token_reduction") is not None:
        parts.append(
            caption(f"DTO token reduction over the optimized trajectories: {dto_stats['token_reduction']:.0%}.")
        )
    judged = dto_stats.get("segments_judged")
    if judged is not None:
        parts.append(
            caption(
                f"Judge: {judged} segments judged, {dto_stats.get('segments_removed', 0)} removed, "
                f"{dto_stats.get('judge_parse_failures', 0)} unparseable replies (kept)."
            )
        )
    return "".join(parts)


def section_training(summary: Mapping[str, Any] | None) -> str:
    if summary is None:
        return note(f"{NOT_RUN}: no train stage in this run (no train/summary.json).")
    steps = summary.get("steps") or []
    if not steps:
        return note("training logged no steps.")
    series = [("loss", "loss"), ("rewards_margins", "reward margin"), ("rewards_accuracies", "reward accuracy")]
    present = [(k, label) for k, label in series if any(s.get(k) is not None for s in steps)]
    fig, axes = figure(len(present), width=3.6)
    for ax, (key, label) in zip(axes, present, strict=True):
        xs = [s["step"] for s in steps if s.get(key) is not None]
        ys = [s[key] for s in steps if s.get(key) is not None]
        ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", color=MODEL_COLORS[0], markersize=3)
        ax.set_xlim(*padded(xs))
        ax.set_ylim(*padded(ys))
        ax.set_xlabel("step")
        ax.set_title(label)
    loss = summary.get("loss_type") or summary.get("loss") or "?"
    steps_run = summary.get("global_step", len(steps))
    text = f"{loss} training, {steps_run} steps, final loss {format_number(summary.get('final_loss'), 4)}."
    return img(fig, "training curves") + caption(text)

"""The run report (`ckptdpo report RUN_DIR`): one self-contained HTML page with plots, and `ckptdpo compare`.

Every section reads what the run left (stage shards with only the columns it plots, stats.json, the training
summary) and shows a short "not run" note where that is missing, so a report can be written after any stage.
Plots are PNGs drawn with matplotlib's object API (no pyplot, no global backend switch) and embedded as base64.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ckptdpo.errors import UserError
from ckptdpo.shards import atomic_write_bytes, list_shards, read_manifest, read_stage, read_stats

log = logging.getLogger(__name__)

REPORT_DIR = "report"
REPORT_FILE = "index.html"
COLORS = {"correct": "#2a9d8f", "incorrect": "#e76f51", "r2w": "#457b9d", "w2r": "#e9c46a", "dto": "#8d6cab"}
MODEL_COLORS = ("#264653", "#e76f51", "#2a9d8f", "#8d6cab", "#e9c46a", "#457b9d")
NOT_RUN = "not run"


# --- reading what the run left --------------------------------------------------------------------------------------


def _stage(run_dir: Path, stage: str, columns: list[str]) -> pa.Table | None:
    """A completed stage's columns, or None when the stage has no manifest (not run, or not finished)."""
    d = run_dir / stage
    m = read_manifest(d)
    if m is None:
        return None
    if not m.get("num_shards"):
        return pa.table({c: [] for c in columns})
    return read_stage(d, columns=columns)


def load_trajectories(run_dir: Path) -> pa.Table | None:
    """completion_tokens, is_correct (and num_checkpoints when located) per generated trajectory."""
    cps = _stage(run_dir, "checkpoints", ["sample_id", "completion_tokens", "is_correct", "num_checkpoints"])
    if cps is not None:
        return cps
    gen = _stage(run_dir, "generate", ["sample_id", "completion_tokens"])
    ver = _stage(run_dir, "verify", ["sample_id", "is_correct"])
    if gen is None or ver is None:
        return None
    return gen.join(ver, "sample_id", join_type="left outer")


def load_pairs(run_dir: Path) -> pa.Table | None:
    cols = ["pair_type", "source_sample_id", "checkpoint_index", "chosen_tokens", "rejected_tokens", "round"]
    for stage in ("pairs", "resample/pairs"):
        t = _stage(run_dir, stage, cols)
        if t is not None:
            return t
    return None


def load_train_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "train" / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_recipe_name(run_dir: Path) -> str | None:
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        return None
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    return data.get("name") if isinstance(data, dict) else None


# --- drawing ---------------------------------------------------------------------------------------------------------


def _figure(ncols: int = 1, width: float = 6.4, height: float = 3.6) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(width * ncols if ncols > 1 else width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, list(axes)


def _img(fig: Figure, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _caption(text: str) -> str:
    return f'<p class="caption">{html.escape(text)}</p>'


def _mean(values: np.ndarray) -> str:
    return f"{values.mean():.0f}" if len(values) else "-"


def _bins(values: np.ndarray, n: int = 40) -> np.ndarray:
    hi = max(float(values.max()) if len(values) else 1.0, 1.0)
    return np.linspace(0, hi, n + 1)


def section_lengths(traj: pa.Table | None) -> str:
    if traj is None:
        return _note(f"{NOT_RUN}: no generate + verify stages in this run.")
    tokens = np.asarray(traj.column("completion_tokens").to_numpy(zero_copy_only=False), dtype=float)
    ok = traj.column("is_correct").to_pylist()
    groups = {
        "correct": tokens[[c is True for c in ok]],
        "incorrect": tokens[[c is not True for c in ok]],
    }
    if not len(tokens):
        return _note("no trajectories were generated.")
    fig, (ax,) = _figure()
    bins = _bins(tokens)
    for name, values in groups.items():
        if len(values):
            ax.hist(values, bins=bins, alpha=0.6, color=COLORS[name], label=f"{name} (n={len(values)})")
    ax.set_xlabel("completion tokens")
    ax.set_ylabel("trajectories")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    caption = (
        f"{len(tokens)} trajectories; mean tokens correct {_mean(groups['correct'])}, "
        f"not correct {_mean(groups['incorrect'])} (incorrect, no answer, timeout)."
    )
    return _img(fig, "trajectory length distribution, correct vs incorrect") + _caption(caption)


def section_checkpoints(traj: pa.Table | None) -> str:
    if traj is None or "num_checkpoints" not in traj.column_names:
        return _note(f"{NOT_RUN}: no checkpoints stage in this run.")
    if not traj.num_rows:
        return _note("no trajectories were generated.")
    counts = np.asarray(traj.column("num_checkpoints").to_numpy(zero_copy_only=False), dtype=int)
    ok = traj.column("is_correct").to_pylist()
    fig, (ax,) = _figure()
    top = int(np.percentile(counts, 99)) if len(counts) else 0
    bins = np.arange(0, max(top, 1) + 2) - 0.5
    for name, mask in (("correct", [c is True for c in ok]), ("incorrect", [c is not True for c in ok])):
        values = counts[mask]
        if len(values):
            label = f"{name} (mean {values.mean():.1f})"
            ax.hist(np.minimum(values, top + 1), bins=bins, alpha=0.6, color=COLORS[name], label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("checkpoints per trajectory" + (f" (>{top} counted at {top + 1})" if counts.max() > top else ""))
    ax.set_ylabel("trajectories")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    share = float((counts > 0).mean())
    return _img(fig, "checkpoints per trajectory") + _caption(f"{share:.0%} of trajectories have a checkpoint.")


def section_pairs(pairs: pa.Table | None, traj: pa.Table | None) -> str:
    if pairs is None:
        return _note(f"{NOT_RUN}: no pairs in this run (resample or dto stage).")
    if not pairs.num_rows:
        return _note("the pair stages ran but made no pairs.")
    types = pairs.column("pair_type").to_pylist()
    order = [t for t in ("r2w", "w2r", "dto") if t in types] + sorted(set(types) - {"r2w", "w2r", "dto"})
    fig, (ax1, ax2) = _figure(2, width=4.6)
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
    caption = ", ".join(f"{t}: {types.count(t)}" for t in order) + f"; {pairs.num_rows} pairs in all."
    return _img(fig, "pairs by type and by checkpoint position") + _caption(caption)


def section_rounds(stats: Mapping[str, Any]) -> str:
    resample = stats.get("resample") or {}
    rounds = resample.get("rounds") or []
    if not rounds:
        return _note(f"{NOT_RUN}: no resample stage in this run.")
    by_round = (resample.get("pairs") or {}).get("by_round") or {}
    x = np.arange(1, len(rounds) + 1)
    attempts = np.array([r.get("attempts", 0) for r in rounds], dtype=float)
    made = np.array([sum((by_round.get(str(r.get("round", i))) or {}).values()) for i, r in enumerate(rounds, 1)])
    tokens = np.array([r.get("tokens", 0) for r in rounds], dtype=float)
    fig, (ax1, ax2) = _figure(2, width=4.6)
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
    ax2.set_ylim(bottom=0)
    # Two units on one plot: attempts and tokens differ by orders of magnitude, so the second gets its own axis.
    twin = ax2.twinx()
    twin.plot(x, per_1k, "s--", color=MODEL_COLORS[1])
    twin.set_ylabel("pairs per 1k tokens", color=MODEL_COLORS[1])
    twin.set_ylim(bottom=0)
    twin.spines[["top"]].set_visible(False)
    ax2.set_xlabel("round")
    ax2.set_xticks(x)
    ax2.set_title("yield per round")
    caption = "; ".join(
        f"round {i}: {int(a)} attempts, {int(m)} pairs" for i, a, m in zip(x, attempts, made, strict=True)
    )
    return _img(fig, "resampling yield per round") + _caption(caption + ".")


def load_dto_results(run_dir: Path) -> pa.Table | None:
    """Per optimized trajectory: status and token counts before, after truncation and after pruning."""
    if read_manifest(run_dir / "dto") is None:
        return None
    shards = list_shards(run_dir / "dto" / "optimized")
    if not shards:
        return None
    cols = ["status", "original_tokens", "truncated_tokens", "pruned_tokens"]
    return pa.concat_tables([pq.read_table(p, columns=cols) for p in shards])


def section_dto(pairs: pa.Table | None, results: pa.Table | None, stats: Mapping[str, Any]) -> str:
    dto_stats = stats.get("dto") or {}
    rows = []
    if pairs is not None and pairs.num_rows:
        types = pairs.column("pair_type").to_pylist()
        chosen = pairs.column("chosen_tokens").to_pylist()
        rejected = pairs.column("rejected_tokens").to_pylist()
        rows = [(c, r) for t, c, r in zip(types, chosen, rejected, strict=True) if t == "dto" and c and r]
    optimized = []
    if results is not None:
        optimized = [
            (r["original_tokens"], r["truncated_tokens"], r["pruned_tokens"] if r["status"] == "pruned" else None)
            for r in results.to_pylist()
            if r["status"] in ("pruned", "truncated") and r["original_tokens"]
        ]
    if not rows and not optimized and not dto_stats:
        return _note(f"{NOT_RUN}: no dto stage in this run.")
    panels = int(bool(optimized)) + int(bool(rows))
    parts = []
    if panels:
        fig, axes = _figure(panels, width=4.6)
        bins = np.linspace(0, 1, 21)
        if optimized:
            ax = axes[0]
            orig = np.array([o[0] for o in optimized], dtype=float)
            cut = 1 - np.array([o[1] for o in optimized], dtype=float) / orig
            final = 1 - np.array([o[2] if o[2] is not None else o[1] for o in optimized], dtype=float) / orig
            ax.hist(cut, bins=bins, alpha=0.6, color=COLORS["r2w"], label="truncated at the exit")
            ax.hist(final, bins=bins, alpha=0.6, color=COLORS["dto"], label="after judge pruning")
            ax.set_xlabel("token reduction per trajectory (1 - new / original)")
            ax.set_ylabel("correct trajectories")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend()
            parts.append(
                _caption(f"{len(optimized)} optimized trajectories; median reduction {np.median(final):.0%}.")
            )
        if rows:
            ax = axes[-1]
            c = np.array([r[0] for r in rows], dtype=float)
            r = np.array([r[1] for r in rows], dtype=float)
            ax.scatter(r, c, s=14, color=COLORS["dto"], alpha=0.7)
            hi = max(r.max(), c.max())
            ax.plot([0, hi], [0, hi], ":", color="#888888", label="no reduction")
            ax.set_xlabel("rejected (longest original) tokens")
            ax.set_ylabel("chosen (shortest optimized) tokens")
            ax.set_title("DTO pairs")
            ax.legend()
            parts.append(_caption(f"{len(rows)} DTO pairs; median chosen/rejected {np.median(c / r):.2f}."))
        parts.insert(0, _img(fig, "DTO token reductions"))
    before = dto_stats.get("tokens_before")
    if before:
        steps = [
            ("before", before),
            ("after truncation", dto_stats.get("tokens_after_truncation")),
            ("after pruning", dto_stats.get("tokens_after_pruning")),
        ]
        steps = [(name, v) for name, v in steps if v is not None]
        parts.append(_caption("DTO token totals: " + " → ".join(f"{name} {v:,}" for name, v in steps) + "."))
    return "".join(parts)


def section_training(summary: Mapping[str, Any] | None) -> str:
    if summary is None:
        return _note(f"{NOT_RUN}: no train stage in this run (no train/summary.json).")
    steps = summary.get("steps") or []
    if not steps:
        return _note("training logged no steps.")
    series = [("loss", "loss"), ("rewards_margins", "reward margin"), ("rewards_accuracies", "reward accuracy")]
    present = [(k, label) for k, label in series if any(s.get(k) is not None for s in steps)]
    fig, axes = _figure(len(present), width=3.6)
    for ax, (key, label) in zip(axes, present, strict=True):
        xs = [s["step"] for s in steps if s.get(key) is not None]
        ys = [s[key] for s in steps if s.get(key) is not None]
        ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", color=MODEL_COLORS[0], markersize=3)
        ax.set_xlabel("step")
        ax.set_title(label)
    loss = summary.get("loss_type") or summary.get("loss") or "?"
    steps_run = summary.get("global_step", len(steps))
    caption = f"{loss} training, {steps_run} steps, final loss {format_number(summary.get('final_loss'), 4)}."
    return _img(fig, "training curves") + _caption(caption)


def _eval_section(stats: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    section = stats.get("eval") or {}
    return {b: m for b, m in section.items() if isinstance(m, dict) and m}


def _model_color(names: Sequence[str], name: str) -> str:
    return MODEL_COLORS[list(names).index(name) % len(MODEL_COLORS)]


def _skipped_notes(run_dir: Path) -> str:
    stats = (read_manifest(run_dir / "eval") or {}).get("stats") or {}
    return "".join(
        _note(f"model {name} not evaluated: {why}.") for name, why in (stats.get("skipped_models") or {}).items()
    )


def section_pass_at_k(stats: Mapping[str, Any], run_dir: Path) -> str:
    section = _eval_section(stats)
    if not section:
        return _note(f"{NOT_RUN}: no eval stage in this run.")
    fig, axes = _figure(len(section), width=4.2 if len(section) > 1 else 6.4)
    for ax, (bench, models) in zip(axes, section.items(), strict=True):
        names = list(models)
        for name, m in models.items():
            curve = {int(k): v for k, v in (m.get("pass_at_k_curve") or {}).items()}
            cons = {int(k): v for k, v in (m.get("cons_at_k") or {}).items()}
            color = _model_color(names, name)
            if curve:
                ks = sorted(curve)
                ax.plot(ks, [curve[k] for k in ks], "o-", color=color, markersize=3, label=f"{name} pass@k")
            if cons:
                ks = sorted(cons)
                ax.plot(ks, [cons[k] for k in ks], "x--", color=color, alpha=0.7, label=f"{name} cons@k")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylim(0, 1.02)
        ax.set_title(bench)
        ax.legend(fontsize=8)
    caption = (
        "Unbiased pass@k (solid) and majority-vote cons@k (dashed); the method aims to lift pass@1 toward pass@k."
    )
    return _img(fig, "pass@k curves per benchmark and model") + _caption(caption) + _skipped_notes(run_dir)


def section_accuracy_tokens(stats: Mapping[str, Any]) -> str:
    section = _eval_section(stats)
    if not section:
        return _note(f"{NOT_RUN}: no eval stage in this run.")
    fig, axes = _figure(len(section), width=4.2 if len(section) > 1 else 6.4)
    for ax, (bench, models) in zip(axes, section.items(), strict=True):
        names = list(models)
        points = {n: (m.get("mean_tokens"), m.get("pass_at_1")) for n, m in models.items()}
        points = {n: p for n, p in points.items() if None not in p}
        for name, (x, y) in points.items():
            ax.scatter([x], [y], s=60, color=_model_color(names, name), label=name, zorder=3)
        ref = names[0]
        for name, (x, y) in points.items():
            if name != ref and ref in points:
                x0, y0 = points[ref]
                ax.annotate("", xy=(x, y), xytext=(x0, y0), arrowprops={"arrowstyle": "->", "color": "#888888"})
        ax.set_xlabel("mean tokens")
        ax.set_ylabel("pass@1")
        ax.set_ylim(0, 1.02)
        ax.set_xlim(left=0)
        ax.set_title(bench)
        ax.legend(fontsize=8)
    return _img(fig, "accuracy vs tokens per benchmark") + _caption(
        "Up and to the left is better: more accurate with fewer tokens. Arrows start at the reference model."
    )


def format_number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def metric_rows(section: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """The metrics table: a header and one row of formatted cells per (benchmark, model)."""
    ks = sorted({int(k) for models in section.values() for m in models.values() for k in m.get("pass_at_k") or {}})
    header = [
        "benchmark",
        "model",
        "problems",
        "pass@1",
        *[f"pass@{k}" for k in ks if k > 1],
        *[f"cons@{k}" for k in ks],
        "mean tokens",
        "tokens (incorrect)",
        "length",
        "loop",
        "eta",
        "AES",
    ]
    rows = []
    for bench, models in section.items():
        for name, m in models.items():
            pk, ck = m.get("pass_at_k") or {}, m.get("cons_at_k") or {}
            rows.append(
                [
                    bench,
                    name,
                    format_number(m.get("num_problems")),
                    format_number(m.get("pass_at_1")),
                    *[format_number(pk.get(str(k))) for k in ks if k > 1],
                    *[format_number(ck.get(str(k))) for k in ks],
                    format_number(m.get("mean_tokens")),
                    format_number(m.get("mean_tokens_incorrect")),
                    format_number(m.get("length_share")),
                    format_number(m.get("loop_share")),
                    format_number(m.get("eta")),
                    format_number(m.get("aes")),
                ]
            )
    return header, rows


def section_table(stats: Mapping[str, Any], run_dir: Path) -> str:
    section = _eval_section(stats)
    if not section:
        return _note(f"{NOT_RUN}: no eval stage in this run.")
    header, rows = metric_rows(section)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    ref = ((read_manifest(run_dir / "eval") or {}).get("stats") or {}).get("reference")
    caption = _caption(
        "length / loop: share of samples cut at max_tokens / stopped by the loop guard. eta = (acc/acc_ref) x "
        f"(tokens_ref/tokens) and AES (O1-Pruner) compare with the reference model{f' ({ref})' if ref else ''}; "
        "tokens (incorrect) counts every sample not verified correct."
    )
    return (
        f'<table class="metrics"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        + caption
        + _skipped_notes(run_dir)
    )


def headline(stats: Mapping[str, Any]) -> list[str]:
    """One sentence per benchmark: pass@1, the pass@k gap and mean tokens, reference -> each other model."""
    lines = []
    for bench, models in _eval_section(stats).items():
        names = list(models)
        ref = models[names[0]]
        for name in names[1:]:
            m = models[name]
            kmax = max((int(k) for k in m.get("pass_at_k") or {}), default=None)
            parts = [f"pass@1 {format_number(ref.get('pass_at_1'))} → {format_number(m.get('pass_at_1'))}"]
            if kmax and kmax > 1 and str(kmax) in (ref.get("pass_at_k") or {}):
                gaps = [x["pass_at_k"][str(kmax)] - (x.get("pass_at_1") or 0) for x in (ref, m)]
                parts.append(f"pass@{kmax} − pass@1 gap {gaps[0]:.3f} → {gaps[1]:.3f}")
            parts.append(
                f"mean tokens {format_number(ref.get('mean_tokens'))} → {format_number(m.get('mean_tokens'))}"
            )
            lines.append(f"{bench}, {names[0]} → {name}: " + ", ".join(parts) + ".")
        if len(names) == 1:
            lines.append(
                f"{bench}, {names[0]}: pass@1 {format_number(ref.get('pass_at_1'))}, mean tokens "
                f"{format_number(ref.get('mean_tokens'))}."
            )
    return lines


def section_overview(stats: Mapping[str, Any], run_dir: Path) -> str:
    rows = []
    problems = stats.get("problems") or {}
    if problems:
        rows.append(("problems", f"{format_number(problems.get('num_problems'))} ({problems.get('source', '')})"))
    gen = stats.get("generate") or {}
    if gen:
        rows.append(
            (
                "trajectories",
                f"{format_number(gen.get('num_samples'))}, {format_number(gen.get('completion_tokens'))} tokens",
            )
        )
    ver = stats.get("verify") or {}
    if ver:
        rows.append(("accuracy of trajectories", format_number(ver.get("accuracy"))))
    pairs = (stats.get("resample") or {}).get("pairs") or {}
    if pairs:
        by_type = ", ".join(f"{k} {v:,}" for k, v in (pairs.get("by_type") or {}).items()) or "none"
        per_1k = format_number(pairs.get("pairs_per_1k_generated_tokens"))
        rows.append(("resample pairs", f"{by_type} ({per_1k} per 1k generated tokens)"))
    collected = (read_manifest(run_dir / "pairs") or {}).get("stats") or {}
    if collected.get("by_type"):
        rows.append(("all pairs", ", ".join(f"{k} {v:,}" for k, v in collected["by_type"].items())))
    train = stats.get("train") or {}
    if train:
        keys = [k for k, v in train.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)][:5]
        rows.append(("train", ", ".join(f"{k} {format_number(train[k])}" for k in keys)))
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    lines = "".join(f"<li>{html.escape(line)}</li>" for line in headline(stats))
    out = f'<table class="overview">{body}</table>' if rows else _note("stats.json holds no stage yet.")
    return out + (f'<ul class="headline">{lines}</ul>' if lines else "")


# --- the page --------------------------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 1.5em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd;
       padding-bottom: 0.2em; margin-top: 1.8em; }
nav a { margin-right: 1em; font-size: 0.9em; } .sub { color: #666; margin-top: 0; }
img { max-width: 100%; height: auto; display: block; } .note { color: #777; font-style: italic; }
.caption { color: #555; font-size: 0.9em; } .error { color: #b00020; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f4f4f4; } td:first-child, td:nth-child(2), .overview th { text-align: left; }
.overview td { text-align: left; } .headline li { margin: 0.2em 0; }
"""


def render_report(run_dir: Path) -> str:
    """The report's HTML for one run directory."""
    run_dir = Path(run_dir)
    stats = read_stats(run_dir)
    cache: dict[str, Any] = {}

    def data(name: str, fn: Callable[[], Any]) -> Any:
        if name not in cache:
            cache[name] = fn()
        return cache[name]

    traj = lambda: data("traj", lambda: load_trajectories(run_dir))  # noqa: E731
    pairs = lambda: data("pairs", lambda: load_pairs(run_dir))  # noqa: E731
    sections: list[tuple[str, str, Callable[[], str]]] = [
        ("overview", "Overview", lambda: section_overview(stats, run_dir)),
        ("lengths", "Trajectory lengths: correct vs incorrect", lambda: section_lengths(traj())),
        ("checkpoints", "Checkpoints per trajectory", lambda: section_checkpoints(traj())),
        ("pairs", "Pairs by type and checkpoint position", lambda: section_pairs(pairs(), traj())),
        ("rounds", "Resampling yield per round", lambda: section_rounds(stats)),
        ("dto", "DTO token reductions", lambda: section_dto(pairs(), load_dto_results(run_dir), stats)),
        ("training", "Training curves", lambda: section_training(load_train_summary(run_dir))),
        ("passk", "pass@k: base vs trained", lambda: section_pass_at_k(stats, run_dir)),
        ("acctokens", "Accuracy vs tokens", lambda: section_accuracy_tokens(stats)),
        ("metrics", "Metrics", lambda: section_table(stats, run_dir)),
    ]
    parts = []
    for anchor, title, fn in sections:
        try:
            body = fn()
        except Exception as e:  # one broken section must not cost the whole report
            log.exception("report section %s failed", anchor)
            body = f'<p class="error">this section could not be drawn: {html.escape(f"{type(e).__name__}: {e}")}</p>'
        parts.append(f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>')
    nav = "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t, _ in sections)
    name = load_recipe_name(run_dir)
    title = f"ckptdpo report: {name or run_dir.name}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # An empty icon, so the browser does not request /favicon.ico next to a file:// page.
        f'<link rel="icon" href="data:,"><title>{html.escape(title)}</title><style>{CSS}</style></head><body>'
        f'<h1>{html.escape(title)}</h1><p class="sub">{html.escape(str(run_dir))}</p><nav>{nav}</nav>'
        + "".join(parts)
        + "</body></html>\n"
    )


def build_report(run_dir: Path) -> Path:
    """Write `<run_dir>/report/index.html` atomically; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory; pass the directory a run wrote (with stats.json).")
    path = run_dir / REPORT_DIR / REPORT_FILE
    atomic_write_bytes(path, render_report(run_dir).encode())
    return path


def headline_markdown(run_dir: Path) -> str:
    """The report's headline and metrics table as Markdown, for a Prefect artifact."""
    stats = read_stats(run_dir)
    lines = [f"# ckptdpo report: {run_dir}", "", f"Report: `{Path(run_dir) / REPORT_DIR / REPORT_FILE}`", ""]
    lines += [f"- {line}" for line in headline(stats)]
    section = _eval_section(stats)
    if section:
        header, rows = metric_rows(section)
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --- compare ---------------------------------------------------------------------------------------------------------

COMPARED = (
    ("pass@1", lambda m: m.get("pass_at_1")),
    ("mean tokens", lambda m: m.get("mean_tokens")),
    ("mean tokens (incorrect)", lambda m: m.get("mean_tokens_incorrect")),
    ("length share", lambda m: m.get("length_share")),
    ("loop share", lambda m: m.get("loop_share")),
    ("eta", lambda m: m.get("eta")),
    ("AES", lambda m: m.get("aes")),
)


def read_eval_section(run_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory; pass two run directories.")
    section = _eval_section(read_stats(run_dir))
    if not section:
        raise UserError(f"{run_dir}: stats.json has no eval section; run the eval stage there first.")
    return section


def compare_rows(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, str, str, Any, Any]]:
    """(benchmark, model, metric, value in A, value in B) for every metric of every (benchmark, model) in either."""
    out = []
    keys = list(dict.fromkeys([(bn, mn) for s in (a, b) for bn, ms in s.items() for mn in ms]))
    for bench, model in keys:
        ma, mb = (s.get(bench, {}).get(model) for s in (a, b))
        ks = sorted({int(k) for m in (ma, mb) if m for k in m.get("pass_at_k") or {}})
        metrics = list(COMPARED[:1])
        metrics += [(f"pass@{k}", lambda m, k=k: (m.get("pass_at_k") or {}).get(str(k))) for k in ks if k > 1]
        metrics += [(f"cons@{k}", lambda m, k=k: (m.get("cons_at_k") or {}).get(str(k))) for k in ks]
        metrics += list(COMPARED[1:])
        for label, get in metrics:
            out.append((bench, model, label, get(ma) if ma else None, get(mb) if mb else None))
    return out

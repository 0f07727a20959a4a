"""The cost-matched baseline in the report and in `ckptdpo compare`: base, DPO on the factory's pairs and GRPO at
the factory's generation cost side by side (pass@1, pass@k, the gap between them, mean tokens, eta, AES and what
each cost), paired bootstrap intervals for DPO vs base, GRPO vs base and DPO vs GRPO, and the headline saying which
of the two trained models is ahead and whether that is significant."""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptdpo.grpo.budget import factory_token_sources
from ckptdpo.report.data import eval_section, load_grpo_summary, load_train_summary, pair_intervals
from ckptdpo.report.draw import (
    MODEL_COLORS,
    NOT_RUN,
    caption,
    figure,
    format_number,
    img,
    interval_text,
    note,
    padded,
    signed,
)
from ckptdpo.report.evaluation import _table
from ckptdpo.shards import read_stats

BASE, DPO, GRPO = "base", "trained", "grpo"
LABELS = {BASE: "base", DPO: "DPO on the factory's pairs", GRPO: "GRPO at matched cost"}
GRPO_SET_BUDGET = "GRPO at the recipe's budget"
SHORT = {BASE: "base", DPO: "DPO", GRPO: "GRPO"}
# (a, b): intervals of b - a, paired by problem.
COMPARISONS = ((BASE, DPO), (BASE, GRPO), (GRPO, DPO))

Section = Mapping[str, Mapping[str, Mapping[str, Any]]]
PairIntervals = Mapping[tuple[str, str], Mapping[str, Mapping[str, Any]]]


def model_costs(
    stats: Mapping[str, Any], train: Mapping[str, Any] | None, grpo: Mapping[str, Any] | None
) -> dict[str, dict[str, Any]]:
    """What each model cost beyond the base: completion tokens generated to train it, tokens trained on, and the
    training stage's wall-clock seconds. DPO's generated tokens are the factory's (generate + resample + values +
    DTO probes); GRPO's are its own, against its budget."""
    sources = factory_token_sources(stats)
    costs: dict[str, dict[str, Any]] = {BASE: {"generated_tokens": 0, "trained_tokens": 0, "train_s": 0.0}}
    if train is not None or sources:
        costs[DPO] = {
            "generated_tokens": sum(sources.values()) if sources else None,
            "sources": sources,
            "trained_tokens": (train or {}).get("tokens"),
            "train_s": (train or {}).get("wall_time_s"),
        }
    if grpo is not None:
        costs[GRPO] = {
            "generated_tokens": grpo.get("generated_tokens"),
            "budget": grpo.get("generation_budget"),
            "budget_setting": grpo.get("budget_setting"),
            "trained_tokens": grpo.get("trained_tokens"),
            "train_s": grpo.get("wall_time_s"),
            "steps": grpo.get("global_step"),
            "stopped_by": grpo.get("stopped_by"),
        }
    return costs


def run_pair_intervals(run_dir: Path, section: Section, seed: int = 0) -> dict[tuple[str, str], dict[str, Any]]:
    """Paired intervals of every comparison in COMPARISONS, {(a, b): {benchmark: intervals of b - a}}."""
    return {(a, b): pair_intervals(run_dir, section, a, b, seed=seed) for a, b in COMPARISONS}


def _kmax(models: Mapping[str, Mapping[str, Any]]) -> int | None:
    """The largest k > 1 every model of the benchmark has pass@k for."""
    shared = None
    for m in models.values():
        ks = {int(k) for k in m.get("pass_at_k") or {} if int(k) > 1}
        shared = ks if shared is None else shared & ks
    return max(shared) if shared else None


def _three(models: Mapping[str, Any]) -> list[str]:
    return [n for n in (BASE, DPO, GRPO) if n in models]


def model_label(name: str, costs: Mapping[str, Mapping[str, Any]]) -> str:
    """How a model is named in the tables: GRPO is 'at matched cost' only when its budget was the factory's."""
    if name == GRPO and (costs.get(GRPO) or {}).get("budget_setting") not in (None, "match"):
        return GRPO_SET_BUDGET
    return LABELS[name]


def cost_matched_rows(section: Section, costs: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One row per (benchmark, model) of base / DPO / GRPO: pass@1, pass@k, the gap, mean tokens, eta and AES
    (against the eval reference) and the cost columns."""
    header = ["benchmark", "model", "problems", "pass@1", "pass@k", "gap (pass@k − pass@1)", "mean tokens", "eta",
              "AES", "generated tokens (cost)", "trained tokens"]  # fmt: skip
    rows = []
    for bench, models in section.items():
        k = _kmax({n: models[n] for n in _three(models)})
        for name in _three(models):
            m, cost = models[name], costs.get(name) or {}
            pk = (m.get("pass_at_k") or {}).get(str(k)) if k else None
            p1 = m.get("pass_at_1")
            rows.append(
                [
                    bench,
                    model_label(name, costs),
                    format_number(m.get("num_problems")),
                    format_number(p1),
                    f"pass@{k} {format_number(pk)}" if k else "-",
                    format_number(pk - p1) if pk is not None and p1 is not None else "-",
                    format_number(m.get("mean_tokens")),
                    format_number(m.get("eta")),
                    format_number(m.get("aes")),
                    format_number(cost.get("generated_tokens")),
                    format_number(cost.get("trained_tokens")),
                ]
            )
    return header, rows


def _iv(iv: Mapping[str, Any] | None, digits: int = 3) -> str:
    return interval_text(dict(iv), digits) if iv else "-"


def comparison_rows(section: Section, pairs: PairIntervals) -> tuple[list[str], list[list[str]]]:
    """One row per (benchmark, comparison): the paired differences b - a with their 95% intervals (`*`:
    verdict) for pass@1, pass@k and mean tokens, the efficiency ratio eta of b against a, and the verdict."""
    header = ["benchmark", "comparison", "problems", "Δ pass@1", "Δ pass@k", "Δ mean tokens", "eta (b vs a)",
              "verdict on pass@1"]  # fmt: skip
    rows = []
    for bench, models in section.items():
        k = _kmax({n: models[n] for n in _three(models)})
        for a, b in COMPARISONS:
            iv = (pairs.get((a, b)) or {}).get(bench)
            if a not in models or b not in models or not iv:
                continue
            pk = (iv.get("pass_at_k") or {}).get(str(k)) if k else None
            rows.append(
                [
                    bench,
                    f"{SHORT[b]} − {SHORT[a]}",
                    format_number(iv.get("num_problems")),
                    _iv(iv.get("pass_at_1")),
                    f"pass@{k} {_iv(pk)}" if pk else "-",
                    _iv(iv.get("mean_tokens"), 0),
                    _iv(iv.get("eta")),
                    _verdict(iv.get("pass_at_1"), SHORT[b], SHORT[a]),
                ]
            )
    return header, rows


def _verdict(iv: Mapping[str, Any] | None, b: str, a: str) -> str:
    """'DPO ahead, significant' / 'GRPO ahead, not significant' / 'tied' for an interval of b - a."""
    if not iv or iv.get("estimate") is None:
        return "-"
    est = iv["estimate"]
    if est == 0:
        return "tied" + ("" if iv.get("significant") else ", no significant difference")
    leader = b if est > 0 else a
    return f"{leader} ahead, " + ("significant" if iv.get("significant") else "not significant")


def cost_matched_headline(section: Section, pairs: PairIntervals, costs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One sentence per benchmark with both trained models: which is ahead on pass@1 (DPO on the factory's pairs or
    GRPO at matched cost), by how much, whether significantly, and at what generation cost."""
    lines = []
    dpo, grpo = costs.get(DPO) or {}, costs.get(GRPO) or {}
    cost = (
        f"; generated tokens: factory {format_number(dpo.get('generated_tokens'))}, "
        f"GRPO {format_number(grpo.get('generated_tokens'))}"
        + (f" (budget {format_number(grpo.get('budget'))})" if grpo.get("budget") else "")
    )
    for bench, models in section.items():
        if DPO not in models or GRPO not in models:
            continue
        iv = ((pairs.get((GRPO, DPO)) or {}).get(bench) or {}).get("pass_at_1")
        p_dpo, p_grpo = models[DPO].get("pass_at_1"), models[GRPO].get("pass_at_1")
        diff = ""
        if iv and iv.get("low") is not None:
            diff = f" (Δ {signed(iv['estimate'])}, 95% CI [{signed(iv['low'])}, {signed(iv['high'])}])"
        verdict = _verdict(iv, "DPO", "GRPO") if iv else "no interval (eval shards missing)"
        lines.append(
            f"{bench}: {LABELS[DPO]} pass@1 {format_number(p_dpo)} vs {model_label(GRPO, costs)} "
            f"{format_number(p_grpo)}{diff}: {verdict}{cost}."
        )
    return lines


def cost_matched_view(run_dir: Path, stats: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """What the report section and `ckptdpo compare` show of one run: the costs, the side-by-side and comparison
    tables (header, rows) and the headline; None when the run has no GRPO baseline."""
    run_dir = Path(run_dir)
    stats = read_stats(run_dir) if stats is None else stats
    section = eval_section(stats)
    grpo = load_grpo_summary(run_dir)
    if grpo is None and not any(GRPO in models for models in section.values()):
        return None
    costs = model_costs(stats, load_train_summary(run_dir), grpo)
    shown = {b: m for b, m in section.items() if DPO in m or GRPO in m}
    pairs = run_pair_intervals(run_dir, shown) if shown else {}
    return {
        "grpo": grpo,
        "costs": costs,
        "budget_text": _budget_text(costs),
        "headline": cost_matched_headline(shown, pairs, costs),
        "models": cost_matched_rows(shown, costs),
        "comparisons": comparison_rows(shown, pairs),
    }


def section_cost_matched(run_dir: Path, stats: Mapping[str, Any] | None = None) -> str:
    """The report section: costs, the three models side by side, the paired comparisons, GRPO's reward curve."""
    view = cost_matched_view(run_dir, stats)
    if view is None:
        return note(f"{NOT_RUN}: no grpo stage in this run (no grpo/summary.json, no grpo model evaluated).")
    parts = [_costs_table(view["costs"]), caption(view["budget_text"])]
    if view["headline"]:
        parts.append('<ul class="headline">' + "".join(f"<li>{html.escape(x)}</li>" for x in view["headline"]))
        parts.append("</ul>")
    header, rows = view["models"]
    if rows:
        parts.append(_table(header, rows, "metrics"))
        header, rows = view["comparisons"]
        if rows:
            parts.append(_table(header, rows, "metrics cross"))
        parts.append(caption(TABLE_NOTE))
    else:
        parts.append(note(f"{NOT_RUN}: no eval of the trained models in this run."))
    grpo = view["grpo"]
    if grpo is not None and grpo.get("steps"):
        parts.append(_reward_curve(grpo))
    return "".join(parts)


TABLE_NOTE = (
    "Δ: b minus a over the problems both models were evaluated on, [low, high] its 95% paired bootstrap interval "
    "(2,000 resamples); eta (b vs a) = (pass@1_b/pass@1_a) x (tokens_a/tokens_b), no change "
    "= 1. eta and AES in the first table are against the eval reference. Generated tokens: what was generated to "
    "train the model (DPO: the factory's generation, resampling, values and DTO probes; GRPO: its own completions)."
)


def _costs_table(costs: Mapping[str, Mapping[str, Any]]) -> str:
    header = ["model", "generated tokens", "trained tokens", "training wall s", "steps"]
    rows = [
        [
            model_label(name, costs),
            format_number(c.get("generated_tokens")),
            format_number(c.get("trained_tokens")),
            format_number(c.get("train_s")),
            format_number(c.get("steps")),
        ]
        for name, c in costs.items()
    ]
    return _table(header, rows, "metrics")


def _budget_text(costs: Mapping[str, Mapping[str, Any]]) -> str:
    dpo, grpo = costs.get(DPO) or {}, costs.get(GRPO)
    sources = ", ".join(f"{k} {v:,}" for k, v in (dpo.get("sources") or {}).items()) or "none recorded"
    text = f"The factory generated {format_number(dpo.get('generated_tokens'))} completion tokens ({sources})."
    if grpo is None:
        return text + " GRPO: not run."
    budget, generated = grpo.get("budget"), grpo.get("generated_tokens")
    if budget:
        how = "matched to the factory's" if grpo.get("budget_setting") == "match" else "set in the recipe"
        text += (
            f" GRPO's budget was {budget:,} tokens ({how}); it generated {format_number(generated)} "
            f"({format_number(100 * generated / budget, 1)}% of it) in {format_number(grpo.get('steps'))} steps and "
            f"stopped by {grpo.get('stopped_by')}."
        )
    else:
        text += f" GRPO ran without a budget and generated {format_number(generated)} tokens."
    return text


def _reward_curve(grpo: Mapping[str, Any]) -> str:
    steps = grpo["steps"]
    fig, (ax1, ax2) = figure(2, width=4.6)
    xs = [s["step"] for s in steps]
    for key, label, color in (("reward_mean", "mean reward", MODEL_COLORS[0]), ("skipped_share", "skipped", "#999")):
        pts = [(s["step"], s[key]) for s in steps if s.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts, strict=True), "o-", color=color, markersize=3, label=label)
    ax1.set_xlim(*padded(xs))
    ax1.set_ylim(*padded([], floor=0, ceiling=1))
    ax1.set_xlabel("step")
    ax1.set_title("GRPO reward per step")
    ax1.legend(fontsize=8)
    total, cumulative = 0, []
    for s in steps:
        total += s["generated_tokens"]
        cumulative.append(total)
    ax2.plot(xs, cumulative, "o-", color=MODEL_COLORS[1], markersize=3, label="generated tokens")
    budget = grpo.get("generation_budget")
    if budget:
        # A data-coordinate line (not axhline, whose x runs in axes units), so every plotted point is on the axes.
        ax2.plot([xs[0], xs[-1]], [budget, budget], ":", color="#888888", label="budget")
    ax2.set_xlim(*padded(xs))
    ax2.set_ylim(*padded([*cumulative, budget or 0], floor=0))
    ax2.set_xlabel("step")
    ax2.set_title("generated tokens (cumulative)")
    ax2.legend(fontsize=8)
    lengths = [s["completion_length"] for s in steps if s.get("completion_length") is not None]
    mean_len = sum(lengths) / len(lengths) if lengths else None
    text = (
        f"{len(steps)} steps; mean completion length {format_number(mean_len)} tokens; skipped (verifier failures) "
        f"{format_number(grpo.get('skipped_completions'))} of {format_number(grpo.get('completions'))} completions."
    )
    return img(fig, "GRPO reward and generated tokens per step") + caption(text)

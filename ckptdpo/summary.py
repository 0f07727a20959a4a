"""Per-stage statistics for stats.json and the Prefect artifacts, computed from stage tables."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ckptdpo.schemas import PAIRS


def describe(values: Sequence[float]) -> dict[str, float | None]:
    """mean / median / max (None when empty)."""
    if not values:
        return {"mean": None, "median": None, "max": None}
    return {"mean": round(statistics.fmean(values), 3), "median": statistics.median(values), "max": max(values)}


def summarize_generate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    tokens = [r["completion_tokens"] for r in rows]
    return {
        "num_problems": len({r["problem_id"] for r in rows}),
        "num_samples": len(rows),
        "completion_tokens": sum(tokens),
        "completion_tokens_per_sample": describe(tokens),
        "finish_reasons": dict(Counter(r["finish_reason"] for r in rows)),
    }


def summarize_verify(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by_status = Counter(r["status"] for r in rows)
    per_problem: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        per_problem[r["problem_id"]].append(r["status"] == "correct")
    return {
        "num_samples": len(rows),
        "by_status": dict(by_status),
        # How each label was read (box, final statement, none): how sure the verdicts are.
        "by_extracted_from": dict(Counter(r.get("extracted_from") or "unknown" for r in rows)),
        "accuracy": round(by_status["correct"] / len(rows), 4) if rows else None,
        "problems_all_correct": sum(all(v) for v in per_problem.values()),
        "problems_none_correct": sum(not any(v) for v in per_problem.values()),
        "problems_mixed": sum(any(v) and not all(v) for v in per_problem.values()),
    }


def summarize_checkpoints(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    groups = {"all": rows}
    groups["correct"] = [r for r in rows if r["is_correct"] is True]
    groups["incorrect"] = [r for r in rows if r["is_correct"] is False]
    return {
        "num_trajectories": len(rows),
        "with_checkpoints": sum(1 for r in rows if r["num_checkpoints"] > 0),
        "by_correctness": {
            name: {
                "count": len(g),
                "paragraphs": describe([r["num_paragraphs"] for r in g]),
                "checkpoints": describe([r["num_checkpoints"] for r in g]),
                "completion_tokens": describe([r["completion_tokens"] for r in g]),
            }
            for name, g in groups.items()
        },
    }


def summarize_round(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Attempts and outcomes of one resampling round, by direction."""
    out: dict[str, Any] = {"attempts": len(rows), "tokens": sum(r["completion_tokens"] for r in rows)}
    for direction in ("r2w", "w2r"):
        d = [r for r in rows if r["direction"] == direction]
        out[direction] = {
            "attempts": len(d),
            "slots": len({(r["source_sample_id"], r["checkpoint_index"]) for r in d}),
            "by_status": dict(Counter(r["status"] for r in d)),
            "finish_reasons": dict(Counter(r["finish_reason"] for r in d)),
        }
    return out


def summarize_pairs(rows: Sequence[dict[str, Any]] | pa.Table, generated_tokens: int) -> dict[str, Any]:
    """Pair counts by type, round and checkpoint, token statistics and yield; from rows or an Arrow table of them.

    Computed over Arrow columns: the pair stage of a large run holds hundreds of thousands of pairs, and one Python
    dict per pair would dominate the stage's memory.
    """
    table = (
        rows
        if isinstance(rows, pa.Table)
        else pa.Table.from_pylist(list(rows), schema=_PAIR_SUMMARY)
        if rows
        else None
    )
    if table is None or table.num_rows == 0:
        return {
            "num_pairs": 0,
            "by_type": {},
            "by_round": {},
            "by_checkpoint_index": {},
            "problems_with_pairs": 0,
            "tokens": {k: describe([]) for k in ("prompt", "chosen", "rejected")},
            "pairs_per_1k_generated_tokens": 0.0 if generated_tokens else None,
        }
    by_round: dict[str, dict[str, int]] = defaultdict(dict)
    for r in table.group_by(["round", "pair_type"]).aggregate([([], "count_all")]).to_pylist():
        by_round[str(r["round"])][r["pair_type"]] = r["count_all"]
    return {
        "num_pairs": table.num_rows,
        "by_type": _counts(table.column("pair_type")),
        "by_round": {k: dict(sorted(v.items())) for k, v in sorted(by_round.items())},
        "by_checkpoint_index": dict(sorted((str(k), v) for k, v in _counts(table.column("checkpoint_index")).items())),
        "problems_with_pairs": pc.count_distinct(table.column("problem_id")).as_py(),
        "tokens": {
            side: _describe_column(table.column(f"{side}_tokens")) for side in ("prompt", "chosen", "rejected")
        },
        "pairs_per_1k_generated_tokens": round(1000 * table.num_rows / generated_tokens, 4)
        if generated_tokens
        else None,
    }


_PAIR_SUMMARY = pa.schema(
    [
        PAIRS.field(n)
        for n in (
            "pair_type",
            "problem_id",
            "round",
            "checkpoint_index",
            "prompt_tokens",
            "chosen_tokens",
            "rejected_tokens",
        )
    ]  # fmt: skip
)


def _counts(column: pa.ChunkedArray) -> dict[Any, int]:
    return {r["values"]: r["counts"] for r in pc.value_counts(column).to_pylist()}


def _describe_column(column: pa.ChunkedArray) -> dict[str, float | None]:
    """`describe` over an Arrow column (the median interpolates between the middle two, as statistics.median)."""
    if len(column) == 0:
        return describe([])
    median = pc.quantile(column, q=0.5).to_pylist()[0]
    return {
        "mean": round(pc.mean(column).as_py(), 3),
        "median": int(median) if float(median).is_integer() else median,
        "max": pc.max(column).as_py(),
    }


PAIR_SOURCES = {"r2w": "resample", "w2r": "resample", "critical": "values", "dto": "dto"}
RATIO_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values (numpy's default), without numpy."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize_pair_quality(
    rows: Sequence[dict[str, Any]],
    dropped: dict[str, dict[str, int]] | None = None,
    sources: dict[str, str] = PAIR_SOURCES,
) -> dict[str, Any]:
    """Pair quality figures for stats.json (`pair_quality`), shown by the report.

    - `rows`: the kept pairs, with pair_type, chosen_tokens, rejected_tokens and, when known, how each side's label
      was read (`chosen_extracted_from` / `rejected_extracted_from`: the verifier's Verdict.extracted_from, e.g.
      "boxed" or "final_statement"; missing or None counts as "unknown").
    - `dropped`: per producing stage (resample, dto), the pairs each filter dropped ({filter: count}); a stage's
      candidates are its kept pairs plus its drops, so each filter's share is of the candidates.
    Returns {"by_type": {type: {num_pairs, chosen_extracted_from, rejected_extracted_from, length_ratio}},
    "dropped": {stage: {candidates, by_filter: {filter: {count, share}}}}}; length_ratio is chosen/rejected tokens
    with count, mean, the RATIO_QUANTILES and the share of pairs whose chosen side is shorter.
    """
    by_type: dict[str, Any] = {}
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["pair_type"]].append(r)
    for t, group in sorted(groups.items()):
        ratios = sorted(r["chosen_tokens"] / r["rejected_tokens"] for r in group if r["rejected_tokens"])
        ratio: dict[str, Any] = {"count": len(ratios)}
        if ratios:
            ratio["mean"] = round(statistics.fmean(ratios), 4)
            ratio.update({f"p{round(q * 100)}": round(_quantile(ratios, q), 4) for q in RATIO_QUANTILES})
            ratio["chosen_shorter"] = round(sum(x < 1 for x in ratios) / len(ratios), 4)
        by_type[t] = {
            "num_pairs": len(group),
            **{
                f"{side}_extracted_from": dict(Counter(r.get(f"{side}_extracted_from") or "unknown" for r in group))
                for side in ("chosen", "rejected")
            },
            "length_ratio": ratio,
        }
    kept = Counter(sources.get(r["pair_type"], r["pair_type"]) for r in rows)
    out_dropped = {}
    for stage, filters in (dropped or {}).items():
        candidates = kept[stage] + sum(filters.values())
        out_dropped[stage] = {
            "candidates": candidates,
            "by_filter": {
                f: {"count": n, "share": round(n / candidates, 4) if candidates else 0.0} for f, n in filters.items()
            },
        }
    return {"by_type": by_type, "dropped": out_dropped}

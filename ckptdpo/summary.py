"""Per-stage statistics for stats.json and the Prefect artifacts, computed from stage tables."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any


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


def summarize_pairs(rows: Sequence[dict[str, Any]], generated_tokens: int) -> dict[str, Any]:
    by_type = Counter(r["pair_type"] for r in rows)
    by_round: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        by_round[str(r["round"])][r["pair_type"]] += 1
    return {
        "num_pairs": len(rows),
        "by_type": dict(by_type),
        "by_round": {k: dict(v) for k, v in sorted(by_round.items())},
        "by_checkpoint_index": dict(sorted(Counter(str(r["checkpoint_index"]) for r in rows).items())),
        "problems_with_pairs": len({r["problem_id"] for r in rows}),
        "tokens": {
            "prompt": describe([r["prompt_tokens"] for r in rows]),
            "chosen": describe([r["chosen_tokens"] for r in rows]),
            "rejected": describe([r["rejected_tokens"] for r in rows]),
        },
        "pairs_per_1k_generated_tokens": round(1000 * len(rows) / generated_tokens, 4) if generated_tokens else None,
    }

"""DTO pairs: per problem, the shortest optimized trajectory (chosen) against the longest original (rejected)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ckptdpo.dto.optimize import DTOResult
from ckptdpo.shards import content_id


def build_dto_pairs(
    problem_rows: Iterable[dict[str, Any]],
    optimized: Iterable[DTOResult],
    original_trajectories: Iterable[dict[str, Any]],
    count_tokens: Callable[[Sequence[str]], list[int]],
    *,
    rejected: str = "longest",
    model: str | None = None,
) -> list[dict[str, Any]]:
    """PAIRS rows (pair_type "dto"), at most one per problem: shortest optimized vs longest original trajectory.

    - `problem_rows`: PROBLEMS rows (problem_id, answer); `optimized`: DTOResults (those with a text count);
      `original_trajectories`: the problems' generated trajectories (sample_id, problem_id, prompt, completion,
      and is_correct or status for `rejected="longest_correct"`; `model` when present and `model` is not given).
    - chosen: the optimized text with the fewest tokens (every optimized text leads to the gold answer).
    - rejected: by default the longest original trajectory whatever its verdict, as in DTO: the long ones are
      mostly wrong, looping or cut at the token limit, which is what the pair should teach away from;
      `rejected="longest_correct"` takes the longest correct one instead (a pure length preference).
    - prompt: the chat prompt of the chosen trajectory's source (no prefix); `checkpoint_index` is its exit index.
    - Lengths are counted with `count_tokens` for both sides (one call); a problem is skipped when its chosen text
      is not strictly shorter than its rejected one. Ties go to the smaller sample_id, so the result is
      deterministic, and `pair_id` is the content id of (prompt, chosen, rejected).
    """
    if rejected not in ("longest", "longest_correct"):
        raise ValueError(f"rejected must be 'longest' or 'longest_correct', got {rejected!r}")
    gold = {row["problem_id"]: row["answer"] for row in problem_rows}
    originals = {t["sample_id"]: t for t in original_trajectories}
    by_problem: dict[str, list[dict[str, Any]]] = {}
    for t in originals.values():
        if rejected == "longest_correct" and not _is_correct(t):
            continue
        by_problem.setdefault(t["problem_id"], []).append(t)
    chosen_by_problem: dict[str, list[DTOResult]] = {}
    for r in optimized:
        if r.text is None:
            continue
        if r.sample_id not in originals:
            raise ValueError(f"optimized trajectory {r.sample_id} is not among the original trajectories")
        chosen_by_problem.setdefault(r.problem_id, []).append(r)

    problems = sorted(p for p in chosen_by_problem if p in by_problem and p in gold)
    texts, spans = [], {}
    for p in problems:
        start = len(texts)
        texts += [r.text for r in chosen_by_problem[p]] + [t["completion"] for t in by_problem[p]]
        spans[p] = start
    counts = count_tokens(texts) if texts else []
    if len(counts) != len(texts):
        raise RuntimeError(f"count_tokens returned {len(counts)} counts for {len(texts)} texts")

    candidates = []
    for p in problems:
        opts, origs, start = chosen_by_problem[p], by_problem[p], spans[p]
        opt_tokens = counts[start : start + len(opts)]
        orig_tokens = counts[start + len(opts) : start + len(opts) + len(origs)]
        c_tokens, chosen = min(zip(opt_tokens, opts, strict=True), key=lambda x: (x[0], x[1].sample_id))
        r_tokens, worst = min(zip(orig_tokens, origs, strict=True), key=lambda x: (-x[0], x[1]["sample_id"]))
        if c_tokens >= r_tokens:
            continue
        candidates.append((p, chosen, c_tokens, worst, r_tokens, originals[chosen.sample_id]))
    prompt_counts = count_tokens([source["prompt"] for *_, source in candidates]) if candidates else []

    return [
        _pair_row(p, chosen, c_tokens, worst, r_tokens, source, prompt_tokens, gold[p], model)
        for (p, chosen, c_tokens, worst, r_tokens, source), prompt_tokens in zip(
            candidates, prompt_counts, strict=True
        )
    ]


def _pair_row(
    problem_id: str,
    chosen: DTOResult,
    chosen_tokens: int,
    worst: dict[str, Any],
    rejected_tokens: int,
    source: dict[str, Any],
    prompt_tokens: int,
    gold: str,
    model: str | None,
) -> dict[str, Any]:
    """One PAIRS row of type dto: the chosen trajectory's prompt, its optimized text, the longest original."""
    prompt = source["prompt"]
    return {
        "pair_id": content_id(prompt, chosen.text, worst["completion"]),
        "pair_type": "dto",
        "problem_id": problem_id,
        "prompt": prompt,
        "chosen": chosen.text,
        "rejected": worst["completion"],
        "gold_answer": gold,
        "source_sample_id": chosen.sample_id,
        "checkpoint_index": chosen.exit_index,
        "prompt_tokens": prompt_tokens,
        "chosen_tokens": chosen_tokens,
        "rejected_tokens": rejected_tokens,
        "round": None,
        "attempt_id": None,
        "model": model if model is not None else source.get("model"),
    }


def _is_correct(trajectory: dict[str, Any]) -> bool:
    if "is_correct" in trajectory and trajectory["is_correct"] is not None:
        return bool(trajectory["is_correct"])
    return trajectory.get("status") == "correct"

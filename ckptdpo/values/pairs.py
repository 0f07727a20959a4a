"""`critical` pairs: at a wrong trajectory's first error, a correct rollout from the last good checkpoint (chosen)
against the trajectory's own suffix from there (rejected), with no generation beyond the value estimates."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from ckptdpo.resample import pair_drop_reason, pair_row
from ckptdpo.values.search import WRONG_STATUSES, Search, VerifyFn

PAIR_TYPE = "critical"


def first_bad_step(search: Search) -> int | None:
    """The 1-based step holding the first error, steps being the text between consecutive checkpoints (step i ends
    at checkpoint i, step n + 1 is the text after the last one): the critical checkpoint; for a wrong trajectory
    whose search ran to its end with no checkpoint below the threshold, its last step; else None (no error found,
    or a search stopped by its cap before it could tell)."""
    if search.critical_index is not None:
        return search.critical_index
    if search.resolved and search.trajectory["status"] in WRONG_STATUSES:
        return search.num_checkpoints + 1
    return None


def last_good_checkpoint(search: Search, bad_step: int) -> int:
    """The last probed checkpoint before the first bad step (its value is at or above the threshold, as every probed
    one before the critical checkpoint is), or 0, the start of the completion, when none was probed before it."""
    return max((i for i in search.probes if i < bad_step), default=0)


def _candidates(search: Search, good: int, siblings: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(text, attempt_id) of the correct continuations from the last good checkpoint, in draw order.

    From checkpoint 0 (the first error is in the first step) the continuations are the problem's other trajectories
    that verified correct: the generate stage drew them from that very prompt, so no checkpoint 0 is probed.
    """
    t = search.trajectory
    if good == 0:
        return [
            (s["completion"], s["sample_id"])
            for s in siblings
            if s["status"] == "correct" and s["sample_id"] != t["sample_id"] and s["prompt"] == t["prompt"]
        ]
    probe = search.probes[good]
    return [(r.text, probe.attempt_id(t["sample_id"], r.draw)) for r in probe.rollouts if r.correct]


def build_critical_pairs(
    searches: Sequence[Search],
    trajectories: Sequence[dict[str, Any]],
    count_tokens: Callable[[Sequence[str]], list[int]],
    verify_fn: VerifyFn,
    *,
    max_pair_tokens: int | None = None,
    max_length_ratio: float | None = None,
    model: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """PAIRS rows of type `critical` from finished searches, and drop counts by reason.

    Only trajectories whose verdict is `incorrect` give pairs (one with no answer would teach stopping, as in
    r2w/w2r). prompt = chat prompt + completion up to the last good checkpoint; chosen = the correct rollout from
    there whose token count is closest to the rejected side's (ties: the earliest draw); rejected = the completion
    from there, verified once more on its own (one `verify_fn` call) and kept only when that says `incorrect`.
    `checkpoint_index` is the last good checkpoint (0: the start), `attempt_id` the chosen rollout's id (or the
    sibling trajectory's sample_id from checkpoint 0), `round` null.
    """
    by_problem: dict[str, list[dict[str, Any]]] = {}
    for t in sorted(trajectories, key=lambda t: t["sample_id"]):
        by_problem.setdefault(t["problem_id"], []).append(t)
    dropped: Counter[str] = Counter()
    plans = []
    for s in searches:
        t = s.trajectory
        bad = first_bad_step(s) if s.error is None and t["status"] == "incorrect" else None
        if bad is None:
            continue
        good = last_good_checkpoint(s, bad)
        cands = _candidates(s, good, by_problem.get(t["problem_id"], []))
        if not cands:
            dropped["no_correct_rollout"] += 1
            continue
        cut = 0 if good == 0 else t["checkpoint_chars"][good - 1]
        plans.append((t, good, t["completion"][:cut], t["completion"][cut:], cands))

    items = [(t["gold_answer"], rejected, t.get("finish_reason")) for t, _, _, rejected, _ in plans]
    verdicts = list(verify_fn(items)) if items else []
    if len(verdicts) != len(plans):
        raise RuntimeError(f"verify_fn returned {len(verdicts)} verdicts for {len(plans)} items")
    kept = []
    for plan, v in zip(plans, verdicts, strict=True):
        if v.status == "incorrect":
            kept.append(plan)
        else:
            dropped["rejected_not_incorrect"] += 1  # e.g. its answer sits before the cut: the suffix alone has none

    texts: list[str] = []
    for _, _, prefix, rejected, cands in kept:
        texts += [prefix, rejected, *(text for text, _ in cands)]
    counts = iter(count_tokens(texts) if texts else [])
    pairs: dict[str, dict[str, Any]] = {}
    for t, good, prefix, rejected, cands in kept:
        prefix_tokens, rejected_tokens = next(counts), next(counts)
        cand_tokens = [next(counts) for _ in cands]
        best = min(range(len(cands)), key=lambda j: (abs(cand_tokens[j] - rejected_tokens), j))
        chosen, attempt_id = cands[best]
        tokens = (t["prompt_tokens"] + prefix_tokens, cand_tokens[best], rejected_tokens)
        reason = pair_drop_reason(*tokens, max_pair_tokens, max_length_ratio)
        if reason:
            dropped[reason] += 1
            continue
        row = pair_row(
            PAIR_TYPE,
            t,
            prefix,
            chosen,
            rejected,
            tokens,
            checkpoint_index=good,
            round_index=None,
            attempt_id=attempt_id,
            model=model if model is not None else t.get("model"),
        )
        if row["pair_id"] in pairs:
            dropped["duplicate"] += 1
            continue
        pairs[row["pair_id"]] = row
    return [pairs[k] for k in sorted(pairs)], dict(dropped)

"""`estimate_values`: the values stage's work on one shard of trajectories, from searches to every table it writes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ckptdpo.configs import ValuesConfig
from ckptdpo.values.pairs import build_critical_pairs
from ckptdpo.values.prm import prm_row
from ckptdpo.values.search import VerifyFn, make_searches, run_searches, trajectory_row, value_rows


@dataclass
class ValuesResult:
    """Rows for VALUES, VALUE_TRAJECTORIES, PAIRS (type critical) and PRM_STEPS, failures and counters.

    `failed` / `errors`: sample ids whose probe request failed and the backend's messages, in the same order; those
    trajectories have no rows at all (a failed request is never a wrong rollout), so the caller fails the shard or
    counts them against its failure budget. `stats`: the search's counters (rounds, requests, rollouts,
    generated_tokens, prompt_tokens_requested, prompt_tokens_computed) plus `pairs_dropped` by reason.
    """

    values: list[dict[str, Any]] = field(default_factory=list)
    trajectories: list[dict[str, Any]] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    prm: list[dict[str, Any]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


def estimate_values(
    trajectories: Iterable[dict[str, Any]],
    cfg: ValuesConfig,
    backend: Any,
    verify_fn: VerifyFn,
    *,
    model: str | None = None,
) -> ValuesResult:
    """Estimate checkpoint values for a shard's trajectories and derive critical pairs and step labels.

    Args:
        trajectories: every trajectory of the shard (`tasks.resample.load_trajectories` rows: sample_id, problem_id,
            prompt, completion, prompt_tokens, finish_reason, status, checkpoint_chars, gold_answer, model). Pass all
            of them, whatever `cfg.trajectories` says: the ones it selects (with a checkpoint) are probed, and the
            problem's correct ones serve as continuations from the start when the first error is in the first step.
        backend: the policy backend (`generate`, `count_tokens`; `model_id` when `model` is not given).
        verify_fn: verdicts for `(gold_answer, continuation, finish_reason)` items, one per item, with `status` and
            `is_correct`: for math `functools.partial(verify_batch, **verify_kwargs(recipe.verify))`; for choice or
            code, a callable that checks the text against whatever the run stores as `gold_answer` with that kind's
            verifier (`ckptdpo.verify.choice`, `ckptdpo.verify.code`). A continuation is judged on its own text,
            never with the prefix, so a chosen side verifies as it stands in its pair; one cut at `length` never
            counts as correct, whatever the verifier says.

    Backend calls: one `generate` and one `verify_fn` call per search round (binary: about log2(n) + 1 rounds for
    the longest trajectory; exhaustive: one), one `verify_fn` call re-checking the rejected sides of the pairs and
    one `count_tokens` call. Every seed derives from (sample_id, checkpoint index, cfg.seed), so a rerun, a resume
    or another shard composition gives the same rows.
    """
    trajectories = list(trajectories)
    searches = make_searches(trajectories, cfg)
    counters, failed = run_searches(searches, cfg, backend, verify_fn)
    done = [s for s in searches if s.error is None]
    result = ValuesResult(failed=[sid for sid, _ in failed], errors=[e for _, e in failed])
    for s in done:
        result.values.extend(value_rows(s))
        result.trajectories.append(trajectory_row(s))
        row = prm_row(s)
        if row is not None:
            result.prm.append(row)
    dropped: dict[str, int] = {}
    if cfg.critical_pairs:
        result.pairs, dropped = build_critical_pairs(
            done,
            trajectories,
            backend.count_tokens,
            verify_fn,
            max_pair_tokens=cfg.max_pair_tokens,
            max_length_ratio=cfg.max_length_ratio,
            model=model if model is not None else getattr(backend, "model_id", None),
        )
    result.stats = {**counters, "pairs_dropped": dropped}
    return result

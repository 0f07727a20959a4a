"""DTO optimization of a shard: probe, truncate at the exit, judge-prune, re-verify; the stats, one definition."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckptdpo.checkpoints import DEFAULT_MARKERS
from ckptdpo.configs import DTOConfig
from ckptdpo.dto.probe import (
    DTOItem,
    VerifyFn,
    close_trajectory,
    probe_estimates,
    probe_exit_points,
    probe_prompt,
    split_segments,
    thinking_end,
    truncate_at_exit,
)
from ckptdpo.judge import judge_trajectories
from ckptdpo.shards import content_id

# The statuses of a trajectory DTO optimized (it has a shorter text); every token total covers only these.
OPTIMIZED = ("pruned", "truncated")
DERIVED = ("token_reduction", "truncation_token_reduction")
STAT_KEYS = (
    "num_trajectories",
    "num_exit_found",
    "no_exit_found",
    "num_optimized",
    "num_pruned",
    "num_dropped",
    "num_probes",
    "probe_errors",
    "tokens_all_trajectories",
    "tokens_before",
    "tokens_after_truncation",
    "tokens_after_pruning",
    "segments_judged",
    "segments_removed",
    "segments_unjudged",
    "judge_parse_failures",
    "reverify_probes",
    "reverify_failures",
    "num_pruned_without_exit",
    "probe_generated_tokens",
)


@dataclass
class DTOResult:
    """What DTO made of one trajectory. `text` is the optimized completion, None when `status` is no_exit/dropped.

    status: `pruned` (judge pruning removed segments and the pruned text re-verified), `truncated` (cut at the exit;
    nothing pruned, or the pruned text failed re-verification and `on_reverify_fail` is "truncated"), `dropped`
    (failed re-verification with `on_reverify_fail: drop`), `no_exit` (no position reached the threshold).
    """

    problem_id: str
    sample_id: str
    status: str
    exit_index: int | None
    exit_char: int | None
    exit_probability: float | None
    truncated_text: str | None
    text: str | None
    num_segments: int = 0
    removed_segments: list[int] = field(default_factory=list)  # 0-based segment indices
    reverify_probability: float | None = None
    tokens_before: int = 0
    tokens_after_truncation: int = 0
    tokens_after_pruning: int = 0


def optimize_trajectories(
    backend: Any,
    judge_backend: Any,
    items: Sequence[DTOItem],
    cfg: DTOConfig,
    verify_fn: VerifyFn,
    markers: Sequence[str] = DEFAULT_MARKERS,
) -> tuple[list[DTOResult], dict[str, int]]:
    """Probe, truncate, prune and re-verify a shard of correct trajectories; returns one result per item and stats.

    Backend calls for the whole shard: one probe call, one judge `chat` call, one re-verification probe call (only
    for trajectories that pruning changed) and one `count_tokens` call. Segments are the truncated thinking split at
    its candidate positions (checkpoints, or paragraph starts), so they join back to it exactly. A pruned thinking
    re-verifies when a probe at its end (same estimator, same threshold) still gives the gold answer.

    Token totals in the stats (`tokens_before`, `tokens_after_truncation`, `tokens_after_pruning`) cover only the
    trajectories DTO optimized (final status pruned or truncated): a trajectory with no exit, or one dropped after a
    failed re-verification, is in none of them, so `merge_dto_stats`' `token_reduction` is what DTO did to the texts
    it changed. `tokens_all_trajectories` is the original length of every item, for scale.
    """
    if cfg.prune and judge_backend is None:
        raise ValueError("cfg.prune is on but no judge backend was given; pass one or set dto.prune: false")
    exits = probe_exit_points(backend, items, cfg, verify_fn, markers)
    results, plans = _truncate(items, exits)
    judge_stats = {"segments_judged": 0, "segments_removed": 0, "judge_parse_failures": 0, "segments_unjudged": 0}
    pending: list[tuple[int, DTOItem, Any, str]] = []
    whole = _whole_plans(items, exits, results) if cfg.prune and cfg.prune_without_exit else []
    if cfg.prune and (plans or whole):
        judged = plans + whole  # one judge call for the shard
        keeps, judge_stats = judge_trajectories(
            judge_backend, [p[1].problem for p in judged], [p[3] for p in judged], cfg.judge
        )
        for (r, item, ex, segments), keep in zip(judged, keeps, strict=True):
            removed = [i for i, k in enumerate(keep) if not k]
            if removed:
                results[r].removed_segments = removed
                pending.append((r, item, ex, "".join(s for s, k in zip(segments, keep, strict=True) if k)))
    cut = [x for x in pending if results[x[0]].status == "truncated"]
    reverify_failures, failed, reverify_tokens = _reverify(backend, results, cut, cfg, verify_fn)
    reverify_failures += _verify_whole(results, [x for x in pending if results[x[0]].status == "no_exit"], verify_fn)
    _count_tokens(backend, items, results)
    optimized = [r for r in results if r.status in OPTIMIZED]
    stats = {
        "num_trajectories": len(items),
        "num_exit_found": len(plans),
        "no_exit_found": len(items) - len(plans),
        "num_optimized": len(optimized),
        "num_pruned": sum(r.status == "pruned" for r in results),
        "num_dropped": sum(r.status == "dropped" for r in results),
        "num_probes": sum(len(ex.probed) for ex in exits) + len(pending),
        "probe_errors": sum(ex.probe_errors for ex in exits) + sum(failed),
        "tokens_all_trajectories": sum(r.tokens_before for r in results),
        "tokens_before": sum(r.tokens_before for r in optimized),
        "tokens_after_truncation": sum(r.tokens_after_truncation for r in optimized),
        "tokens_after_pruning": sum(r.tokens_after_pruning for r in optimized),
        **judge_stats,
        "reverify_probes": len(cut),
        "num_pruned_without_exit": sum(r.status == "pruned" and r.truncated_text is None for r in results),
        "reverify_failures": reverify_failures,
        # What the sampled probes generated (exit probes and re-verification): part of the factory's generation cost.
        "probe_generated_tokens": sum(ex.probe_tokens for ex in exits) + reverify_tokens,
    }
    return results, stats


def _whole_plans(items: Sequence[DTOItem], exits: Sequence[Any], results: list[DTOResult]) -> list[tuple]:
    """(result index, item, exit, segments of the whole thinking) of every trajectory without an exit."""
    plans = []
    for r, (item, ex) in enumerate(zip(items, exits, strict=True)):
        if results[r].status == "no_exit":
            segments = split_segments(item.completion[: thinking_end(item.completion)], ex.positions)
            results[r].num_segments = len(segments)
            plans.append((r, item, ex, segments))
    return plans


def _verify_whole(results: list[DTOResult], pending: list[tuple], verify_fn: VerifyFn) -> int:
    """A pruned trajectory without an exit keeps its own ending, so its text is verified as it stands (one batch);
    one that no longer verifies stays as it was. Returns the number of failures."""
    texts = [thinking + item.completion[thinking_end(item.completion) :] for _, item, _, thinking in pending]
    items = [(item.gold, text) for (_, item, _, _), text in zip(pending, texts, strict=True)]
    verdicts = verify_fn(items) if items else []
    failures = 0
    for (r, _, _, _), text, v in zip(pending, texts, verdicts, strict=True):
        if v.is_correct is True:
            results[r].status, results[r].text = "pruned", text
        else:
            failures += 1
    return failures


def _truncate(items: Sequence[DTOItem], exits: Sequence[Any]) -> tuple[list[DTOResult], list[tuple]]:
    """A result per item (cut at its exit, or no_exit) and (result index, item, exit, segments) of those cut."""
    results: list[DTOResult] = []
    plans = []
    for item, ex in zip(items, exits, strict=True):
        truncated = truncate_at_exit(item, ex)
        segments = [] if ex.exit_char is None else split_segments(item.completion[: ex.exit_char], ex.positions)
        results.append(
            DTOResult(
                problem_id=item.problem_id,
                sample_id=item.sample_id,
                status="no_exit" if truncated is None else "truncated",
                exit_index=ex.exit_index,
                exit_char=ex.exit_char,
                exit_probability=ex.exit_probability,
                truncated_text=truncated,
                text=truncated,
                num_segments=len(segments),
            )
        )
        if truncated is not None:
            plans.append((len(results) - 1, item, ex, segments))
    return results, plans


def _reverify(
    backend: Any, results: list[DTOResult], pending: list[tuple], cfg: DTOConfig, verify_fn: VerifyFn
) -> tuple[int, list[bool], int]:
    """Probe every pruned thinking at its end (one call); keep it when the probe still reaches the threshold.
    Returns the failures, which probes failed, and the tokens the probes generated."""
    probs, failed, tokens = probe_estimates(
        backend,
        [probe_prompt(item.prompt, thinking) for _, item, _, thinking in pending],
        [item.gold for _, item, _, _ in pending],
        [(item.sample_id, f"reverify-{content_id(thinking)}") for _, item, _, thinking in pending],
        cfg,
        verify_fn,
    )
    failures = 0
    for (r, item, ex, thinking), p in zip(pending, probs, strict=True):
        results[r].reverify_probability = p
        if p >= cfg.threshold:
            results[r].status = "pruned"
            results[r].text = close_trajectory(thinking, item.gold, ex.r1)
        else:
            failures += 1
            if cfg.on_reverify_fail == "drop":
                results[r].status = "dropped"
                results[r].text = None
    return failures, failed, sum(tokens)


def _count_tokens(backend: Any, items: Sequence[DTOItem], results: list[DTOResult]) -> None:
    """Each result's length before, after truncation and after pruning, with one `count_tokens` call; a step that
    did not happen keeps the length of the step before it."""
    originals = [item.completion for item in items]
    truncated_texts = [r.truncated_text for r in results if r.truncated_text is not None]
    pruned_texts = [r.text for r in results if r.status == "pruned"]
    texts = originals + truncated_texts + pruned_texts
    counts = iter(backend.count_tokens(texts) if texts else [])
    for r in results:
        r.tokens_before = next(counts)
    for r in results:
        r.tokens_after_truncation = next(counts) if r.truncated_text is not None else r.tokens_before
    for r in results:
        r.tokens_after_pruning = next(counts) if r.status == "pruned" else r.tokens_after_truncation


def merge_dto_stats(parts: Iterable[dict[str, int]], num_pairs: int | None = None) -> dict[str, Any]:
    """Sum the per-shard stats of `optimize_trajectories` and derive the reductions, over the optimized trajectories:
    `token_reduction` = 1 - tokens_after_pruning / tokens_before, `truncation_token_reduction` = 1 -
    tokens_after_truncation / tokens_before (positive shares; None when nothing was optimized). `num_pairs` (from
    `build_dto_pairs`) is set when given."""
    total: dict[str, Any] = dict.fromkeys(STAT_KEYS, 0)
    for part in parts:
        for key, value in part.items():
            if key in DERIVED:
                continue  # ratios of a shard do not add up; they are derived from the sums below
            total[key] = total.get(key, 0) + value
    before = total["tokens_before"]
    total["token_reduction"] = round(1 - total["tokens_after_pruning"] / before, 6) if before else None
    total["truncation_token_reduction"] = round(1 - total["tokens_after_truncation"] / before, 6) if before else None
    if num_pairs is not None:
        total["num_pairs"] = num_pairs
    return total

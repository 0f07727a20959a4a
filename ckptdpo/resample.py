"""Right-to-Wrong and Wrong-to-Right: resampling from checkpoints and building preference pairs.

r2w: from a correct trajectory, continue from a checkpoint; a continuation ending in a wrong final answer gives
`prompt = chat(problem) + prefix, chosen = original suffix, rejected = continuation`.
w2r: from a wrong trajectory, continue from a checkpoint until a continuation is correct;
`chosen = continuation, rejected = original suffix`.

"Wrong" means status `incorrect`: a final answer that does not verify. A continuation or trajectory with no
answer (cut by `length`, a `loop`, no box) is neither chosen nor rejected: such a pair would teach the model to
prefer text that merely stops, not text that reasons correctly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ckptdpo.backends.base import GenerationRequest
from ckptdpo.checkpoints import schedule_resample_points, schedule_value_points
from ckptdpo.configs import ResampleConfig
from ckptdpo.shards import content_id


@dataclass(frozen=True)
class Slot:
    """One (trajectory, checkpoint) where continuations are drawn; `draws` per round come from the schedule."""

    direction: str  # r2w | w2r
    problem_id: str
    source_sample_id: str
    checkpoint_index: int
    checkpoint_char: int
    draws: int


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed derived from content, so reruns and resumes draw the same continuations."""
    return int(content_id(*parts)[:8], 16) & 0x7FFFFFFF


def direction_of(status: str, cfg: ResampleConfig) -> str | None:
    if status == "correct" and cfg.r2w:
        return "r2w"
    if status == "incorrect" and cfg.w2r:
        return "w2r"
    return None


def plan_slots(
    trajectory: dict[str, Any],
    cfg: ResampleConfig,
    values: Sequence[Mapping[str, Any]] | None = None,
    threshold: float = 0.5,
) -> list[Slot]:
    """Slots of one trajectory per the checkpoint schedule; empty when it is not resampled.

    With `max_pair_tokens` and `prefer_fitting_prefixes`, checkpoints whose prefix cannot fit a pair are skipped
    before the schedule is applied. The prefix's token count is estimated from its share of the completion's
    characters (exact counts come later, when pairs are built and filtered).

    `policy: value` places the draws with `schedule_value_points` from `values`, the trajectory's VALUES rows (the
    values stage's `threshold` decides its critical checkpoint), spending what the seed schedule would; a trajectory
    with no probed checkpoint left gets the seed schedule.
    """
    direction = direction_of(trajectory["status"], cfg)
    chars = list(trajectory["checkpoint_chars"] or [])
    if direction is None or not chars:
        return []
    indices = list(range(1, len(chars) + 1))
    if cfg.max_pair_tokens and cfg.prefer_fitting_prefixes:
        text_len = max(len(trajectory["completion"]), 1)
        total = trajectory["prompt_tokens"] + trajectory["completion_tokens"]
        # The original suffix is one side of every pair, so prompt + whole completion bounds the pair from below.
        if total > cfg.max_pair_tokens:
            budget = cfg.max_pair_tokens - trajectory["prompt_tokens"]
            indices = [i for i in indices if trajectory["completion_tokens"] * chars[i - 1] / text_len <= budget]
    if not indices:
        return []
    counts: Counter[int] = Counter()
    if cfg.policy == "value":
        eligible = set(indices)
        usable = [r for r in values or [] if r["checkpoint_index"] in eligible]
        seed_draws = len(schedule_resample_points(len(indices), "seed"))
        counts = Counter(schedule_value_points(len(chars), usable, draws=seed_draws, threshold=threshold))
    if not counts:
        policy = "seed" if cfg.policy == "value" else cfg.policy
        counts = Counter(indices[pos - 1] for pos in schedule_resample_points(len(indices), policy))
    return [
        Slot(
            direction=direction,
            problem_id=trajectory["problem_id"],
            source_sample_id=trajectory["sample_id"],
            checkpoint_index=index,
            checkpoint_char=chars[index - 1],
            draws=n,
        )
        for index, n in sorted(counts.items())
    ]


def slot_key(slot: Slot) -> tuple[str, int]:
    return (slot.source_sample_id, slot.checkpoint_index)


def draws_this_round(slot: Slot, history: Sequence[dict[str, Any]], cfg: ResampleConfig) -> int:
    """Round 1 draws the schedule; later rounds redraw slots that have not yet yielded a pair, up to max_attempts."""
    wanted = "incorrect" if slot.direction == "r2w" else "correct"
    if any(a["status"] == wanted for a in history):
        return 0
    return max(0, min(slot.draws, cfg.max_attempts - len(history)))


def build_requests(
    slots_with_draws: Iterable[tuple[Slot, int]],
    trajectories: dict[str, dict[str, Any]],
    cfg: ResampleConfig,
    round_index: int,
) -> list[GenerationRequest]:
    """One request per slot: the trajectory's prompt plus its prefix, `n` draws, a content-derived seed."""
    requests = []
    for slot, n in slots_with_draws:
        t = trajectories[slot.source_sample_id]
        requests.append(
            GenerationRequest(
                prompt=t["prompt"] + t["completion"][: slot.checkpoint_char],
                n=n,
                seed=stable_seed(slot.source_sample_id, slot.checkpoint_index, round_index, cfg.seed),
                max_tokens=cfg.max_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                route_key=slot.source_sample_id,
            )
        )
    return requests


def attempt_rows(
    slot: Slot, request: GenerationRequest, result_samples: Sequence[Any], verdicts: Sequence[Any], round_index: int
) -> list[dict[str, Any]]:
    """ATTEMPTS rows for one slot's continuations (samples and verdicts in the same order)."""
    rows = []
    for draw, (s, v) in enumerate(zip(result_samples, verdicts, strict=True)):
        rows.append(
            {
                "attempt_id": content_id(
                    slot.source_sample_id, slot.checkpoint_index, round_index, draw, request.seed
                ),
                "round": round_index,
                "direction": slot.direction,
                "problem_id": slot.problem_id,
                "source_sample_id": slot.source_sample_id,
                "checkpoint_index": slot.checkpoint_index,
                "checkpoint_char": slot.checkpoint_char,
                "draw": draw,
                "seed": request.seed,
                "continuation": s.text,
                "completion_tokens": s.num_tokens,
                "finish_reason": s.finish_reason,
                "status": v.status,
                "is_correct": v.is_correct,
                "extracted": v.extracted,
                "extracted_from": v.extracted_from,
            }
        )
    return rows


def build_pairs(
    trajectories: dict[str, dict[str, Any]],
    attempts: Iterable[dict[str, Any]],
    cfg: ResampleConfig,
    count_tokens: Callable[[Sequence[str]], list[int]],
    model: str,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """PAIRS rows from resampling attempts, filtered and deduplicated; returns (pairs, drop counts).

    A trajectory's prefix and suffix at a checkpoint are cut and counted once, however many draws continue from
    there (at the real shape that is most of the text), and pair strings are built only for the pairs kept.
    """
    texts: list[str] = []
    cut: dict[tuple[str, int], tuple[int, int]] = {}
    candidates = []
    for a in attempts:
        if not (
            (a["direction"] == "r2w" and a["status"] == "incorrect")
            or (a["direction"] == "w2r" and a["status"] == "correct")
        ):
            continue
        t = trajectories[a["source_sample_id"]]
        key = (a["source_sample_id"], a["checkpoint_char"])
        if key not in cut:
            cut[key] = (len(texts), len(texts) + 1)
            texts += [t["completion"][: a["checkpoint_char"]], t["completion"][a["checkpoint_char"] :]]
        texts.append(a["continuation"])
        prefix_i, suffix_i = cut[key]
        chosen_i, rejected_i = (suffix_i, len(texts) - 1) if a["direction"] == "r2w" else (len(texts) - 1, suffix_i)
        candidates.append((a, t, prefix_i, chosen_i, rejected_i))

    counts = count_tokens(texts) if texts else []
    pairs: dict[str, dict[str, Any]] = {}
    dropped = Counter()
    for a, t, prefix_i, chosen_i, rejected_i in candidates:
        prefix_tokens, chosen_tokens, rejected_tokens = counts[prefix_i], counts[chosen_i], counts[rejected_i]
        prompt_tokens = t["prompt_tokens"] + prefix_tokens
        reason = pair_drop_reason(
            prompt_tokens, chosen_tokens, rejected_tokens, cfg.max_pair_tokens, cfg.max_length_ratio
        )
        if reason:
            dropped[reason] += 1
            continue
        row = pair_row(
            a["direction"],
            t,
            texts[prefix_i],
            texts[chosen_i],
            texts[rejected_i],
            (prompt_tokens, chosen_tokens, rejected_tokens),
            checkpoint_index=a["checkpoint_index"],
            round_index=a["round"],
            attempt_id=a["attempt_id"],
            model=model,
        )
        if row["pair_id"] in pairs:
            dropped["duplicate"] += 1
            continue
        pairs[row["pair_id"]] = row
    return [pairs[k] for k in sorted(pairs)], dict(dropped)


def pair_drop_reason(
    prompt_tokens: int,
    chosen_tokens: int,
    rejected_tokens: int,
    max_pair_tokens: int | None,
    max_length_ratio: float | None,
) -> str | None:
    """Why a pair is dropped (`over_max_pair_tokens`, `over_max_length_ratio`), or None when it is kept."""
    longer, shorter = max(chosen_tokens, rejected_tokens), min(chosen_tokens, rejected_tokens)
    if max_pair_tokens and prompt_tokens + longer > max_pair_tokens:
        return "over_max_pair_tokens"
    if max_length_ratio and longer > max_length_ratio * max(1, shorter):
        return "over_max_length_ratio"
    return None


def pair_row(
    pair_type: str,
    trajectory: dict[str, Any],
    prefix: str,
    chosen: str,
    rejected: str,
    tokens: tuple[int, int, int],
    *,
    checkpoint_index: int | None,
    round_index: int | None,
    attempt_id: str | None,
    model: str | None,
) -> dict[str, Any]:
    """One PAIRS row: prompt = the trajectory's chat prompt + `prefix`; `tokens` = (prompt, chosen, rejected) counts.

    `pair_id` is the content id of (prompt, chosen, rejected), so the same pair made twice has one id.
    """
    prompt = trajectory["prompt"] + prefix
    prompt_tokens, chosen_tokens, rejected_tokens = tokens
    return {
        "pair_id": content_id(prompt, chosen, rejected),
        "pair_type": pair_type,
        "problem_id": trajectory["problem_id"],
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "gold_answer": trajectory["gold_answer"],
        "source_sample_id": trajectory["sample_id"],
        "checkpoint_index": checkpoint_index,
        "prompt_tokens": prompt_tokens,
        "chosen_tokens": chosen_tokens,
        "rejected_tokens": rejected_tokens,
        "round": round_index,
        "attempt_id": attempt_id,
        "model": model,
    }

"""DTO (Dynamic Thinking pattern Optimization): exit probing, truncation, judge pruning, re-verification, SimPO pairs.

For a correct trajectory, every candidate position (its checkpoints; its paragraph starts when it has fewer than
`min_checkpoints` checkpoints) inside the thinking is probed: the text up to the position, then `PROBE`, and an
estimate of the probability that the model goes on with the gold answer. The first position at or above the
threshold is the exit point; the thinking is cut there and closed with `EXIT_SENTENCE` and the boxed gold answer.
The truncated thinking is split into segments at the candidate positions; a judge LLM flags segments to drop (see
`ckptdpo.judge`). A pruned text must still lead to the gold answer: it is probed once more at its end, with the same
estimator and threshold; when that fails the trajectory falls back to its truncated form or is dropped.

A trajectory with no exit point is left alone (status `no_exit`): without a probe saying a shorter thinking already
holds the answer there is nothing to cut at, and it is not pruned either.

Probe estimators (`cfg.probe`):
- `likelihood`: exp(backend.score(prompt + prefix + PROBE, gold + "}")), the probability of the gold answer's exact
  token string followed by the closing brace (so "12" does not count as the start of "123"). Other spellings of the
  same answer ("0.5" for "\\frac{1}{2}") get no credit, so this is a lower bound on the chance of a right answer.
- `sample`: `probe_samples` continuations of at most `probe_max_tokens` tokens; a continuation's answer is its text
  up to the `}` that closes the probe's `\\boxed{` (brace depth counted), checked with `verify_fn` as
  `\\boxed{answer}`; the estimate is the share of continuations that verify (one with no closing brace counts as a
  miss, so answers longer than `probe_max_tokens` can never verify).
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckptdpo.backends.base import GenerationRequest
from ckptdpo.checkpoints import DEFAULT_MARKERS, locate_checkpoints
from ckptdpo.configs import DTOConfig
from ckptdpo.judge import judge_trajectories
from ckptdpo.shards import content_id

PROBE = "... Wait, I suddenly got the final answer to the whole problem. Final Answer: \\boxed{"
EXIT_SENTENCE = "Hmm, I think this is enough to derive the final answer."
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# verify_fn(items) -> verdicts: items are (gold, completion) pairs, each verdict has `is_correct` (bool | None).
VerifyFn = Callable[[Sequence[tuple[str, str]]], Sequence[Any]]

STAT_KEYS = (
    "num_trajectories",
    "num_exit_found",
    "no_exit_found",
    "num_pruned",
    "num_dropped",
    "num_probes",
    "probe_errors",
    "tokens_before",
    "tokens_after_truncation",
    "tokens_after_pruning",
    "segments_judged",
    "segments_removed",
    "segments_unjudged",
    "judge_parse_failures",
    "reverify_probes",
    "reverify_failures",
)


@dataclass(frozen=True)
class DTOItem:
    """One correct trajectory to optimize: `prompt` is the chat prompt it was generated from, `gold` the answer."""

    problem_id: str
    sample_id: str
    problem: str
    prompt: str
    completion: str
    gold: str


@dataclass
class ExitResult:
    """Probing of one trajectory: candidate offsets, the probed ones and their estimates, and the exit (if any).

    `exit_index` is the 1-based index of the exit in `positions` (the checkpoint index when `kind` is
    "checkpoint", the paragraph index when "paragraph"); `exit_char` its offset in the completion.
    """

    problem_id: str
    sample_id: str
    kind: str  # checkpoint | paragraph
    positions: list[int]
    probed: list[int]  # 1-based indices into positions
    probabilities: list[float]  # one per probed index
    exit_index: int | None
    exit_char: int | None
    r1: bool
    probe_errors: int = 0

    @property
    def exit_probability(self) -> float | None:
        if self.exit_index is None:
            return None
        return self.probabilities[self.probed.index(self.exit_index)]


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


def is_r1_style(prompt: str, completion: str) -> bool:
    """R1-style: the thinking is wrapped in <think> ... </think> (opened in the completion or by the chat prompt)."""
    return THINK_CLOSE in completion or THINK_OPEN in completion or prompt.rstrip().endswith(THINK_OPEN)


def thinking_end(completion: str) -> int:
    """Offset where the thinking ends: the first </think>, else the end of the text."""
    i = completion.find(THINK_CLOSE)
    return len(completion) if i < 0 else i


def paragraph_starts(text: str) -> list[int]:
    """Offsets of the first character after each paragraph break "\\n\\n" that starts a non-blank paragraph."""
    out = []
    i = text.find("\n\n")
    while i >= 0:
        j = i + 2
        while j < len(text) and text[j] == "\n":
            j += 1  # "\n\n\nText": the paragraph starts at "T", as a checkpoint would
        if j < len(text) and not text[j].isspace():
            out.append(j)
        i = text.find("\n\n", j)
    return out


def candidate_positions(
    completion: str, markers: Sequence[str] = DEFAULT_MARKERS, min_checkpoints: int = 2
) -> tuple[str, list[int]]:
    """(kind, offsets) of the exit candidates inside the thinking: checkpoints, or paragraph starts if too few."""
    end = thinking_end(completion)
    thinking = completion[:end]
    checkpoints = [cp.char for cp in locate_checkpoints(thinking, markers)]
    if len(checkpoints) >= min_checkpoints:
        return "checkpoint", checkpoints
    return "paragraph", paragraph_starts(thinking)


def spread_indices(n: int, k: int) -> list[int]:
    """k of the 1-based indices 1..n evenly spaced from the first to the last (all of them when k >= n)."""
    if k >= n:
        return list(range(1, n + 1))
    if k == 1:
        return [1]
    return sorted({1 + (2 * (n - 1) * j + (k - 1)) // (2 * (k - 1)) for j in range(k)})


def probe_prompt(prompt: str, thinking_prefix: str) -> str:
    """Prompt + thinking prefix + PROBE, with a paragraph break before the probe when the prefix lacks one."""
    if thinking_prefix.endswith("\n\n") or not thinking_prefix:
        sep = ""
    elif thinking_prefix.endswith("\n"):
        sep = "\n"
    else:
        sep = "\n\n"
    return prompt + thinking_prefix + sep + PROBE


def close_box(text: str) -> str | None:
    """The text up to the `}` that closes an already open `\\boxed{` (depth counted), or None if it never closes.

    An escaped brace (`\\{`, `\\}`, as in a set `\\{1, 2\\}`) neither opens nor closes a group, as in LaTeX.
    """
    depth, i = 1, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[:i]
        i += 1
    return None


def close_trajectory(thinking: str, gold: str, r1: bool) -> str:
    """Cut thinking + EXIT_SENTENCE + the boxed gold answer; R1-style texts close </think> and get an answer part."""
    answer = f"Final Answer: \\boxed{{{gold}}}"
    if r1:
        return f"{thinking}{EXIT_SENTENCE}\n{THINK_CLOSE}\n\n{answer}"
    return f"{thinking}{EXIT_SENTENCE}\n\n{answer}"


def truncate_at_exit(item: DTOItem, exit_result: ExitResult) -> str | None:
    """The completion cut at its exit point and closed (see `close_trajectory`); None when there is no exit."""
    if exit_result.exit_char is None:
        return None
    return close_trajectory(item.completion[: exit_result.exit_char], item.gold, exit_result.r1)


def split_segments(thinking: str, positions: Sequence[int]) -> list[str]:
    """The thinking cut at the given offsets (those strictly inside it); the pieces join back to `thinking`."""
    cuts = [0] + sorted({p for p in positions if 0 < p < len(thinking)}) + [len(thinking)]
    return [thinking[a:b] for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def _seed(*parts: Any) -> int:
    return zlib.crc32(content_id(*parts).encode()) & 0x7FFFFFFF


def estimate_probabilities(
    backend: Any,
    prompts: Sequence[str],
    golds: Sequence[str],
    keys: Sequence[tuple[str, Any]],
    cfg: DTOConfig,
    verify_fn: VerifyFn,
) -> tuple[list[float], list[bool]]:
    """P(gold) after each probe prompt, with ONE backend call (score or generate) for all; returns (p, failed).

    A probe whose request failed (an error result, a NaN score) gets probability 0 and `failed` True.

    `keys` are (sample_id, position) per probe: they seed the sampled probes (reruns draw the same samples) and
    route them by sample_id (a multi-endpoint backend sends a trajectory's probes where its prefix is cached).
    """
    if not prompts:
        return [], []
    if cfg.probe == "likelihood":
        logprobs = backend.score(list(prompts), [g + "}" for g in golds])
        if len(logprobs) != len(prompts):
            raise RuntimeError(f"backend.score returned {len(logprobs)} values for {len(prompts)} probes")
        failed = [lp is None or math.isnan(lp) for lp in logprobs]
        # exp() of a very negative log-probability underflows to 0.0 by itself; only NaN needs catching.
        return [0.0 if bad else min(1.0, math.exp(lp)) for lp, bad in zip(logprobs, failed, strict=True)], failed

    requests = [
        GenerationRequest(
            prompt=p,
            n=cfg.probe_samples,
            seed=_seed("dto-probe", *key, cfg.seed),
            max_tokens=cfg.probe_max_tokens,
            temperature=cfg.probe_temperature,
            top_p=cfg.probe_top_p,
            route_key=key[0],
        )
        for p, key in zip(prompts, keys, strict=True)
    ]
    results = backend.generate(requests)
    if len(results) != len(requests):
        raise RuntimeError(f"backend.generate returned {len(results)} results for {len(requests)} probes")
    to_verify, owner = [], []
    failed = [res.error is not None for res in results]
    for i, (res, gold) in enumerate(zip(results, golds, strict=True)):
        if res.error is not None:
            continue
        for s in res.samples[: cfg.probe_samples]:
            answer = close_box(s.text)
            if answer is not None and answer.strip():
                to_verify.append((gold, f"\\boxed{{{answer}}}"))
                owner.append(i)
    hits = Counter()
    if to_verify:
        verdicts = verify_fn(to_verify)
        for i, v in zip(owner, verdicts, strict=True):
            hits[i] += v.is_correct is True
    return [hits[i] / cfg.probe_samples for i in range(len(prompts))], failed


def probe_exit_points(
    backend: Any,
    items: Sequence[DTOItem],
    cfg: DTOConfig,
    verify_fn: VerifyFn,
    markers: Sequence[str] = DEFAULT_MARKERS,
) -> list[ExitResult]:
    """Exit point of every item: all probes of all items in ONE backend call; first position >= threshold wins.

    At most `cfg.max_probes` positions per trajectory are probed, spread evenly from the first to the last.
    """
    plans, prompts, golds, keys, owners = [], [], [], [], []
    for t, item in enumerate(items):
        kind, positions = candidate_positions(item.completion, markers, cfg.min_checkpoints)
        probed = spread_indices(len(positions), cfg.max_probes)
        plans.append((kind, positions, probed))
        for idx in probed:
            char = positions[idx - 1]
            prompts.append(probe_prompt(item.prompt, item.completion[:char]))
            golds.append(item.gold)
            keys.append((item.sample_id, char))
            owners.append(t)
    probs, failed = estimate_probabilities(backend, prompts, golds, keys, cfg, verify_fn)
    per_item: list[list[float]] = [[] for _ in items]
    errors = Counter()
    for t, p, bad in zip(owners, probs, failed, strict=True):
        per_item[t].append(p)
        errors[t] += bad
    out = []
    for t, (item, (kind, positions, probed), ps) in enumerate(zip(items, plans, per_item, strict=True)):
        exit_index = next((idx for idx, p in zip(probed, ps, strict=True) if p >= cfg.threshold), None)
        out.append(
            ExitResult(
                problem_id=item.problem_id,
                sample_id=item.sample_id,
                kind=kind,
                positions=positions,
                probed=probed,
                probabilities=ps,
                exit_index=exit_index,
                exit_char=None if exit_index is None else positions[exit_index - 1],
                r1=is_r1_style(item.prompt, item.completion),
                probe_errors=errors[t],
            )
        )
    return out


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

    Token totals in the stats cover every item: a trajectory counts with its length after each step, so one with
    no exit counts its original length throughout, and one whose pruned text failed re-verification counts its
    truncated length after pruning (whether it fell back or was dropped; drops are in `num_dropped`).
    """
    if cfg.prune and judge_backend is None:
        raise ValueError("cfg.prune is on but no judge backend was given; pass one or set dto.prune: false")
    exits = probe_exit_points(backend, items, cfg, verify_fn, markers)
    results: list[DTOResult] = []
    plans = []  # (result index, item, exit, segments) of trajectories with an exit
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

    judge_stats = {"segments_judged": 0, "segments_removed": 0, "judge_parse_failures": 0, "segments_unjudged": 0}
    pending = []  # (result index, item, exit, pruned thinking)
    if cfg.prune and plans:
        keeps, judge_stats = judge_trajectories(
            judge_backend, [p[1].problem for p in plans], [p[3] for p in plans], cfg.judge
        )
        for (r, item, ex, segments), keep in zip(plans, keeps, strict=True):
            removed = [i for i, k in enumerate(keep) if not k]
            if removed:
                results[r].removed_segments = removed
                pending.append((r, item, ex, "".join(s for s, k in zip(segments, keep, strict=True) if k)))

    probs, failed = estimate_probabilities(
        backend,
        [probe_prompt(item.prompt, thinking) for _, item, _, thinking in pending],
        [item.gold for _, item, _, _ in pending],
        [(item.sample_id, f"reverify-{content_id(thinking)}") for _, item, _, thinking in pending],
        cfg,
        verify_fn,
    )
    reverify_failures = 0
    for (r, item, ex, thinking), p in zip(pending, probs, strict=True):
        results[r].reverify_probability = p
        if p >= cfg.threshold:
            results[r].status = "pruned"
            results[r].text = close_trajectory(thinking, item.gold, ex.r1)
        else:
            reverify_failures += 1
            if cfg.on_reverify_fail == "drop":
                results[r].status = "dropped"
                results[r].text = None

    originals = [item.completion for item in items]
    truncated_texts = [r.truncated_text for r in results if r.truncated_text is not None]
    pruned_texts = [r.text for r in results if r.status == "pruned"]
    texts = originals + truncated_texts + pruned_texts
    counts = iter(backend.count_tokens(texts) if texts else [])
    for r in results:
        r.tokens_before = next(counts)
    for r in results:
        if r.truncated_text is not None:
            r.tokens_after_truncation = next(counts)
        else:
            r.tokens_after_truncation = r.tokens_before
    for r in results:
        r.tokens_after_pruning = next(counts) if r.status == "pruned" else r.tokens_after_truncation

    stats = {
        "num_trajectories": len(items),
        "num_exit_found": len(plans),
        "no_exit_found": len(items) - len(plans),
        "num_pruned": sum(r.status == "pruned" for r in results),
        "num_dropped": sum(r.status == "dropped" for r in results),
        "num_probes": sum(len(ex.probed) for ex in exits) + len(pending),
        "probe_errors": sum(ex.probe_errors for ex in exits) + sum(failed),
        "tokens_before": sum(r.tokens_before for r in results),
        "tokens_after_truncation": sum(r.tokens_after_truncation for r in results),
        "tokens_after_pruning": sum(r.tokens_after_pruning for r in results),
        **judge_stats,
        "reverify_probes": len(pending),
        "reverify_failures": reverify_failures,
    }
    return results, stats


def merge_dto_stats(parts: Iterable[dict[str, int]], num_pairs: int | None = None) -> dict[str, int]:
    """Sum the per-shard stats of `optimize_trajectories`; `num_pairs` (from `build_dto_pairs`) is set when given."""
    total = dict.fromkeys(STAT_KEYS, 0)
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    if num_pairs is not None:
        total["num_pairs"] = num_pairs
    return total


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

    pairs = []
    for (p, chosen, c_tokens, worst, r_tokens, source), prompt_tokens in zip(candidates, prompt_counts, strict=True):
        prompt = source["prompt"]
        pairs.append(
            {
                "pair_id": content_id(prompt, chosen.text, worst["completion"]),
                "pair_type": "dto",
                "problem_id": p,
                "prompt": prompt,
                "chosen": chosen.text,
                "rejected": worst["completion"],
                "gold_answer": gold[p],
                "source_sample_id": chosen.sample_id,
                "checkpoint_index": chosen.exit_index,
                "prompt_tokens": prompt_tokens,
                "chosen_tokens": c_tokens,
                "rejected_tokens": r_tokens,
                "round": None,
                "attempt_id": None,
                "model": model if model is not None else source.get("model"),
            }
        )
    return pairs


def _is_correct(trajectory: dict[str, Any]) -> bool:
    if "is_correct" in trajectory and trajectory["is_correct"] is not None:
        return bool(trajectory["is_correct"])
    return trajectory.get("status") == "correct"

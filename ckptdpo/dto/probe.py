"""DTO exit probing: candidate positions inside the thinking, probe prompts, probability estimates, exit points."""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ckptdpo.backends.base import GenerationRequest
from ckptdpo.checkpoints import DEFAULT_MARKERS, locate_checkpoints
from ckptdpo.configs import DTOConfig
from ckptdpo.shards import content_id

PROBE = "... Wait, I suddenly got the final answer to the whole problem. Final Answer: \\boxed{"
EXIT_SENTENCE = "Hmm, I think this is enough to derive the final answer."
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# verify_fn(items) -> verdicts: items are (gold, completion) pairs, each verdict has `is_correct` (bool | None).
VerifyFn = Callable[[Sequence[tuple[str, str]]], Sequence[Any]]


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
    probe_tokens: int = 0  # tokens the sampled probes generated (0 for likelihood probes, which generate nothing)

    @property
    def exit_probability(self) -> float | None:
        if self.exit_index is None:
            return None
        return self.probabilities[self.probed.index(self.exit_index)]


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


def estimate_probabilities(*args: Any, **kwargs: Any) -> tuple[list[float], list[bool]]:
    """(p, failed) of `probe_estimates` (same arguments), without the generated token counts."""
    probs, failed, _ = probe_estimates(*args, **kwargs)
    return probs, failed


def probe_estimates(
    backend: Any,
    prompts: Sequence[str],
    golds: Sequence[str],
    keys: Sequence[tuple[str, Any]],
    cfg: DTOConfig,
    verify_fn: VerifyFn,
) -> tuple[list[float], list[bool], list[int]]:
    """P(gold) after each probe prompt, with ONE backend call (score or generate) for all; returns (p, failed,
    generated tokens).

    A probe whose request failed (an error result, a NaN score) gets probability 0 and `failed` True. The generated
    tokens are, per probe, what its sampled continuations generated (what the factory spent on probing, which the
    GRPO baseline's budget matches); a likelihood probe scores and generates none.

    `keys` are (sample_id, position) per probe: they seed the sampled probes (reruns draw the same samples) and
    route them by sample_id (a multi-endpoint backend sends a trajectory's probes where its prefix is cached).
    """
    if not prompts:
        return [], [], []
    if cfg.probe == "likelihood":
        logprobs = backend.score(list(prompts), [g + "}" for g in golds])
        if len(logprobs) != len(prompts):
            raise RuntimeError(f"backend.score returned {len(logprobs)} values for {len(prompts)} probes")
        failed = [lp is None or math.isnan(lp) for lp in logprobs]
        # exp() of a very negative log-probability underflows to 0.0 by itself; only NaN needs catching.
        probs = [0.0 if bad else min(1.0, math.exp(lp)) for lp, bad in zip(logprobs, failed, strict=True)]
        return probs, failed, [0] * len(prompts)

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
    tokens = [sum(s.num_tokens for s in res.samples) for res in results]
    return [hits[i] / cfg.probe_samples for i in range(len(prompts))], failed, tokens


def _shortens(item: DTOItem, char: int, r1: bool) -> bool:
    """Whether the completion cut at `char` and closed is shorter (in characters) than the completion itself."""
    return len(close_trajectory(item.completion[:char], item.gold, r1)) < len(item.completion)


def probe_exit_points(
    backend: Any,
    items: Sequence[DTOItem],
    cfg: DTOConfig,
    verify_fn: VerifyFn,
    markers: Sequence[str] = DEFAULT_MARKERS,
) -> list[ExitResult]:
    """Exit point of every item: all probes of all items in ONE backend call; first position >= threshold wins.

    At most `cfg.max_probes` positions per trajectory are probed, spread evenly from the first to the last. With
    `cfg.exit_must_shorten`, an exit whose closed text (cut + EXIT_SENTENCE + answer) is not shorter than the
    completion is no exit: on a short trajectory that already ends at its answer the cut would lengthen it.
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
    probs, failed, tokens = probe_estimates(backend, prompts, golds, keys, cfg, verify_fn)
    per_item: list[list[float]] = [[] for _ in items]
    errors, spent = Counter(), Counter()
    for t, p, bad, n in zip(owners, probs, failed, tokens, strict=True):
        per_item[t].append(p)
        errors[t] += bad
        spent[t] += n
    out = []
    for t, (item, (kind, positions, probed), ps) in enumerate(zip(items, plans, per_item, strict=True)):
        r1 = is_r1_style(item.prompt, item.completion)
        exit_index = next((idx for idx, p in zip(probed, ps, strict=True) if p >= cfg.threshold), None)
        if cfg.exit_must_shorten and exit_index is not None and not _shortens(item, positions[exit_index - 1], r1):
            # Closing at the exit (sentence + answer) would not be shorter than what the model wrote, and later
            # positions only cut less: there is nothing to gain, so there is no exit.
            exit_index = None
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
                r1=r1,
                probe_errors=errors[t],
                probe_tokens=spent[t],
            )
        )
    return out

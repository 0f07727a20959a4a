"""DTO (Dynamic Thinking pattern Optimization): exit probing, truncation, judge pruning, re-verification, SimPO pairs.

For a correct trajectory, every candidate position (its checkpoints; its paragraph starts when it has fewer than
`min_checkpoints` checkpoints) inside the thinking is probed: the text up to the position, then `PROBE`, and an
estimate of the probability that the model goes on with the gold answer. The first position at or above the
threshold is the exit point; the thinking is cut there and closed with `EXIT_SENTENCE` and the boxed gold answer.
The truncated thinking is split into segments at the candidate positions; a judge LLM flags segments to drop (see
`ckptdpo.judge`). A pruned text must still lead to the gold answer: it is probed once more at its end, with the same
estimator and threshold; when that fails the trajectory falls back to its truncated form or is dropped.

A trajectory with no exit point is left alone (status `no_exit`): without a probe saying a shorter thinking already
holds the answer there is nothing to cut at, and it is not pruned either. With `exit_must_shorten` the same holds
when the first position at the threshold would not shorten the text (closing with EXIT_SENTENCE and the answer is
longer than what follows it).

Probe estimators (`cfg.probe`):
- `likelihood`: exp(backend.score(prompt + prefix + PROBE, gold + "}")), the probability of the gold answer's exact
  token string followed by the closing brace (so "12" does not count as the start of "123"). Other spellings of the
  same answer ("0.5" for "\\frac{1}{2}") get no credit, so this is a lower bound on the chance of a right answer.
- `sample`: `probe_samples` continuations of at most `probe_max_tokens` tokens; a continuation's answer is its text
  up to the `}` that closes the probe's `\\boxed{` (brace depth counted), checked with `verify_fn` as
  `\\boxed{answer}`; the estimate is the share of continuations that verify (one with no closing brace counts as a
  miss, so answers longer than `probe_max_tokens` can never verify).
"""

from ckptdpo.dto.optimize import STAT_KEYS, DTOResult, merge_dto_stats, optimize_trajectories
from ckptdpo.dto.pairs import build_dto_pairs
from ckptdpo.dto.probe import (
    EXIT_SENTENCE,
    PROBE,
    THINK_CLOSE,
    THINK_OPEN,
    DTOItem,
    ExitResult,
    VerifyFn,
    candidate_positions,
    close_box,
    close_trajectory,
    estimate_probabilities,
    is_r1_style,
    paragraph_starts,
    probe_estimates,
    probe_exit_points,
    probe_prompt,
    split_segments,
    spread_indices,
    thinking_end,
    truncate_at_exit,
)

__all__ = [
    "EXIT_SENTENCE",
    "PROBE",
    "STAT_KEYS",
    "THINK_CLOSE",
    "THINK_OPEN",
    "DTOItem",
    "DTOResult",
    "ExitResult",
    "VerifyFn",
    "build_dto_pairs",
    "candidate_positions",
    "close_box",
    "close_trajectory",
    "estimate_probabilities",
    "is_r1_style",
    "merge_dto_stats",
    "optimize_trajectories",
    "paragraph_starts",
    "probe_estimates",
    "probe_exit_points",
    "probe_prompt",
    "split_segments",
    "spread_indices",
    "thinking_end",
    "truncate_at_exit",
]

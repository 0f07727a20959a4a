"""The generation budget: what the factory generated to make its pairs, and how GRPO spends the same amount.

Cost is counted in generated completion tokens, the dominant cost of both methods (prompt tokens are prefilled,
cached and shared by a group's completions; a training step's forward and backward passes are reported apart, as
trained tokens). The factory's tokens come from stats.json; GRPO's are counted exactly from the completion ids the
trainer generated.

How GRPO stays within the budget: a generation that could overshoot it (every completion at max_completion_length)
is capped at ceil(remaining / completions) new tokens per completion, so a step never generates more than
`completions - 1` tokens past the budget; training stops at the end of the step that reaches the budget or leaves
less of it than BUDGET_TOLERANCE (5%) or than one token per completion (a step on such a rest would cut every
completion to a few tokens: a full forward and backward pass for nothing). The final count is therefore at most
`completions - 1` tokens over the budget and at most max(5% of it, `completions`) tokens under it. A capped completion
that did not end is cut off, so it gets no reward, like any completion cut at max_completion_length.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ckptdpo.errors import UserError

# The share of the budget that may be left unspent when training stops (see the module docstring).
BUDGET_TOLERANCE = 0.05
# stats.json sections whose generated tokens the factory spent on its pairs, and how each records them.
FACTORY_SOURCES = ("generate", "resample", "values", "dto")


def factory_token_sources(stats: Mapping[str, Any]) -> dict[str, int]:
    """{source: generated completion tokens} of the factory's stages as stats.json records them.

    generate and values: `generated_tokens`; resample: `generated_tokens` (else the sum of its rounds' `tokens`);
    dto: `probe_generated_tokens` (the sampled probes; likelihood probes generate nothing). A stage that did not run
    is absent. The DTO judge's replies are not counted (a separate judge model, a few tokens per segment).
    """
    out: dict[str, int] = {}
    gen = stats.get("generate") or {}
    if gen:
        out["generate"] = int(gen.get("generated_tokens", gen.get("completion_tokens", 0)) or 0)
    res = stats.get("resample") or {}
    if res:
        rounds = sum(int(r.get("tokens", 0) or 0) for r in res.get("rounds") or [])
        out["resample"] = int(res.get("generated_tokens", rounds) or 0)
    values = stats.get("values") or {}
    if values:
        out["values"] = int(values.get("generated_tokens", 0) or 0)
    dto = stats.get("dto") or {}
    if dto:
        out["dto"] = int(dto.get("probe_generated_tokens", 0) or 0)
    return out


def factory_generated_tokens(stats: Mapping[str, Any]) -> int:
    """Completion tokens the factory generated to make its pairs: generate + resample + values + DTO probes."""
    return sum(factory_token_sources(stats).values())


def resolve_generation_budget(
    budget: str | int | None, stats: Mapping[str, Any], source: str = "stats.json"
) -> int | None:
    """The budget in tokens: a number as given, 'match' as what the factory generated, None for no budget.

    Raises UserError for 'match' when stats.json records no generated tokens (the factory has not run).
    """
    if budget != "match":
        return budget  # type: ignore[return-value]
    tokens = factory_generated_tokens(stats)
    if tokens <= 0:
        raise UserError(
            f"{source}: grpo.generation_budget is 'match' but no factory stage recorded generated tokens; run the "
            "generate stage (and the pair stages) first, or set grpo.generation_budget to a number of tokens."
        )
    return tokens


def generation_cap(remaining: int, completions: int, max_completion_length: int) -> int | None:
    """Max new tokens per completion for the next generation, so it ends at most `completions - 1` tokens past the
    budget; None when even full-length completions fit in what remains (no cap needed)."""
    if completions * max_completion_length <= remaining:
        return None
    return max(1, min(max_completion_length, math.ceil(remaining / completions)))


def budget_spent(generated: int, budget: int, completions: int) -> bool:
    """Whether training stops: the budget is reached, or less of it is left than BUDGET_TOLERANCE of it or one
    token per completion."""
    return budget - generated < max(completions, BUDGET_TOLERANCE * budget)


def step_bound(budget: int, completions: int, steps_per_generation: int) -> int:
    """An upper bound on the optimizer steps a budget can take: every generation makes at least one token per
    completion, and one comes every `steps_per_generation` steps. It bounds the loop; the budget ends it."""
    return (math.ceil(budget / completions) + 1) * steps_per_generation


def lr_factor(progress: float, kind: str, warmup_ratio: float, min_lr_rate: float) -> float:
    """The learning rate's share of its peak at `progress` (0..1) through the schedule: linear warm-up over
    `warmup_ratio`, then constant, linear to 0, cosine to 0, or cosine to `min_lr_rate` (transformers' shapes)."""
    p = min(max(progress, 0.0), 1.0)
    if p < warmup_ratio:
        return p / warmup_ratio
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    q = (p - warmup_ratio) / (1.0 - warmup_ratio)
    if kind == "linear":
        return max(0.0, 1.0 - q)
    cosine = 0.5 * (1.0 + math.cos(math.pi * q))
    if kind == "cosine":
        return cosine
    if kind == "cosine_with_min_lr":
        return min_lr_rate + (1.0 - min_lr_rate) * cosine
    raise ValueError(f"unknown learning-rate schedule {kind!r}")

"""Evaluation metrics: unbiased pass@k, cons@k, token statistics, DTO efficiency and O1-Pruner's AES."""

from __future__ import annotations

import math
import operator
import statistics
from collections import Counter
from collections.abc import Sequence


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k).

    Needs 1 <= k <= n and 0 <= c <= n (ValueError otherwise: fewer than k samples cannot estimate pass@k).
    Computed as a product of min(c, k) factors in (0, 1], never through the huge binomials, so it stays exact to a
    few ulps for n in the millions: C(n-c,k)/C(n,k) = prod_{i=n-c+1}^{n} (1 - k/i) = prod_{j=0}^{k-1} (1 - c/(n-j)).
    """
    n, c, k = _as_int("n", n), _as_int("c", c), _as_int("k", k)
    if n < 1:
        raise ValueError(f"pass@k needs at least one sample, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"c (correct samples) must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}] (pass@k needs at least k samples), got {k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    if c <= k:
        ratio = math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
    else:
        ratio = math.prod(1.0 - c / (n - j) for j in range(k))
    return 1.0 - ratio


def cons_at_k(answers: Sequence[str | None], gold_equal: Sequence[bool], k: int) -> float:
    """Majority vote over the first k answers: 1.0 if the winning answer is correct, else 0.0.

    `answers` are normalized answer strings compared exactly, None where a sample gave none (it does not vote);
    `gold_equal[i]` says whether answers[i] equals the gold answer. A tie goes to the answer seen first among the
    most frequent ones. With no vote at all the result is 0.0. k > len(answers) is a ValueError.
    """
    k = _as_int("k", k)
    if len(answers) != len(gold_equal):
        raise ValueError(f"answers ({len(answers)}) and gold_equal ({len(gold_equal)}) must have the same length")
    if not 1 <= k <= len(answers):
        raise ValueError(f"k must be in [1, {len(answers)}] (number of answers), got {k}")
    votes: Counter[str] = Counter()
    first_seen: dict[str, int] = {}
    for i in range(k):
        a = answers[i]
        if a is None:
            continue
        votes[a] += 1
        first_seen.setdefault(a, i)
    if not votes:
        return 0.0
    top = max(votes.values())
    winner = min((a for a, v in votes.items() if v == top), key=first_seen.__getitem__)
    return 1.0 if gold_equal[first_seen[winner]] else 0.0


def efficiency_eta(acc_base: float, cost_base: float, acc_new: float, cost_new: float) -> float:
    """DTO's efficiency: (acc_new / acc_base) * (cost_base / cost_new); above 1 means better accuracy per token."""
    if acc_base <= 0:
        raise ValueError(f"efficiency needs a positive base accuracy, got acc_base={acc_base}")
    if cost_new <= 0:
        raise ValueError(f"efficiency needs a positive new cost (tokens), got cost_new={cost_new}")
    if acc_new < 0 or cost_base < 0:
        raise ValueError(f"accuracies and costs must be non-negative, got acc_new={acc_new}, cost_base={cost_base}")
    return (acc_new / acc_base) * (cost_base / cost_new)


def aes(
    acc_base: float,
    len_base: float,
    acc_new: float,
    len_new: float,
    alpha: float = 1.0,
    beta: float = 3.0,
    gamma: float = 5.0,
) -> float:
    """O1-Pruner's accuracy-efficiency score: alpha*dLen + beta*dAcc if dAcc >= 0, else alpha*dLen - gamma*|dAcc|.

    dLen = (len_base - len_new) / len_base, dAcc = (acc_new - acc_base) / acc_base; an accuracy drop costs gamma
    per relative unit where a gain earns only beta.
    """
    if len_base <= 0:
        raise ValueError(f"AES needs a positive base length, got len_base={len_base}")
    if acc_base <= 0:
        raise ValueError(f"AES needs a positive base accuracy, got acc_base={acc_base}")
    if acc_new < 0 or len_new < 0:
        raise ValueError(f"accuracy and length must be non-negative, got acc_new={acc_new}, len_new={len_new}")
    d_len = (len_base - len_new) / len_base
    d_acc = (acc_new - acc_base) / acc_base
    if d_acc >= 0:
        return alpha * d_len + beta * d_acc
    return alpha * d_len - gamma * abs(d_acc)


def _percentile_nearest_rank(sorted_values: list[int], q: float) -> int:
    """The smallest value with at least a fraction q of the values at or below it (no interpolation)."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def token_stats(tokens: Sequence[int], is_correct: Sequence[bool | None] | None = None) -> dict[str, float | None]:
    """Token counts: count, mean, median, p90 (nearest rank), max, and mean over correct / incorrect outputs.

    `mean_correct` / `mean_incorrect` are None without `is_correct` or when that group is empty; samples whose
    is_correct is None (no answer, timeout) count in neither. An empty `tokens` is a ValueError.
    """
    if len(tokens) == 0:
        raise ValueError("token_stats needs at least one token count")
    if is_correct is not None and len(is_correct) != len(tokens):
        raise ValueError(f"is_correct has {len(is_correct)} entries for {len(tokens)} token counts")
    values = sorted(tokens)
    out: dict[str, float | None] = {
        "count": len(values),
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "p90": _percentile_nearest_rank(values, 0.9),
        "max": values[-1],
        "mean_correct": None,
        "mean_incorrect": None,
    }
    if is_correct is not None:
        for key, flag in (("mean_correct", True), ("mean_incorrect", False)):
            group = [t for t, c in zip(tokens, is_correct, strict=True) if c is flag]
            out[key] = statistics.fmean(group) if group else None
    return out

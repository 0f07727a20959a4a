"""Evaluation metrics: unbiased pass@k, cons@k, token statistics, DTO efficiency, O1-Pruner's AES, and paired
bootstrap intervals over problems for base-vs-trained differences."""

from __future__ import annotations

import math
import operator
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


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
    """Majority-vote accuracy over k samples: the expectation, over every k-subset of the n answers, of the vote's
    correctness, so cons@1 equals pass@1 and cons@n is the vote over all samples.

    `answers` are normalized answer strings compared exactly, None where a sample gave none (it does not vote);
    `gold_equal[i]` says whether answers[i] equals the gold answer, and all answers equal to the gold vote together.
    A tie among the most frequent answers is broken uniformly at random (it counts as 1/ties when the gold is among
    them); a subset with no vote at all counts 0. k > len(answers) is a ValueError.

    Until issue 16 this looked at the FIRST k answers only (so cons@1 was the first sample's correctness, not
    pass@1); the name is kept, the meaning is now the subset expectation. Exact: the subsets are counted by how many
    of each answer they hold (a product of binomials), never enumerated.
    """
    k = _as_int("k", k)
    if len(answers) != len(gold_equal):
        raise ValueError(f"answers ({len(answers)}) and gold_equal ({len(gold_equal)}) must have the same length")
    n = len(answers)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (number of answers), got {k}")
    gold = sum(1 for a, g in zip(answers, gold_equal, strict=True) if a is not None and g)
    others = Counter(a for a, g in zip(answers, gold_equal, strict=True) if a is not None and not g)
    silent = n - gold - sum(others.values())
    favourable = 0.0
    for t in range(1, min(gold, k) + 1):
        # ways[(chosen among other answers, how many of them tie with the gold at t)]: every other answer at most t.
        ways: dict[tuple[int, int], int] = {(0, 0): 1}
        for m in others.values():
            nxt: dict[tuple[int, int], int] = defaultdict(int)
            for (used, ties), w in ways.items():
                for x in range(min(m, t, k - t - used) + 1):
                    nxt[(used + x, ties + (x == t))] += w * math.comb(m, x)
            ways = nxt
        for (used, ties), w in ways.items():
            rest = k - t - used
            if rest <= silent:
                favourable += math.comb(gold, t) * w * math.comb(silent, rest) / (1 + ties)
    return favourable / math.comb(n, k)


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% for the default z); (0, 1) when n is 0.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n successes, which is where
    checkpoint values with a handful of rollouts mostly are.
    """
    n, successes = _as_int("n", n), _as_int("successes", successes)
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


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


# --- paired bootstrap over problems ----------------------------------------------------------------------------------

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile bootstrap interval; `null` is the value meaning "no change" (0 for a
    difference, 1 for a ratio such as eta)."""

    estimate: float
    low: float
    high: float
    null: float = 0.0

    @property
    def defined(self) -> bool:
        """False when the estimate or a bound is undefined (eta of a model that never answers right, say)."""
        return all(math.isfinite(x) for x in (self.estimate, self.low, self.high))

    @property
    def significant(self) -> bool:
        """Whether the interval is defined and excludes the no-change value."""
        return self.defined and not self.low <= self.null <= self.high

    def to_dict(self) -> dict[str, float | bool | None]:
        # None, not NaN: stats.json stays valid JSON, and an undefined figure is never called a change.
        def num(x: float) -> float | None:
            return round(x, 6) if math.isfinite(x) else None

        return {
            "estimate": num(self.estimate),
            "low": num(self.low),
            "high": num(self.high),
            "null": self.null,
            "significant": self.significant,
        }


@dataclass(frozen=True)
class ProblemOutcome:
    """One problem's eval samples, reduced to what the intervals need: samples, correct ones, token sum and count."""

    num_samples: int
    num_correct: int
    tokens: int
    counted: int


def problem_outcomes(rows: Iterable[Mapping[str, Any]]) -> dict[str, ProblemOutcome]:
    """Per problem_id of EVAL_SAMPLES rows (problem_id, status, finish_reason, completion_tokens): the counts that
    pass@1, pass@k and mean tokens are computed from, as the eval stage computes them (an `error` sample, where
    nothing was generated, counts as a wrong sample but has no length)."""
    acc: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for r in rows:
        a = acc[r["problem_id"]]
        a[0] += 1
        a[1] += r["status"] == "correct"
        if r["finish_reason"] != "error":
            a[2] += int(r["completion_tokens"])
            a[3] += 1
    return {pid: ProblemOutcome(*a) for pid, a in acc.items()}


def paired_bootstrap(
    base: np.ndarray,
    new: np.ndarray,
    statistic: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    null: float = 0.0,
    num_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap of `statistic(base, new)` resampling problems (rows) with replacement, the same rows for
    both models, so what the problems have in common cancels out.

    `base` and `new` are (problems, columns) arrays, row i of each the same problem; `statistic` takes (resamples,
    problems, columns) arrays and returns one value per resample (it is also applied once to the data as given).
    """
    base, new = np.asarray(base, dtype=float), np.asarray(new, dtype=float)
    if base.shape != new.shape or base.ndim != 2 or not len(base):
        raise ValueError(f"paired bootstrap needs two equal (problems, columns) arrays, got {base.shape}, {new.shape}")
    if not 0 < confidence < 1 or num_resamples < 1:
        raise ValueError(f"need 0 < confidence < 1 and num_resamples >= 1, got {confidence}, {num_resamples}")
    estimate = float(statistic(base[None], new[None])[0])
    idx = np.random.default_rng(seed).integers(0, len(base), size=(num_resamples, len(base)))
    values = statistic(base[idx], new[idx])
    values = values[np.isfinite(values)]
    if not len(values):
        return Interval(estimate, math.nan, math.nan, null)
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return Interval(estimate, float(low), float(high), null)


def _columns(outcomes: Sequence[ProblemOutcome], ks: Sequence[int]) -> np.ndarray:
    """Per problem: pass@1, pass@k for each k, token sum, token count."""
    return np.array(
        [
            [
                o.num_correct / o.num_samples,
                *(pass_at_k(o.num_samples, o.num_correct, k) for k in ks),
                o.tokens,
                o.counted,
            ]
            for o in outcomes
        ],
        dtype=float,
    )


def paired_eval_intervals(
    base: Mapping[str, ProblemOutcome],
    new: Mapping[str, ProblemOutcome],
    ks: Sequence[int] = (),
    *,
    num_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired bootstrap intervals of new - base over the problems both were evaluated on: pass@1, pass@k (each k
    both have samples for), mean tokens, and eta = (pass@1 new / base) x (tokens base / new), whose null is 1.

    The estimates are the eval stage's own figures restricted to the shared problems (mean tokens is total tokens
    over counted samples, per resample too), so an interval always brackets the difference the report shows.
    """
    shared = sorted(set(base) & set(new))
    out: dict[str, Any] = {"num_problems": len(shared), "num_resamples": num_resamples, "confidence": confidence}
    if not shared:
        return out
    ks = [k for k in ks if k > 1 and all(k <= o.num_samples for p in shared for o in (base[p], new[p]))]
    b, n = _columns([base[p] for p in shared], ks), _columns([new[p] for p in shared], ks)
    tok = len(ks) + 1  # column of the token sums; the counts follow

    def mean_of(col: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        return lambda x, y: y[..., col].mean(-1) - x[..., col].mean(-1)

    def tokens(x: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return x[..., tok].sum(-1) / x[..., tok + 1].sum(-1)

    def eta(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return (y[..., 0].mean(-1) / x[..., 0].mean(-1)) * (tokens(x) / tokens(y))

    opts = {"num_resamples": num_resamples, "confidence": confidence, "seed": seed}
    out["pass_at_1"] = paired_bootstrap(b, n, mean_of(0), **opts).to_dict()
    out["pass_at_k"] = {str(k): paired_bootstrap(b, n, mean_of(1 + i), **opts).to_dict() for i, k in enumerate(ks)}
    out["mean_tokens"] = paired_bootstrap(b, n, lambda x, y: tokens(y) - tokens(x), **opts).to_dict()
    out["eta"] = paired_bootstrap(b, n, eta, null=1.0, **opts).to_dict()
    return out

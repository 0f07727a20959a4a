"""pass@k, cons@k, token statistics, DTO efficiency and AES against hand-computed values."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptdpo.metrics import (
    aes,
    cons_at_k,
    efficiency_eta,
    paired_bootstrap,
    paired_eval_intervals,
    pass_at_k,
    problem_outcomes,
    token_stats,
)


def exact_pass_at_k(n: int, c: int, k: int) -> float:
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


# --- pass@k ---------------------------------------------------------------------------------------------------------


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 6, 5) == 1.0  # only 4 wrong samples: every 5-subset has a correct one


@pytest.mark.parametrize("n", range(1, 13))
def test_pass_at_k_matches_exact_binomials_for_small_n(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(exact_pass_at_k(n, c, k), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("c, k", [(1, 1), (3, 100), (5000, 1), (5000, 100), (9990, 5), (50, 5000), (1, 9999)])
def test_pass_at_k_large_n_is_stable(c, k):
    n = 10_000
    got = pass_at_k(n, c, k)
    assert 0.0 <= got <= 1.0 and math.isfinite(got)
    assert got == pytest.approx(exact_pass_at_k(n, c, k), rel=1e-10, abs=1e-300)


def test_pass_at_1_is_the_mean_and_pass_at_k_grows_with_k():
    assert pass_at_k(10_000, 1234, 1) == pytest.approx(0.1234, rel=1e-12)
    values = [pass_at_k(64, 3, k) for k in range(1, 65)]
    assert values == sorted(values) and values[-1] == 1.0


def test_pass_at_k_huge_n_is_fast_and_finite():
    assert pass_at_k(10**7, 5 * 10**6, 10**6) == 1.0  # the ratio underflows to 0, never to nan
    assert pass_at_k(10**7, 10, 3) == pytest.approx(exact_pass_at_k(10**7, 10, 3), rel=1e-9)
    assert pass_at_k(10**7, 3, 10) == pytest.approx(exact_pass_at_k(10**7, 3, 10), rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_property(nck):
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(exact_pass_at_k(n, c, k), rel=1e-11, abs=1e-300)


@pytest.mark.parametrize(
    "n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 6), (5, 2, 0), (0, 0, 1), (5.0, 2, 1), (5, 2, True)]
)
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# --- cons@k ---------------------------------------------------------------------------------------------------------


def brute_cons_at_k(answers, gold_equal, k) -> Fraction:
    """cons@k by enumerating every k-subset, a tie split evenly between the tied answers (the definition)."""
    total, subsets = Fraction(0), 0
    for subset in itertools.combinations(range(len(answers)), k):
        subsets += 1
        votes = Counter("GOLD" if gold_equal[i] else answers[i] for i in subset if answers[i] is not None)
        if votes:
            top = max(votes.values())
            tied = [a for a, v in votes.items() if v == top]
            total += Fraction(int("GOLD" in tied), len(tied))
    return total / subsets


def test_cons_at_k_majority():
    answers = ["3", "4", "3", "5", "4", "4"]
    gold = [a == "4" for a in answers]
    assert cons_at_k(answers, gold, 6) == 1.0  # "4" x3 beats "3" x2
    assert cons_at_k(answers, gold, 1) == pytest.approx(0.5)  # pass@1: 3 of 6
    # k=3, by hand: 20 subsets; "4" wins outright with two or three fours (C(3,2)*3 + 1 = 10), and the
    # one-four subsets {4, 3, 5} tie three ways (2*3 = 6 subsets, 1/3 each): (10 + 2) / 20.
    assert cons_at_k(answers, gold, 3) == pytest.approx(12 / 20)


def test_cons_at_1_equals_pass_at_1():
    answers = ["2", None, "5", "2", "7", "2", None, "5"]
    gold = [a == "5" for a in answers]
    assert cons_at_k(answers, gold, 1) == pytest.approx(pass_at_k(len(answers), sum(gold), 1))


def test_cons_at_k_tie_is_split():
    answers = ["7", "8", "8", "7"]
    assert cons_at_k(answers, [a == "7" for a in answers], 4) == 0.5
    assert cons_at_k(answers, [a == "8" for a in answers], 4) == 0.5


def test_cons_at_k_none_does_not_vote():
    answers = [None, None, None, "2", "1", "2"]
    assert cons_at_k(answers, [a == "2" for a in answers], 6) == 1.0
    assert cons_at_k([None, None, None], [False, False, False], 2) == 0.0  # no vote at all
    assert cons_at_k([None, "x"], [True, False], 2) == 0.0  # gold_equal of a None answer is ignored


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["g", "a", "b", "c", None]), min_size=1, max_size=9), st.data())
def test_cons_at_k_matches_subset_enumeration(answers, data):
    k = data.draw(st.integers(1, len(answers)))
    gold = [a == "g" for a in answers]
    assert cons_at_k(answers, gold, k) == pytest.approx(float(brute_cons_at_k(answers, gold, k)), abs=1e-12)


def test_cons_at_k_errors():
    with pytest.raises(ValueError):
        cons_at_k(["1", "2"], [True], 1)
    with pytest.raises(ValueError):
        cons_at_k(["1"], [True], 2)
    with pytest.raises(ValueError):
        cons_at_k(["1"], [True], 0)


# --- eta, AES -------------------------------------------------------------------------------------------------------


def test_efficiency_eta():
    assert efficiency_eta(0.5, 1000, 0.6, 600) == pytest.approx(2.0)  # 1.2 * 1000/600
    assert efficiency_eta(0.8, 1000, 0.8, 1000) == pytest.approx(1.0)
    assert efficiency_eta(0.8, 1000, 0.4, 1000) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="acc_base"):
        efficiency_eta(0.0, 1000, 0.5, 500)
    with pytest.raises(ValueError, match="cost_new"):
        efficiency_eta(0.5, 1000, 0.5, 0)


def test_aes_accuracy_gain_and_drop():
    # Gain: dLen = 0.2, dAcc = +0.1 -> 1*0.2 + 3*0.1.
    assert aes(0.5, 1000, 0.55, 800) == pytest.approx(0.5)
    # Drop: dLen = 0.5, dAcc = -0.1 -> 1*0.5 - 5*0.1; the drop is penalized harder than a gain is rewarded.
    assert aes(0.5, 1000, 0.45, 500) == pytest.approx(0.0)
    assert aes(0.5, 1000, 0.45, 1000) < -aes(0.5, 1000, 0.55, 1000) < 0
    # No change in accuracy takes the gain branch; longer outputs give a negative dLen.
    assert aes(0.5, 1000, 0.5, 1200) == pytest.approx(-0.2)
    assert aes(0.5, 1000, 0.4, 500, alpha=2.0, beta=1.0, gamma=10.0) == pytest.approx(2 * 0.5 - 10 * 0.2)


@pytest.mark.parametrize("args", [(0.0, 1000, 0.5, 500), (0.5, 0, 0.5, 500), (0.5, 1000, -0.1, 500)])
def test_aes_rejects_zero_base(args):
    with pytest.raises(ValueError):
        aes(*args)


# --- token statistics -----------------------------------------------------------------------------------------------


def test_token_stats():
    tokens = [10, 1, 9, 2, 8, 3, 7, 4, 6, 5]
    stats = token_stats(tokens)
    assert stats["count"] == 10
    assert stats["mean"] == pytest.approx(5.5)
    assert stats["median"] == pytest.approx(5.5)
    assert stats["p90"] == 9  # nearest rank: the 9th of 10 sorted values
    assert stats["max"] == 10
    assert stats["mean_incorrect"] is None and stats["mean_correct"] is None


def test_token_stats_by_correctness():
    tokens = [100, 900, 300, 700, 50]
    stats = token_stats(tokens, [True, False, True, False, None])
    assert stats["mean_correct"] == pytest.approx(200)
    assert stats["mean_incorrect"] == pytest.approx(800)
    assert token_stats([5], [True])["mean_incorrect"] is None
    assert token_stats(list(range(1, 101)))["p90"] == 90
    assert token_stats([4, 1, 3])["median"] == 3


def test_token_stats_errors():
    with pytest.raises(ValueError):
        token_stats([])
    with pytest.raises(ValueError):
        token_stats([1, 2], [True])


# --- paired bootstrap intervals ------------------------------------------------------------------------------------


def eval_rows(model_correct: dict[str, list[bool]], tokens: dict[str, list[int]]) -> list[dict]:
    """EVAL_SAMPLES-like rows: per problem, one row per sample."""
    return [
        {
            "problem_id": pid,
            "sample_index": j,
            "status": "correct" if ok else "incorrect",
            "is_correct": ok,
            "extracted": "1" if ok else "0",
            "finish_reason": "stop",
            "completion_tokens": tokens[pid][j],
        }
        for pid, flags in model_correct.items()
        for j, ok in enumerate(flags)
    ]


def test_identical_models_show_no_change():
    rows = eval_rows(
        {"p1": [True, False], "p2": [False, False], "p3": [True, True]}, {p: [10, 20] for p in "p1 p2 p3".split()}
    )
    out = paired_eval_intervals(problem_outcomes(rows), problem_outcomes(rows), [2])
    for key in ("pass_at_1", "mean_tokens"):
        assert (out[key]["estimate"], out[key]["low"], out[key]["high"], out[key]["significant"]) == (0, 0, 0, False)
    assert out["pass_at_k"]["2"]["significant"] is False
    assert out["eta"]["estimate"] == pytest.approx(1.0) and out["eta"]["null"] == 1.0 and not out["eta"]["significant"]


def test_estimates_are_the_eval_stage_figures():
    """The intervals' estimates equal the differences of what the eval aggregator reports for each model."""
    import pyarrow as pa

    from ckptdpo.evaluate import aggregate_shards

    rng = np.random.default_rng(3)
    pids = [f"p{i}" for i in range(12)]
    models = {}
    for name, acc in (("base", 0.4), ("trained", 0.6)):
        flags = {p: list(rng.random(4) < acc) for p in pids}
        tokens = {p: [int(t) for t in rng.integers(20, 90, 4)] for p in pids}
        models[name] = eval_rows(flags, tokens)
    metrics = {n: aggregate_shards([pa.Table.from_pylist(r)], 4, [1, 2, 4]) for n, r in models.items()}
    out = paired_eval_intervals(problem_outcomes(models["base"]), problem_outcomes(models["trained"]), [1, 2, 4])
    base, new = metrics["base"], metrics["trained"]
    assert out["num_problems"] == 12 and set(out["pass_at_k"]) == {"2", "4"}
    assert out["pass_at_1"]["estimate"] == pytest.approx(new["pass_at_1"] - base["pass_at_1"], abs=1e-6)
    assert out["pass_at_k"]["4"]["estimate"] == pytest.approx(new["pass_at_k"]["4"] - base["pass_at_k"]["4"], abs=1e-6)
    assert out["mean_tokens"]["estimate"] == pytest.approx(new["mean_tokens"] - base["mean_tokens"], abs=1e-5)
    eta = efficiency_eta(base["pass_at_1"], base["mean_tokens"], new["pass_at_1"], new["mean_tokens"])
    assert out["eta"]["estimate"] == pytest.approx(eta, abs=1e-5)
    for key in ("pass_at_1", "mean_tokens", "eta"):
        assert out[key]["low"] <= out[key]["estimate"] <= out[key]["high"]


def test_a_large_gain_is_significant_and_a_tiny_sample_is_not():
    many = {f"p{i}": [False] * 4 for i in range(30)}
    better = {f"p{i}": [True] * 4 for i in range(30)}
    toks = {p: [50] * 4 for p in many}
    out = paired_eval_intervals(problem_outcomes(eval_rows(many, toks)), problem_outcomes(eval_rows(better, toks)))
    assert out["pass_at_1"]["low"] == 1.0 and out["pass_at_1"]["significant"]
    # One problem of three improved by one sample in four: the interval reaches zero.
    a = {"p1": [True, False, False, False], "p2": [False] * 4, "p3": [True] * 4}
    b = {"p1": [True, True, False, False], "p2": [False] * 4, "p3": [True] * 4}
    toks = {p: [50] * 4 for p in a}
    out = paired_eval_intervals(problem_outcomes(eval_rows(a, toks)), problem_outcomes(eval_rows(b, toks)))
    assert out["pass_at_1"]["estimate"] == pytest.approx(1 / 12, abs=1e-6) and not out["pass_at_1"]["significant"]


def test_pairing_removes_the_problem_effect():
    """Problems differ a lot in difficulty; the trained model gains the same small amount on each. Paired, the gain is
    significant; an unpaired view of the same numbers would be swamped by the spread between problems."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 0.8, size=(40, 1))
    new = base + 0.05
    interval = paired_bootstrap(base, new, lambda x, y: y[..., 0].mean(-1) - x[..., 0].mean(-1))
    assert interval.significant and interval.low == pytest.approx(0.05) and interval.high == pytest.approx(0.05)


def test_bootstrap_interval_covers_the_true_difference():
    """Over repeated synthetic benchmarks with a known true difference, the 90% interval covers it about 90% of the
    time (a broken resampling, e.g. not paired or not with replacement, misses this badly)."""
    rng = np.random.default_rng(1)
    hits, trials = 0, 200
    for t in range(trials):
        difficulty = rng.uniform(0, 1, size=60)
        base = (rng.random((60, 8)) < difficulty[:, None]).mean(1, keepdims=True)
        new = (rng.random((60, 8)) < np.clip(difficulty + 0.1, 0, 1)[:, None]).mean(1, keepdims=True)
        true = np.clip(difficulty + 0.1, 0, 1).mean() - difficulty.mean()
        iv = paired_bootstrap(
            base, new, lambda x, y: y[..., 0].mean(-1) - x[..., 0].mean(-1), num_resamples=400, confidence=0.9, seed=t
        )
        hits += iv.low <= true <= iv.high
    assert 0.8 <= hits / trials <= 0.97


def test_paired_bootstrap_rejects_unpaired_inputs():
    with pytest.raises(ValueError):
        paired_bootstrap(np.zeros((3, 1)), np.zeros((4, 1)), lambda x, y: y.mean(-1))
    assert paired_eval_intervals({}, {})["num_problems"] == 0


def test_an_undefined_interval_is_null_in_json_and_never_significant():
    import json
    import math

    from ckptdpo.metrics import Interval

    iv = Interval(math.nan, math.nan, math.nan, null=1.0).to_dict()
    assert iv["estimate"] is None and iv["low"] is None and iv["significant"] is False
    json.dumps(iv, allow_nan=False)  # valid JSON: no NaN
    assert Interval(0.5, 0.1, 0.9).to_dict()["significant"] is True

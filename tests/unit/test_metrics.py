"""pass@k, cons@k, token statistics, DTO efficiency and AES against hand-computed values."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptdpo.metrics import aes, cons_at_k, efficiency_eta, pass_at_k, token_stats


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


def test_cons_at_k_majority():
    answers = ["3", "4", "3", "5", "4", "4"]
    gold = [a == "4" for a in answers]
    assert cons_at_k(answers, gold, 6) == 1.0  # "4" x3 beats "3" x2
    assert cons_at_k(answers, gold, 3) == 0.0  # first three: "3" x2


def test_cons_at_k_tie_goes_to_first_seen():
    answers = ["7", "8", "8", "7"]
    assert cons_at_k(answers, [a == "7" for a in answers], 4) == 1.0
    assert cons_at_k(answers, [a == "8" for a in answers], 4) == 0.0


def test_cons_at_k_none_does_not_vote():
    answers = [None, None, None, "2", "1", "2"]
    assert cons_at_k(answers, [a == "2" for a in answers], 6) == 1.0
    assert cons_at_k(answers, [a == "2" for a in answers], 3) == 0.0  # no vote at all
    assert cons_at_k([None, "x"], [True, False], 2) == 0.0  # gold_equal of a None answer is ignored


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

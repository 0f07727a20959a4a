"""Checkpoint values: Wilson intervals, bisection vs exhaustive search on planted values, critical pairs checked with
the real verifier, step labels, failures, determinism, the value-guided schedule, summary and report section."""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from dataclasses import dataclass

import pytest

from ckptdpo.backends.fake import FakeBackend, count_words
from ckptdpo.checkpoints import locate_checkpoints, schedule_resample_points, schedule_value_points
from ckptdpo.configs import ConfigError, Recipe, ResampleConfig, ValuesConfig
from ckptdpo.metrics import wilson_interval
from ckptdpo.resample import pair_drop_reason, plan_slots
from ckptdpo.schemas import PAIRS, PRM_STEPS, VALUE_TRAJECTORIES, VALUES, make_table
from ckptdpo.values import (
    compare_schedules,
    estimate_values,
    rows_by_sample,
    split_steps,
    summarize_values,
    values_headline,
)
from ckptdpo.verify import verify_batch

PROBLEM = "What is 3 + 4?"
GOLD, WRONG = "7", "5"
ROLLOUTS = 8
verify = functools.partial(verify_batch, timeout_s=20.0, workers=1, answer_format="boxed")


# --- planting ------------------------------------------------------------------------------------------------------


def _paragraph(sid: str, i: int) -> str:
    """Paragraph i of a planted trajectory; its text is unique, so the prefix ending there selects one fake rule."""
    return f"Wait, step {sid}-{i} rechecks the partial sum." if i else f"Let us solve problem {sid} carefully."


def correct_text(j: int) -> str:
    """A correct continuation of 4 + 2j words (lengths differ, so the length-closest choice is visible)."""
    return "Then" + " indeed" * (2 * j) + f" so \\boxed{{{GOLD}}}"


def wrong_text(j: int) -> str:
    return "Then" + " hmm" * j + f" so \\boxed{{{WRONG}}}"


def plant(sid: str, rates: list[float], *, status: str = "incorrect", backend_template: FakeBackend | None = None,
          problem_id: str = "p1", rollouts: int = ROLLOUTS) -> tuple[dict, list[dict]]:  # fmt: skip
    """A trajectory with len(rates) checkpoints whose prefix at checkpoint i continues correctly with rate
    rates[i-1] (in units of 1/rollouts), and the fake continuation rules that make it so."""
    n = len(rates)
    paragraphs = [_paragraph(sid, i) for i in range(n + 1)]
    answer = GOLD if status == "correct" else WRONG
    completion = "\n\n".join(paragraphs) + f"\n\nSo the answer is \\boxed{{{answer}}}."
    chars = [c.char for c in locate_checkpoints(completion)]
    assert len(chars) == n  # what the checkpoints stage finds in it
    rules = []
    for i, rate in enumerate(rates):
        k = round(rate * rollouts)
        texts = [correct_text(j) for j in range(k)] + [wrong_text(j) for j in range(rollouts - k)]
        rules.append({"after": paragraphs[i] + "\n\n", "texts": texts})
    prompt = (backend_template or FakeBackend({})).chat_prompt(PROBLEM)
    trajectory = {
        "sample_id": sid,
        "problem_id": problem_id,
        "prompt": prompt,
        "completion": completion,
        "prompt_tokens": count_words(prompt),
        "completion_tokens": count_words(completion),
        "finish_reason": "stop",
        "status": status,
        "checkpoint_chars": chars,
        "gold_answer": GOLD,
        "model": "fake",
    }
    return trajectory, rules


def curve(n: int, critical: int | None, high: float = 0.75, low: float = 0.125) -> list[float]:
    """Planted values: `high` before the critical checkpoint, `low` from it on (all high when None)."""
    return [low if critical is not None and i >= critical else high for i in range(1, n + 1)]


def run(trajectories_rules, *, backend=None, **cfg):
    trajectories = [t for t, _ in trajectories_rules]
    rules = [r for _, rs in trajectories_rules for r in rs]
    backend = backend or FakeBackend({"continuations": rules})
    return estimate_values(trajectories, ValuesConfig(**cfg), backend, verify)


# --- Wilson --------------------------------------------------------------------------------------------------------


def test_wilson_interval_matches_the_closed_form_and_stays_in_the_unit_interval():
    low, high = wilson_interval(4, 8)
    assert (round(low, 4), round(high, 4)) == (0.2152, 0.7848)
    low, high = wilson_interval(0, 8)
    assert low == 0.0 and round(high, 4) == 0.3244  # not empty at 0 successes, unlike the normal approximation
    low, high = wilson_interval(8, 8)
    assert round(low, 4) == 0.6756 and high == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(9, 8)


# --- search --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "critical"), [(4, 1), (4, 4), (8, 3), (8, None), (13, 7), (32, 1), (32, 20), (32, 32), (32, None)]
)
def test_both_searches_find_the_planted_critical_index_of_monotone_values(n, critical):
    planted = plant("s1", curve(n, critical))
    for search in ("exhaustive", "binary"):
        res = run([planted], search=search)
        (row,) = res.trajectories
        assert row["critical_index"] == critical, search
        assert row["resolved"] is True
        for v in res.values:  # one request with n = rollouts over `rollouts` texts gives the planted rate exactly
            assert v["value"] == curve(n, critical)[v["checkpoint_index"] - 1]
            assert v["ci_low"] <= v["value"] <= v["ci_high"]
            assert v["rollouts"] == ROLLOUTS and v["successes"] + v["incorrect"] == ROLLOUTS
        if search == "exhaustive":
            assert row["probed"] == n and [v["checkpoint_index"] for v in res.values] == list(range(1, n + 1))
        else:
            assert math.floor(math.log2(n + 1)) <= row["probed"] <= math.ceil(math.log2(n + 1))
        assert row["rollouts_used"] == row["probed"] * ROLLOUTS


def test_binary_uses_at_most_half_the_rollouts_of_exhaustive_from_8_checkpoints():
    for n in (8, 9, 16, 32, 68):
        for critical in (1, 2, n // 2, n - 1, n, None):
            planted = plant("s1", curve(n, critical))
            binary, exhaustive = (run([planted], search=s).trajectories[0] for s in ("binary", "exhaustive"))
            assert binary["critical_index"] == exhaustive["critical_index"] == critical
            assert binary["rollouts_used"] <= exhaustive["rollouts_used"] / 2, (n, critical)


def test_non_monotone_values_binary_ends_on_a_probed_drop_exhaustive_on_the_first():
    # A dip at 2, a recovery, then the real fall at 6: the values are not non-increasing.
    rates = [0.75, 0.125, 0.75, 0.75, 0.75, 0.0, 0.0, 0.0]
    planted = plant("s1", rates)
    exhaustive = run([planted], search="exhaustive")
    assert exhaustive.trajectories[0]["critical_index"] == 2
    binary = run([planted], search="binary")
    c = binary.trajectories[0]["critical_index"]
    probed = {v["checkpoint_index"]: v["value"] for v in binary.values}
    # Bisection jumps over the dip: it ends on the fall at 6, a checkpoint below 0.5 right after a probed one above.
    assert c == 6 and probed[c] < 0.5 and probed[c - 1] >= 0.5
    assert all(value >= 0.5 for i, value in probed.items() if i < c)


def test_a_continuation_cut_at_length_never_counts_as_correct_whatever_the_verifier_says():
    t, _ = plant("s1", [1.0])
    cut = {"text": f"so \\boxed{{{GOLD}}}", "finish_reason": "length"}
    backend = FakeBackend({"continuations": [{"after": _paragraph("s1", 0) + "\n\n", "texts": [cut]}]})

    @dataclass(frozen=True)
    class Yes:
        status: str = "correct"
        is_correct: bool = True

    res = estimate_values([t], ValuesConfig(search="exhaustive"), backend, lambda items: [Yes() for _ in items])
    assert res.values[0]["successes"] == 0 and res.trajectories[0]["critical_index"] == 1


def test_the_rollout_cap_stops_a_search_unresolved_and_spreads_exhaustive_probes():
    planted = plant("s1", curve(32, 20))
    binary = run([planted], search="binary", max_rollouts_per_trajectory=3 * ROLLOUTS + 5)
    row = binary.trajectories[0]
    assert row["probed"] == 3 and row["rollouts_used"] == 3 * ROLLOUTS and row["resolved"] is False
    assert binary.prm == []  # an unresolved search's labels would be guesses
    exhaustive = run([planted], search="exhaustive", max_rollouts_per_trajectory=4 * ROLLOUTS)
    assert [v["checkpoint_index"] for v in exhaustive.values] == [1, 11, 22, 32]
    assert exhaustive.trajectories[0]["critical_index"] == 22 and exhaustive.trajectories[0]["resolved"] is False


def test_trajectories_setting_selects_by_verdict_and_skips_those_without_checkpoints():
    wrong, rules_w = plant("s-wrong", curve(4, 2))
    right, rules_r = plant("s-right", curve(4, None), status="correct")
    timeout = {**plant("s-timeout", curve(4, 2))[0], "status": "timeout"}
    bare = {**plant("s-bare", curve(4, 2))[0], "checkpoint_chars": []}
    backend = FakeBackend({"continuations": rules_w + rules_r})
    everything = [wrong, right, timeout, bare]
    for which, expected in (("all", ["s-right", "s-wrong"]), ("incorrect", ["s-wrong"]), ("correct", ["s-right"])):
        res = estimate_values(everything, ValuesConfig(trajectories=which), backend, verify)
        assert [r["sample_id"] for r in res.trajectories] == expected


def test_failed_requests_leave_no_rows_and_are_returned_not_counted_wrong():
    good = plant("s-good", curve(8, 3))
    broken_t, broken_rules = plant("s-broken", curve(8, 3))
    backend = FakeBackend({"continuations": good[1] + broken_rules[:3]})  # s-broken's later probes have no rule
    res = estimate_values([good[0], broken_t], ValuesConfig(search="binary"), backend, verify)
    assert res.failed == ["s-broken"] and "no rule" in res.errors[0]
    assert {r["sample_id"] for r in res.values} == {r["sample_id"] for r in res.trajectories} == {"s-good"}
    assert all(p["source_sample_id"] == "s-good" for p in res.pairs)
    assert res.trajectories[0]["critical_index"] == 3  # the other trajectory is unaffected


def test_rows_are_the_same_whatever_the_batch_composition_and_order():
    planted = [plant(f"s{i}", curve(n, c)) for i, (n, c) in enumerate([(8, 3), (13, 1), (5, None), (21, 17)])]
    rules = [r for _, rs in planted for r in rs]
    backend = FakeBackend({"continuations": rules})
    siblings = [plant("s-sib", curve(2, None), status="correct")[0]]  # the start's correct continuation (s1)

    def go(ts):
        return estimate_values(ts + siblings, ValuesConfig(trajectories="incorrect"), backend, verify)

    together = go([t for t, _ in planted])
    reversed_ = go([t for t, _ in reversed(planted)])
    alone = [go([t]) for t, _ in planted]
    key = functools.partial(sorted, key=lambda r: (r["sample_id"], r.get("checkpoint_index", 0)))
    for part in ("values", "trajectories"):
        rows = key(getattr(together, part))
        assert rows == key(getattr(reversed_, part)) == key([r for a in alone for r in getattr(a, part)])
    ids = sorted(p["pair_id"] for p in together.pairs)
    assert ids == sorted(p["pair_id"] for p in reversed_.pairs) == sorted(p["pair_id"] for a in alone for p in a.pairs)
    assert len(ids) == 4
    seeds = {(v["sample_id"], v["checkpoint_index"]): v["seed"] for v in together.values}
    assert len(set(seeds.values())) == len(seeds)  # every probe its own content-derived seed


def test_probes_of_one_trajectory_share_a_route_and_a_round_is_one_generate_call():
    planted = [plant("s1", curve(8, 3)), plant("s2", curve(30, 11))]
    inner = FakeBackend({"continuations": [r for _, rs in planted for r in rs]})
    calls = []

    class Recording:
        model_id = "fake"

        def generate(self, requests):
            calls.append(list(requests))
            return inner.generate(requests)

        def count_tokens(self, texts):
            return inner.count_tokens(texts)

    res = estimate_values([t for t, _ in planted], ValuesConfig(search="binary"), Recording(), verify)
    assert len(calls) == res.stats["rounds"] == math.ceil(math.log2(31))  # the longer bisection sets the rounds
    assert all(len(c) <= 2 for c in calls) and all(r.n == ROLLOUTS for c in calls for r in c)
    routes = {r.route_key for c in calls for r in c if r.prompt.startswith(planted[0][0]["prompt"])}
    assert routes == {"s1", "s2"}
    assert all(r.route_key in r.prompt for c in calls for r in c)  # the prompt holds its own trajectory's text


# --- critical pairs ------------------------------------------------------------------------------------------------


def test_critical_pairs_chosen_verifies_and_rejected_does_not_with_the_real_verifier():
    planted = [plant(f"s{c}", curve(12, c)) for c in (2, 5, 12)]
    for search in ("binary", "exhaustive"):
        res = run(planted, search=search)
        assert [p["pair_type"] for p in res.pairs] == ["critical"] * 3
        chosen = verify([(p["gold_answer"], p["chosen"]) for p in res.pairs])
        rejected = verify([(p["gold_answer"], p["rejected"]) for p in res.pairs])
        assert all(v.status == "correct" for v in chosen)
        assert all(v.status == "incorrect" for v in rejected)
        by_sample = {t["sample_id"]: t for t, _ in planted}
        for p in res.pairs:
            t = by_sample[p["source_sample_id"]]
            critical = int(p["source_sample_id"][1:])
            good = critical - 1  # the last good checkpoint, probed by both searches
            assert p["checkpoint_index"] == good
            cut = t["checkpoint_chars"][good - 1]
            assert p["prompt"] == t["prompt"] + t["completion"][:cut] and p["rejected"] == t["completion"][cut:]
            assert p["prompt_tokens"] == count_words(p["prompt"])
            assert (p["chosen_tokens"], p["rejected_tokens"]) == (count_words(p["chosen"]), count_words(p["rejected"]))
            assert p["round"] is None and p["attempt_id"]
        make_table(res.pairs, PAIRS)


def test_the_chosen_rollout_is_the_one_closest_in_length_to_the_rejected_side():
    t, rules = plant("s1", curve(3, 3))
    rejected_words = count_words(t["completion"][t["checkpoint_chars"][1] :])
    # Correct rollouts at the last good checkpoint (2) shorter and longer than the rejected suffix, and wrong ones.
    lengths = [4, rejected_words - 3, rejected_words + 2, rejected_words + 20, 2 * rejected_words]
    texts = ["ok " * (k - 1) + f"\\boxed{{{GOLD}}}" for k in lengths] + [wrong_text(0)] * 3
    rules[1] = {**rules[1], "texts": texts}
    res = estimate_values([t], ValuesConfig(search="exhaustive"), FakeBackend({"continuations": rules}), verify)
    (pair,) = res.pairs
    assert pair["chosen"] == texts[2] and pair["chosen_tokens"] == rejected_words + 2
    assert pair["rejected_tokens"] == rejected_words and pair["checkpoint_index"] == 2


def test_a_first_error_in_the_first_step_pairs_against_a_correct_sibling_from_the_start():
    t, rules = plant("s1", curve(6, 1))
    short = plant("s-short", [1.0], status="correct")[0]
    long_ = {**short, "sample_id": "s-long", "completion": short["completion"] + " Wait, I am sure." * 3}
    other_problem = {**short, "sample_id": "s-other", "problem_id": "p2"}
    backend = FakeBackend({"continuations": rules})
    res = estimate_values([t, short, long_, other_problem], ValuesConfig(trajectories="incorrect"), backend, verify)
    (pair,) = res.pairs
    assert pair["checkpoint_index"] == 0 and pair["prompt"] == t["prompt"] and pair["rejected"] == t["completion"]
    assert pair["attempt_id"] == "s-long"  # of the siblings, the one closer in length to the whole wrong completion
    assert res.trajectories[0]["probed"] == 3  # checkpoint 0 itself was never probed
    alone = estimate_values([t], ValuesConfig(trajectories="incorrect"), backend, verify)
    assert alone.pairs == [] and alone.stats["pairs_dropped"] == {"no_correct_rollout": 1}


def test_a_wrong_trajectory_with_no_value_below_threshold_pairs_at_its_last_checkpoint():
    t, rules = plant("s1", curve(5, None))
    res = estimate_values([t], ValuesConfig(), FakeBackend({"continuations": rules}), verify)
    (pair,) = res.pairs
    assert res.trajectories[0]["critical_index"] is None and pair["checkpoint_index"] == 5


def test_pairs_only_from_incorrect_verdicts_and_filters_from_the_config():
    right = plant("s-right", curve(4, 2), status="correct")
    no_answer = plant("s-none", curve(4, 2))
    no_answer[0]["status"] = "no_answer"
    res = run([right, no_answer])
    assert res.pairs == [] and len(res.trajectories) == 2
    wrong = plant("s1", curve(4, 2))
    res = run([wrong], max_pair_tokens=10)
    assert res.pairs == [] and res.stats["pairs_dropped"] == {"over_max_pair_tokens": 1}
    assert run([wrong], critical_pairs=False).pairs == []


def test_pair_filters_shared_with_resample():
    assert pair_drop_reason(10, 5, 8, None, None) is None
    assert pair_drop_reason(10, 5, 8, 17, None) == "over_max_pair_tokens"  # 10 + 8 > 17
    assert pair_drop_reason(10, 5, 8, 18, None) is None
    assert pair_drop_reason(0, 2, 9, None, 4.0) == "over_max_length_ratio"
    assert pair_drop_reason(0, 0, 4, None, 4.0) is None  # the shorter side counts as at least 1 token


def test_nothing_to_probe_makes_no_backend_or_verifier_call():
    def refuse(*_):
        raise AssertionError("called")

    class Backend:
        generate = count_tokens = staticmethod(refuse)

    res = estimate_values([], ValuesConfig(), Backend(), refuse)
    assert (res.values, res.trajectories, res.pairs, res.prm, res.failed) == ([], [], [], [], [])
    assert res.stats["rounds"] == 0


# --- step labels ---------------------------------------------------------------------------------------------------


def test_prm_rows_label_steps_up_to_the_first_error():
    wrong, rules_w = plant("s-wrong", curve(9, 4))
    right, rules_r = plant("s-right", curve(3, None), status="correct")
    late, rules_l = plant("s-late", curve(3, None))
    backend = FakeBackend({"continuations": rules_w + rules_r + rules_l})
    for search in ("binary", "exhaustive"):
        res = estimate_values([wrong, right, late], ValuesConfig(search=search), backend, verify)
        rows = {r["sample_id"]: r for r in res.prm}
        w = rows["s-wrong"]
        assert w["labels"] == [True, True, True, False] and w["prompt"] == wrong["prompt"]
        assert "".join(w["completions"]) == wrong["completion"][: wrong["checkpoint_chars"][3]]
        assert w["values"][3] == 0.125 and (w["values"][0] is None) == (search == "binary")
        r = rows["s-right"]
        assert r["labels"] == [True] * 4 and "".join(r["completions"]) == right["completion"]
        assert r["values"][-1] == 1.0
        x = rows["s-late"]
        assert x["labels"] == [True, True, True, False] and x["values"][-1] == 0.0
        make_table(res.prm, PRM_STEPS)


def test_split_steps_joins_back_to_the_completion():
    text = "a\n\nWait, b\n\nBut c"
    chars = [c.char for c in locate_checkpoints(text)]
    assert split_steps(text, chars) == ["a\n\n", "Wait, b\n\n", "But c"]


# --- value-guided schedule -----------------------------------------------------------------------------------------


def _value_row(i, successes, rollouts=8, incorrect=None, tokens=80, sid="s1"):
    low, high = wilson_interval(successes, rollouts)
    return {"sample_id": sid, "checkpoint_index": i, "value": successes / rollouts, "ci_low": low, "ci_high": high,
            "rollouts": rollouts, "successes": successes,
            "incorrect": rollouts - successes if incorrect is None else incorrect,
            "completion_tokens": tokens}  # fmt: skip


def test_value_schedule_puts_half_the_draws_in_the_critical_region_and_the_rest_on_wide_intervals():
    rows = [_value_row(i, s) for i, s in [(1, 8), (2, 7), (3, 4), (4, 1), (5, 0)]]
    points = schedule_value_points(5, rows, draws=10, threshold=0.5)
    counts = Counter(points)
    assert len(points) == 10 and points == sorted(points)
    # critical = 4 (first below 0.5), last good = 3: 5 draws alternate 3, 4, 3, 4, 3; the other 5 follow the widths.
    widths = {r["checkpoint_index"]: r["ci_high"] - r["ci_low"] for r in rows}
    assert counts[3] >= 3 and counts[4] >= 2
    assert counts[3] - 3 >= counts[1] and counts[3] - 3 >= counts[5]  # 4/8 has the widest interval
    assert max(widths, key=widths.get) == 3
    assert schedule_value_points(5, [], draws=10) == []
    assert len(schedule_value_points(5, rows)) == len(schedule_resample_points(5, "seed"))


def test_plan_slots_with_the_value_policy_and_its_seed_fallback():
    t, _ = plant("s1", curve(6, 4))
    rows = [_value_row(i, s) for i, s in [(3, 6), (4, 1)]]
    cfg = ResampleConfig(policy="value")
    slots = plan_slots(t, cfg, rows, threshold=0.5)
    assert {s.checkpoint_index for s in slots} == {3, 4}
    assert sum(s.draws for s in slots) == len(schedule_resample_points(6, "seed"))
    assert all(s.direction == "w2r" and s.checkpoint_char == t["checkpoint_chars"][s.checkpoint_index - 1]
               for s in slots)  # fmt: skip
    seed = plan_slots(t, ResampleConfig(policy="seed"))
    assert plan_slots(t, cfg) == seed == plan_slots(t, cfg, [])  # no values: the seed schedule


def test_compare_schedules_expected_yield_from_the_same_rollouts():
    t, _ = plant("s1", curve(3, 2))
    rows = [_value_row(1, 8, tokens=80), _value_row(2, 2, tokens=160), _value_row(3, 0, tokens=40)]
    out = compare_schedules([t], rows, ResampleConfig(), threshold=0.5)
    # seed on 3 checkpoints: [1, 1, 1, 2, 2, 3]; w2r hit rates 1, 0.25, 0; tokens per draw 10, 20, 5.
    assert out["trajectories"] == 1 and out["skipped"] == 0
    assert out["seed"] == {"draws": 6, "expected_pairs": 3.5, "expected_tokens": 75.0,
                           "pairs_per_1k_tokens": round(3500 / 75, 4)}  # fmt: skip
    assert out["value"]["draws"] == 6
    # binary-like data (checkpoint 3 never probed): the seed schedule cannot be priced, so the trajectory is skipped
    assert compare_schedules([t], rows[:2], ResampleConfig())["skipped"] == 1
    assert rows_by_sample(rows) == {"s1": rows}


# --- config, schemas, summary, report ------------------------------------------------------------------------------


def test_values_config_is_validated_and_part_of_the_recipe():
    with pytest.raises(ValueError, match="max_rollouts_per_trajectory"):
        ValuesConfig(rollouts=8, max_rollouts_per_trajectory=4)
    with pytest.raises(ValueError, match="rollouts"):
        ValuesConfig(temperature=0)
    with pytest.raises(ValueError):
        ValuesConfig(search="ternary")
    recipe = Recipe.from_dict({"stages": ["generate", "verify", "checkpoints", "values"], "values": {"rollouts": 4}})
    assert recipe.values.rollouts == 4 and recipe.values.search == "binary" and recipe.values.threshold == 0.5
    with pytest.raises(ConfigError, match="values.rolouts"):
        Recipe.from_dict({"values": {"rolouts": 4}})


def test_rows_fit_their_schemas_and_the_summary_counts_them():
    planted = [plant("s1", curve(8, 3)), plant("s2", curve(16, None), status="correct"), plant("s3", curve(68, 50))]
    res = run(planted)
    make_table(res.values, VALUES)
    make_table(res.trajectories, VALUE_TRAJECTORIES)
    stats = summarize_values(res.values, res.trajectories, res.pairs, res.stats)
    assert stats["trajectories"] == 3 and stats["critical_found"] == 2
    assert stats["rollouts_used"] == sum(r["rollouts_used"] for r in res.trajectories) == stats["rollouts"]
    assert stats["exhaustive_rollouts"] == (8 + 16 + 68) * ROLLOUTS
    probed = sum(r["probed"] for r in res.trajectories)
    assert stats["probed"] == probed == len(res.values) and stats["probed_share"] == round(probed / 92, 4)
    assert stats["critical_relative_position"]["max"] == 50 / 68
    assert stats["critical_pairs"] == 2 and stats["search"] == {"binary": 3}
    json.dumps(stats)
    line = values_headline(stats)
    assert "3 trajectories (binary)" in line and "2 critical points" in line
    assert f"{probed / 92:.0%} of exhaustive" in line
    assert "\n" not in line
    assert values_headline({}).startswith("0 trajectories")


def test_report_section_draws_value_curves_and_keeps_every_point_inside_its_axes():
    from ckptdpo.report.values import section_values

    planted = [plant(f"s{i}", curve(n, c)) for i, (n, c) in enumerate([(8, 3), (12, 1), (5, None), (30, 20)])]
    res = run(planted, search="exhaustive")
    html = section_values(res.values, res.trajectories, res.pairs, stats=None)
    assert html.count("<img") >= 1
    figures = [json.loads(m) for m in re.findall(r'class="figure-data">(.*?)</script>', html)]
    assert figures
    for fig in figures:
        for ax in fig["axes"]:
            (x0, x1), (y0, y1) = sorted(ax["xlim"]), sorted(ax["ylim"])
            for x, y in ax["points"]:
                assert x0 <= x <= x1 and y0 <= y <= y1, ax["title"]
    assert "critical" in html and "exhaustive" in html
    assert "not run" in section_values(None, None, None)

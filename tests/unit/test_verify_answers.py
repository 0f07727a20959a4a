"""Pure string work of the verifier: final-answer extraction, cut-off detection, normalisation, complexity budget."""

from __future__ import annotations

import glob
import json
import time

import pytest

from ckptdpo.verify import extract_answer, extract_final_answer, is_cut_off, normalize_answer
from ckptdpo.verify.budget import over_budget

DATA_FILES = sorted(glob.glob("/work/shared/data/*.jsonl"))


def all_golds() -> list[str]:
    """Every gold answer of the math files in the shared data folder (files without `answer` hold other kinds)."""
    golds = []
    for path in DATA_FILES:
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if isinstance(row.get("answer"), str) and "problem" in row:
                    golds.append(row["answer"])
    return golds


# --- boxes ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("first \\boxed{1}, then\n\nWait, no: \\boxed{2}", "2"),  # the last box wins
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # nested braces
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not close the box
        ("\\boxed{\\left\\{ x \\right\\}}", "\\left\\{ x \\right\\}"),
        ("the answer is $\\boxed 7$", "7"),
        ("\\boxed {8}", "8"),
        ("\\fbox{9}", "9"),
        ("\\boxed{a} then \\fbox{b}", "b"),
        ("\\fbox{a} then \\boxed{b}", "b"),
        ("\\boxed{\\boxed{5}}", "5"),
        ("<think>try \\boxed{3}</think>\n\nSo the answer is \\boxed{4}.", "4"),
        # A box inside the reasoning is a step, not the answer: only the part after </think> counts.
        ("<think>it is \\boxed{3}.</think>\n\nThe answer is three.", None),
        ("<think>\\boxed{1}</think> \\boxed{2} </think> \\boxed{6}", "6"),  # the last </think> counts
        ("I must use \\boxed{} at the end: \\boxed{12} \\boxed{}", "12"),  # empty boxes are skipped
        ("\\boxed{3}. Wait, so \\boxed{12", "3"),  # an unclosed (truncated) box is skipped
        ("\\boxedsymbol{3}", None),  # another command
        ("no box here, the answer is 5", None),
        ("", None),
    ],
)
def test_extract_answer(completion: str, expected: str | None) -> None:
    assert extract_answer(completion) == expected


def test_extract_answer_not_a_string() -> None:
    assert extract_answer(None) is None  # type: ignore[arg-type]
    assert extract_answer(123) is None  # type: ignore[arg-type]


def test_extract_answer_megabyte_completions_are_fast() -> None:
    reasoning = "Let me compute the area again.\n\nWait, that is not right. " * 100_000  # ~5.6 MB
    spam = "\\boxed{" + "{" * 40_000
    cases = [
        (reasoning + "\\boxed{17}", "17", "17"),
        # The only box at the start: one backwards scan, not quadratic. Megabytes of "Wait, ..." after it: that box
        # was a step the model went on to doubt until it was cut off, so there is no final answer.
        ("\\boxed{17}" + reasoning, "17", None),
        (reasoning + "</think>" + reasoning, None, None),
        ("\\boxed{17}" + spam * 100, None, None),  # unclosed brace spam: the scan budget gives up
    ]
    for text, expected, final_expected in cases:
        t0 = time.perf_counter()
        got = extract_answer(text)
        final = extract_final_answer(text)
        elapsed = time.perf_counter() - t0
        assert got == expected and final.text == final_expected
        assert elapsed < 0.5, f"extraction took {elapsed:.2f} s on {len(text):,} characters"


# --- final statements and cut-off completions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, text, source",
    [
        # The reported case: the old fallback took the 4 of "4 + 4".
        ('We add them. The answer to the question "4 + 4" is indeed 8.', "8", "statement"),
        ("so the final answer is 12.", "12", "statement"),
        ("the answer: 4", "4", "statement"),
        ("Answer: (B)", "(B)", "statement"),
        ("**Final Answer:** $\\frac{1}{2}$", "\\frac{1}{2}", "statement"),
        ("Final Answer: The final answer is $42$. I hope it is correct.", "42", "statement"),
        ("The answer is 5, but wait: the final answer is 7.", "7", "statement"),  # the last statement wins
        ("**Final Answer**\n\n$1,450,000$", "1,450,000", "statement"),  # a last line that is just the value
        ("Therefore:\n\n\\[ x = 3 \\]", "x = 3", "statement"),
        ("<think>maybe 3</think>\n\nThe answer is 4.", "4", "statement"),
        ("<think>the answer is 3</think>\n\nI could not finish.", None, "none"),
        # Not final statements: a number in a sentence, prose after "answer is", a negation, a claim mid-text.
        ("So we get 5 + 3 = 8 and we are done with this part.", None, "none"),
        ("The answer is that we need to consider both cases.", None, "none"),
        ("The answer is not 5.", None, "none"),
        ("I think the answer is 5.\n\nLet me double-check the second case more carefully.", None, "none"),
        ("We get x = 3.\n\n2 apples and 3 pears", None, "none"),
        ("I do not know how to solve this.", None, "none"),
        ("", None, "none"),
    ],
)
def test_final_statement(completion: str, text: str | None, source: str) -> None:
    assert extract_final_answer(completion) == extract_final_answer(completion, "boxed_or_final_statement")
    got = extract_final_answer(completion)
    assert (got.text, got.source, got.cut_off) == (text, source, False)
    strict = extract_final_answer(completion, "boxed")
    assert (strict.text, strict.source) == (None, "none")


def test_box_beats_statement() -> None:
    got = extract_final_answer("\\boxed{3}\n\nThe answer is 4.")
    assert (got.text, got.source) == ("3", "box")


@pytest.mark.parametrize(
    "completion, finish_reason",
    [
        ("<think>so it is \\boxed{5}. Wait, let me recheck the", None),  # a <think> that never closes
        ("<think>a</think> b <think> so \\boxed{5}", None),  # the last one counts
        ("The answer is \\boxed{5}. Let me double-check by substituting", "length"),
        ("\\boxed{5}", "max_tokens"),
        ("</think>\\boxed{5}", "LENGTH"),
        # No finish reason known: the text stops inside a box, or runs on for pages after it, mid-sentence.
        ("so the answer is \\boxed{12", None),
        ("\\boxed{3}. " + "Wait, let me check that again. " * 200 + "So the area of the triangle is", None),
    ],
)
def test_cut_off_completions_have_no_answer(completion: str, finish_reason: str | None) -> None:
    assert is_cut_off(completion, finish_reason)
    for answer_format in ("boxed", "boxed_or_final_statement"):
        got = extract_final_answer(completion, answer_format, finish_reason)
        assert (got.text, got.source, got.cut_off) == (None, "none", True)


def test_finished_completions_are_not_cut_off() -> None:
    assert not is_cut_off("<think>a</think>\\boxed{5}", "stop")
    assert not is_cut_off("\\boxed{5}", None)
    assert not is_cut_off("no think tags at all", "eos")
    ran_on = "\\boxed{3}. " + "Wait, let me check that again. " * 200
    assert not is_cut_off(ran_on, None)  # ends at a sentence's end, without new paragraphs of doubt
    assert is_cut_off(ran_on + "\n\nWait, no.\n\nHmm, maybe.\n\nWait, so it is 4.", None)
    assert not is_cut_off(ran_on + "So the area is", "stop")  # a known finish reason is believed
    assert not is_cut_off("so the answer is \\boxed{12", "stop")


def test_bad_answer_format() -> None:
    with pytest.raises(ValueError, match="answer_format"):
        extract_final_answer("\\boxed{1}", "loose")


# --- normalisation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("\\$18.90", "18.90"),
        ("\\$1,\\!657", "1,657"),
        ("\\$23{,}000", "23,000"),
        ("1\\,000", "1000"),
        ("30^\\circ", "30"),
        ("30^{\\circ}", "30"),
        ("45°", "45"),
        ("25 percent", "25\\%"),
        ("25%", "25\\%"),
        ("\\dfrac{3}{4}", "\\frac{3}{4}"),
        ("\\tfrac12", "\\frac12"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "( 3, \\frac{\\pi}{2} )"),
        ("5\\text{ cm}", "5"),
        ("4 square units", "4"),
        ("12 dollars.", "12"),
        ("$\\frac{1}{2}$", "\\frac{1}{2}"),
        ("\\text{Monday}", "\\text{Monday}"),  # a text answer keeps its text
        ("x = 3", "x = 3"),
        ("(1,234)", "(1,234)"),  # a tuple keeps its comma
        ("4m", "4m"),  # a lone letter after a number may be a variable: kept
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "a, b", [("18", "180"), ("1,000", "1,001"), ("30^\\circ", "60^\\circ"), ("\\frac{3}{4}", "\\dfrac{4}{3}")]
)
def test_normalize_keeps_different_values_different(a: str, b: str) -> None:
    assert normalize_answer(a) != normalize_answer(b)


# --- complexity budget ----------------------------------------------------------------------------------------------

OVER_BUDGET = {
    "exponent tower": "9^{9^{9^{9^{9}}}}",
    "symbolic exponent tower": "e^{e^{e^{e^{e}}}}",
    "unbraced tower": "9^9^9",
    "huge power": "10^{10^{10}}",
    "huge negative power": "5^{-10^{9}}",
    "symbolic huge power": "(x+1)^{10^{7}}",
    "python power tower": "3**3**3**3",
    "huge factorial": "100000!",
    "factorial of a power": "(10^{6})!",
    "10,000 parentheses": "(" * 10_000 + "1" + ")" * 10_000,
    "50 nested parentheses": "(" * 50 + "1" + ")" * 50,
    "frac nested 3,000 deep": "\\frac{" * 3_000 + "1" + "}{2}" * 3_000,
    "frac nested 45 deep, short": "\\frac{1}{" * 45 + "2" + "}" * 45,
    "sqrt nested 2,000 deep": "\\sqrt{" * 2_000 + "2" + "}" * 2_000,
    "megabyte answer": "x+" * 500_000 + "1",
    "long literal": "1" * 5_000,
}


@pytest.mark.parametrize("name", list(OVER_BUDGET))
def test_over_budget(name: str) -> None:
    t0 = time.perf_counter()
    assert over_budget(OVER_BUDGET[name]) is not None
    assert time.perf_counter() - t0 < 0.1


@pytest.mark.parametrize(
    "answer",
    ["2^{2^{2^{2}}}", "2^{100}", "3^{2016}", "10!", "2023!", "\\frac{\\sqrt{3}}{2}", "10^{10}", "x^{100}", "(1, 2)"],
)
def test_within_budget(answer: str) -> None:
    assert over_budget(answer) is None


@pytest.mark.skipif(not DATA_FILES, reason="no shared data folder")
def test_no_gold_answer_is_over_budget() -> None:
    golds = all_golds()
    assert len(golds) == 10_207
    assert [g for g in golds if over_budget(normalize_answer(g)) is not None] == []

"""Multiple-choice extraction and verification."""

from __future__ import annotations

import pytest

from ckptdpo.verify import STATUSES
from ckptdpo.verify.choice import extract_choice, verify_choice_batch


@pytest.mark.parametrize(
    "reply",
    [
        "So the answer must be \\boxed{C}.",
        "\\boxed{(C)}",
        "\\boxed{\\text{C}}",
        "\\boxed{C. Planetary days will become shorter.}",
        "Answer: C",
        "**Answer:** C",
        "The answer is (C).",
        "C.",
        "C",
        "(C)",
        "Planetary days get shorter, so:\n\nC. Planetary days will become shorter.",
        "<think>Maybe \\boxed{A}? No.</think>\nThe answer is \\boxed{C}",
        "Answer: B\n\nWait, that is wrong. Answer: C",
    ],
)
def test_extracts_the_letter(reply):
    assert extract_choice(reply, "ABCD") == "C"


@pytest.mark.parametrize(
    "reply",
    [
        "\\boxed{A or C}",
        "\\boxed{B, D}",
        "Answer: B, D",
        "Answer: A and C",
        "It is (A) or maybe (C).",
        "A. first\nB. second",
        "\\boxed{42}",
        "I cannot tell.",
        "",
        "\\boxed{E}",  # not one of the four choices
    ],
)
def test_refuses_ambiguous_or_missing_letters(reply):
    assert extract_choice(reply, "ABCD") is None


def test_verdicts_use_the_five_statuses():
    items = [("C", "\\boxed{C}"), ("C", "\\boxed{B}"), ("C", "\\boxed{A or C}"), ("C", ""), ("CD", "\\boxed{C}")]
    verdicts = verify_choice_batch(items, "ABCD")
    assert [v.status for v in verdicts] == ["correct", "incorrect", "no_answer", "no_answer", "error"]
    assert [v.is_correct for v in verdicts] == [True, False, None, None, None]
    assert verdicts[1].extracted == "B"
    assert {v.status for v in verdicts} <= set(STATUSES)

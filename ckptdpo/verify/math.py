"""The math check itself: math-verify on two normalised answers. Runs only inside pool workers (see `pool`)."""

from __future__ import annotations

import logging
from functools import lru_cache

# Answers covering the main kinds of math answer (numbers, radicals, tuples, intervals, sets, text, polynomials,
# equations, percent, matrices). Parsing them builds ANTLR's lazily grown DFA and sympy's caches;
# a cold process is several times slower on its first hundred distinct answers.
WARM_UP = [
    ("\\frac{1}{2}", "0.5"),
    ("1,450,000", "1450000.0"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("(1, 2)", "(1,2)"),
    ("(-\\infty, 2] \\cup [3, 4]", "(-\\infty,2]\\cup[3,4]"),
    ("\\{1,2,3\\}", "\\{3,2,1\\}"),
    ("\\text{Monday}", "Monday"),
    ("x^2+2x+1", "(x+1)^2"),
    ("x=5", "5"),
    ("10\\%", "0.1"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
]


def _quiet() -> None:
    # The pool enforces time limits, so math-verify's "timeout is disabled" warning is noise here.
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)


@lru_cache(maxsize=4096)
def _parse_answer(answer: str) -> list:
    from math_verify import parse

    # Boxing a bare answer tells math-verify where it is and makes it try the box extraction first.
    return parse("\\boxed{" + answer + "}", parsing_timeout=None)


def check_math(gold: str, answer: str) -> tuple[str, bool | None]:
    """(status, is_correct) for two normalised answers: correct, incorrect, or error when the gold does not parse."""
    from math_verify import verify

    gold_parsed = _parse_answer(gold)
    if not gold_parsed:
        return "error", None
    pred = _parse_answer(answer)
    ok = bool(pred) and bool(verify(gold_parsed, pred, timeout_seconds=None))
    return ("correct" if ok else "incorrect"), ok


def warm_up() -> None:
    """Import math-verify and exercise it once (the pool's fork server calls this, so every worker starts warm)."""
    _quiet()
    for gold, answer in WARM_UP:
        check_math(gold, answer)

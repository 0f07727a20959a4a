"""A cheap, conservative complexity budget checked before math-verify sees an answer.

Adversarial answers (exponent towers, huge factorials, thousands of nested groups, megabyte boxes) make sympy run for
minutes or exhaust memory; in the pool each would hold a worker for its whole timeout. These checks, linear in the
answer's length, end such an answer at once as `timeout`. The limits sit far above anything a real answer needs:
no gold answer of MATH, DeepScaleR, GSM8K, AIME or AMC comes near any of them (the identity test checks this).
"""

from __future__ import annotations

import math
import re

MAX_ANSWER_CHARS = 4_000
MAX_NESTING = 40  # braces, parentheses and brackets together
MAX_COMMANDS = 200  # \frac, \sqrt, \binom and the like in one answer
MAX_LITERAL_DIGITS = 1_000
MAX_POWER_DIGITS = 100_000  # digits of a numeric power (2^{65536} has 19,729; 10^{10^{10}} has 10^{10})
MAX_SYMBOLIC_EXPONENT_LOG10 = 6  # an exponent over a million, whatever the base
MAX_FACTORIAL_ARG = 10_000
MAX_CARETS = 200
MAX_TOWER = 3  # exponents inside exponents: 2^{2^{2^{2}}} (3) is as tall as a real answer gets

_NESTING_TOKENS = re.compile(r"\\.|[{}()\[\]]", re.S)
_HEAVY_COMMANDS = re.compile(r"\\(?:[dt]?frac|sqrt|binom|[dt]binom|root|sum|prod|int|lim)(?![a-zA-Z])")
_DIGITS = re.compile(rf"\d{{{MAX_LITERAL_DIGITS + 1},}}")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_UNBRACED_CHAIN = re.compile(r"\d+(?:\.\d+)?(?:\s*\^\s*(?:\d+|\{[^{}]*\}))*")
_CLOSE_TO_OPEN = {"}": "{", ")": "(", "]": "["}


def _max_nesting(text: str) -> int:
    depth = best = 0
    for tok in _NESTING_TOKENS.finditer(text):
        t = tok.group()
        if t in "{([":
            depth += 1
            best = max(best, depth)
        elif t in "})]":
            depth = max(0, depth - 1)
    return best


def _group_before(text: str, end: int) -> int:
    """Start of the balanced group that closes at `text[end]` (scanning backwards), or -1."""
    opener, closer, depth = _CLOSE_TO_OPEN[text[end]], text[end], 0
    for i in range(end, -1, -1):
        if text[i] == closer:
            depth += 1
        elif text[i] == opener:
            depth -= 1
            if depth == 0:
                return i
    return -1


def _group_after(text: str, start: int) -> int:
    """Index just past the balanced `{...}` / `(...)` group opening at `text[start]`, or -1."""
    opener = text[start]
    closer = "}" if opener == "{" else ")"
    depth = 0
    for i in range(start, len(text)):
        if text[i] == opener:
            depth += 1
        elif text[i] == closer:
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


def _log10_value(expr: str) -> float | None:
    """log10 of the value of a small numeric expression (`12`, `9^{9}`, `(10^6)`, `20!`), or None when unknown."""
    expr = expr.strip()
    while len(expr) >= 2 and expr[0] in "{(" and _group_after(expr, 0) == len(expr):
        expr = expr[1:-1].strip()
    if expr[:1] in "-+":  # the size of a power does not depend on signs: 5^{-10^9} is as bad as 5^{10^9}
        return _log10_value(expr[1:])
    if _NUMBER.fullmatch(expr):
        v = float(expr)
        return math.log10(v) if v > 0 else None
    if expr.endswith("!"):
        arg = _log10_value(expr[:-1])
        if arg is None:
            return None
        if arg > 6:
            return math.inf
        n = 10**arg
        return (math.lgamma(n + 1) / math.log(10)) if n > 1 else 0.0
    caret = _top_level_caret(expr)
    if caret is None:
        return None
    base, exponent = _log10_value(expr[:caret]), _log10_value(expr[caret + 1 :])
    if base is None or exponent is None:
        return None
    return math.inf if exponent > 300 else base * 10**exponent


def _top_level_caret(expr: str) -> int | None:
    depth = 0
    for i, ch in enumerate(expr):
        if ch in "{([":
            depth += 1
        elif ch in "})]":
            depth -= 1
        elif ch == "^" and depth == 0:
            return i
    return None


def _operand_after(text: str, pos: int) -> str:
    """The exponent that follows a `^` ending at `pos`: a `{...}` group, a number, or one character."""
    while pos < len(text) and text[pos] == " ":
        pos += 1
    if pos < len(text) and text[pos] in "{(":
        end = _group_after(text, pos)
        return text[pos:end] if end > 0 else text[pos:]
    m = _UNBRACED_CHAIN.match(text, pos)  # `9^9^9` reads as a tower
    return m.group() if m else text[pos : pos + 1]


def _operand_before(text: str, end: int) -> str:
    """The base or factorial argument that ends just before `end`: a group, a number, or one character."""
    i = end - 1
    while i >= 0 and text[i] == " ":
        i -= 1
    if i < 0:
        return ""
    if text[i] in "})]":
        start = _group_before(text, i)
        return text[start : i + 1] if start >= 0 else ""
    j = i
    while j >= 0 and (text[j].isdigit() or text[j] == "."):
        j -= 1
    return text[j + 1 : i + 1] if j < i else text[i]


def _tower_height(text: str) -> int:
    """How many exponents sit inside one another (`a^{b^{c}}` is 2), counting braced and unbraced chains."""
    best = 0
    stack = [0]  # per open group: the tower height reached at the group's start
    level = 0  # height of the tower the current position is in
    pending = False  # a `^` was just read: the next group or token is an exponent
    for ch in text:
        if ch == "^":
            pending = True
            continue
        if ch == "{":
            stack.append(level)
            if pending:
                level += 1
                best = max(best, level)
        elif ch == "}":
            level = stack.pop() if len(stack) > 1 else 0
        elif pending and not ch.isspace():
            # An unbraced exponent (`9^9^9`): the chain continues at the same depth.
            level += 1
            best = max(best, level)
        elif ch.isspace() or ch.isdigit() or ch.isalpha():
            pass
        else:
            level = stack[-1]
        if not ch.isspace():
            pending = False
    return best


def _power_too_big(log_base: float | None, log_exponent: float) -> bool:
    if log_exponent > MAX_SYMBOLIC_EXPONENT_LOG10:  # even x^{10^{7}} makes sympy expand and compare for ages
        return True
    return log_base is not None and log_base * 10**log_exponent > MAX_POWER_DIGITS


def _huge_power_or_factorial(text: str) -> str | None:
    for i, ch in enumerate(text):
        if ch == "^":
            base = _log10_value(_operand_before(text, i))
            exponent = _log10_value(_operand_after(text, i + 1))
            if exponent is not None and _power_too_big(base, exponent):
                return "a power with too many digits"
        elif ch == "!" and text[i + 1 : i + 2] != "=" and text[i - 1 : i] != "\\":
            arg = _log10_value(_operand_before(text, i))
            if arg is not None and arg > math.log10(MAX_FACTORIAL_ARG):
                return "a factorial of a huge number"
    return None


def over_budget(text: str) -> str | None:
    """Why `text` is too complex to hand to math-verify (a short phrase), or None when it is within the budget."""
    if len(text) > MAX_ANSWER_CHARS:
        return f"longer than {MAX_ANSWER_CHARS:,} characters"
    if _max_nesting(text) > MAX_NESTING:
        return f"nested deeper than {MAX_NESTING}"
    if len(_HEAVY_COMMANDS.findall(text)) > MAX_COMMANDS:
        return f"more than {MAX_COMMANDS} heavy commands"
    if _DIGITS.search(text):
        return f"a literal of more than {MAX_LITERAL_DIGITS:,} digits"
    if text.count("^") > MAX_CARETS:
        return f"more than {MAX_CARETS} exponents"
    if _tower_height(text) > MAX_TOWER:
        return f"an exponent tower taller than {MAX_TOWER}"
    return _huge_power_or_factorial(text.replace("**", "^"))

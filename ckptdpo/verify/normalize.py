"""Gold and prediction normalisation, applied to both sides the same way before math-verify sees them.

math-verify already understands most notation (`\\frac12`, `1,450,000`, `\\text{Monday}`, `x = 5`, `50\\%`); these
rules fix what it does not: currency signs (a gold of `\\$18.90` never matched even itself), LaTeX spacing inside
numbers (`1,\\!657`, `23{,}000`, `1\\,000`), `\\dfrac`/`\\tfrac`, `\\left`/`\\right`, degree marks, trailing unit
words and `\\text{ units}` after a number, and `percent` spelled out. Every rule removes notation and never changes a
digit, an operator or the order of terms, so two answers that differ in value still differ afterwards.
"""

from __future__ import annotations

import re

# Outer math delimiters a model sometimes puts inside a box: `\boxed{$5$}`, `\boxed{\(5\)}`.
_DELIMITED = re.compile(r"^\s*(?:\$\$?(?P<a>.*?)\$\$?|\\\((?P<b>.*?)\\\)|\\\[(?P<c>.*?)\\\])\s*$", re.S)
_CURRENCY = re.compile(r"\\\$|\$|\\textdollar\b|\\euro\b|€|£|\\pounds\b|US\\?\s*\$")
# `\!` (negative thin space) and `{,}` are how MATH writes thousands separators: `1,\!657`, `23{,}000`.
_NEG_SPACE = re.compile(r"\\!")
_BRACED_COMMA = re.compile(r"\{,\}")
# Thin spaces between digit groups are thousands separators too: `1\,000`, `1\;000`, `1~000`.
_SPACED_THOUSANDS = re.compile(r"(?<=\d)(?:\\[,;:]|~|\\ )(?=\d{3}(?!\d))")
_FRAC_VARIANTS = re.compile(r"\\[dt]frac(?![a-zA-Z])")
_LEFT_RIGHT = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![a-zA-Z])\s*(?:\.(?!\d))?")
_DISPLAY = re.compile(r"\\(?:displaystyle|textstyle|scriptstyle)(?![a-zA-Z])\s*")
# Degree marks: `30^\circ`, `30^{\circ}`, `30°`, `30 \degree`; angle answers are compared as bare numbers.
_DEGREES = re.compile(r"\s*(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])|°|\\degree(?![a-zA-Z]))")
_PERCENT_WORD = re.compile(r"(?<=\d)\s*(?:percent|per\s*cent)\b\.?", re.I)
_BARE_PERCENT = re.compile(r"(?<!\\)%")
# A `\text{...}`, `\mbox{...}` or `\mathrm{...}` of letters after a number is a unit: `5\text{ cm}`, `3\mbox{ hours}`.
_TEXT_UNIT = re.compile(
    r"(?<=[\d}.)])\s*\\(?:text|mbox|textrm|mathrm|textnormal|operatorname)\s*\{\s*[A-Za-z][A-Za-z .\-/^²³]*\}\s*$"
)
# Plain unit words after a number at the end of an answer: `18 cm`, `5 dollars`, `4 square units`.
_UNIT_WORDS = (
    "square|sq|cubic|units?|dollars?|cents?|degrees?|deg|inches|inch|feet|foot|ft|yards?|yd|miles?|mph|"
    "meters?|metres?|cm|mm|km|kg|grams?|kilograms?|pounds?|lbs?|ounces?|oz|seconds?|secs?|minutes?|mins?|"
    "hours?|hrs?|days?|weeks?|months?|years?|liters?|litres?|ml|gallons?|cups?|people|persons?|students?|ways|"
    "points?|marbles?|apples?|books?|pieces?|times|percent"
)
_TRAILING_UNITS = re.compile(r"(?<=[\d}])\s*(?:(?:" + _UNIT_WORDS + r")(?:\^?\{?[23]\}?|[²³])?\.?\s*)+$")
_SPACES = re.compile(r"\s+")
UNIT_TAIL_CHARS = 120


def _unwrap_delimiters(text: str) -> str:
    for _ in range(3):  # `$\(5\)$` and the like
        m = _DELIMITED.match(text)
        if m is None:
            break
        text = next(g for g in m.groups() if g is not None)
    return text


def normalize_answer(text: str) -> str:
    """The answer with notation that does not change its value removed; see the module docstring for the rules."""
    text = _unwrap_delimiters(text.strip())
    text = _CURRENCY.sub("", text)
    text = _NEG_SPACE.sub("", text)
    text = _BRACED_COMMA.sub(",", text)
    text = _SPACED_THOUSANDS.sub("", text)
    text = _FRAC_VARIANTS.sub(r"\\frac", text)
    text = _LEFT_RIGHT.sub("", text)
    text = _DISPLAY.sub("", text)
    text = _DEGREES.sub("", text)
    text = _PERCENT_WORD.sub(r"\\%", text)
    text = _BARE_PERCENT.sub(r"\\%", text)
    # Units sit at the end; matching only there keeps these two patterns linear on long answers.
    head, tail = text[:-UNIT_TAIL_CHARS], text[-UNIT_TAIL_CHARS:]
    tail = _TRAILING_UNITS.sub("", _TEXT_UNIT.sub("", tail))
    text = _SPACES.sub(" ", head + tail).strip()
    return text.rstrip(" .;,")

"""Multiple-choice verification: extract the answer letter, compare it with the gold letter.

The letter comes from the answer part (after the last `</think>`, the whole text without one), strongest form first:
the last `\\boxed{C}` (also `\\boxed{(C)}`, `\\boxed{\\text{C}}`, `\\boxed{C. text}`), else the last `Answer: C` /
`the answer is (C)`, else in the last paragraph a lone `(C)` or a line starting `C.` / `C)`, or a reply that is just
the letter. A reply naming several letters at once (`\\boxed{A or C}`, `Answer: B, D`) or, for the weak forms, more
than one distinct letter, is ambiguous and gets `no_answer`: a guess spread over choices is not an answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_THINK_END = "</think>"

LETTERS = "ABCDEFGHIJ"
_L = f"[{LETTERS}]"
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
_FORMAT = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}|[*$]")
_ANSWER = re.compile(r"(?i:\banswer\b(?:\s+is)?[\s*]*[:：]?[\s*]*(?:option\s+|choice\s+)?)(\(?" + _L + r"\b.*)")
# A letter followed by another letter through a connector: `A or C`, `B, D`, `(A)/(B)`, `A and B`.
_SEVERAL = re.compile(r"^\(?" + _L + r"\)?\s*(?:,|/|&|\bor\b|\band\b)\s*\(?" + _L + r"\b")
_LEADING = re.compile(r"^\(?(" + _L + r")(?:\)|\.|:|\b)")
_PAREN = re.compile(r"\((" + _L + r")\)")
_LINE_START = re.compile(r"^\s*(" + _L + r")[.)]\s", re.M)


def _letter_of(statement: str) -> str | None | bool:
    """The letter a statement starts with; None when it names none; False when it names several at once."""
    text = _FORMAT.sub(lambda m: m.group(1) or "", statement).strip().lstrip("*").strip()
    if _SEVERAL.match(text):
        return False
    m = _LEADING.match(text)
    return m.group(1) if m else None


def _answer_region(completion: str) -> str:
    cut = completion.rfind(_THINK_END)
    return completion[cut + len(_THINK_END) :] if cut >= 0 else completion


def extract_choice(completion: str | None, letters: str = LETTERS) -> str | None:
    """The answer letter of a reply, or None (no letter, or an ambiguous one)."""
    return extract_choice_from(completion, letters)[0]


def extract_choice_from(completion: str | None, letters: str = LETTERS) -> tuple[str | None, str]:
    """The answer letter and where it came from: `box`, `statement` (any other form) or `none`."""
    if not isinstance(completion, str) or not completion.strip():
        return None, "none"
    region = _answer_region(completion)
    for pattern, source in ((_BOX, "box"), (_ANSWER, "statement")):
        matches = list(pattern.finditer(region))
        if matches:
            found = _letter_of(matches[-1].group(1).split("\n", 1)[0])
            return (found, source) if found and found in letters else (None, "none")
    last = region.strip().split("\n\n")[-1]
    if _LEADING.fullmatch(last.strip().rstrip(".")) or last.strip().rstrip(".") in letters:
        bare = last.strip().strip("().")
        return (bare, "statement") if len(bare) == 1 and bare in letters else (None, "none")
    weak = {m.group(1) for m in _PAREN.finditer(last)} | {m.group(1) for m in _LINE_START.finditer(last)}
    weak &= set(letters)
    return (weak.pop(), "statement") if len(weak) == 1 else (None, "none")


def verify_choice_batch(items: Sequence[tuple[str, str]], letters: str = LETTERS) -> list:
    """Verify (gold letter, completion) pairs; same five statuses as `verify_batch` (pure string work, no pool)."""
    from ckptdpo.verify import Verdict  # the package re-exports this module, so import at call time

    out = []
    for item in items:
        try:
            gold_raw, completion = item
        except (TypeError, ValueError):
            out.append(Verdict("error", None, None))
            continue
        gold = str(gold_raw).strip().strip("().").upper() if gold_raw is not None else ""
        if completion is None or (isinstance(completion, str) and not completion.strip()):
            out.append(Verdict("no_answer", None, None))
        elif len(gold) != 1 or gold not in letters or not isinstance(completion, str):
            out.append(Verdict("error", None, None))
        else:
            found, source = extract_choice_from(completion, letters)
            if found is None:
                out.append(Verdict("no_answer", None, None))
            else:
                out.append(Verdict("correct" if found == gold else "incorrect", found == gold, found, source))
    return out

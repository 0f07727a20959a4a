"""Final-answer extraction from a completion: the last box of the answer part, or an explicit final statement.

The answer part is the text after the last `</think>` when there is one (R1-style and Qwen3 thinking models): a box
inside the reasoning is a step, not the answer. A completion cut off before it finished (finish reason `length`, a
`<think>` that never closes, or, with no finish reason known, a text that stops inside a box or reasons on for pages
after its last box) has no final answer at all, whatever boxes its reasoning contains. Without a box, only an
explicit statement at the very end counts ("the answer is X", "final answer: X", "answer: X", a last line that is just
the value); a number picked out of the middle of a sentence would label right answers wrong and wrong ones right.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ANSWER_FORMATS = ("boxed", "boxed_or_final_statement")
EXTRACTED_FROM = ("box", "statement", "none")
# Finish reasons that mean the generation hit its token limit (OpenAI/vLLM/HF "length", others' spellings).
CUT_OFF_REASONS = frozenset(("length", "max_tokens", "max_length", "max_new_tokens"))
# A box whose braces do not close within this many characters is treated as unclosed (truncated output), which also
# bounds the work per candidate box on megabyte completions.
MAX_BOX_CHARS = 50_000
MAX_BOX_CANDIDATES = 64
# Braces nested deeper than this inside a box mark it as adversarial (real answers nest a handful of levels), so the
# brace-by-brace scan stops early and the answer ends as `timeout` without being parsed.
MAX_BOX_DEPTH = 64
DEEP_BOX_SHOWN = 200
# Brace tokens examined per completion over all candidate boxes, so brace spam cannot make extraction slow.
MAX_SCAN_TOKENS = 200_000
# A final statement sits in the last lines; looking further back only invites picking up a mid-solution claim.
STATEMENT_TAIL_CHARS = 600
MAX_STATEMENT_CHARS = 200
# Without a finish reason, a box left open this close to the end means the text was cut inside it, and this much
# text after the last box, ending mid-sentence, means a trajectory that kept reasoning until it was cut off.
UNCLOSED_TAIL_CHARS = 300
RAN_ON_CHARS = 3_000
MIN_RECONSIDERATIONS = 3

THINK_OPEN = "<think>"
THINK_END = "</think>"
_BOX_NAMES = ("\\boxed", "\\fbox")
# An escaped character (`\{`, `\}`, `\\`) never opens or closes a group.
_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.S)
_HSPACE = re.compile(r"[ \t]+")
_RECONSIDER = re.compile(r"\n\s*(?:Wait|Hmm|But wait|Alternatively|Let me (?:re|double)|Hold on)\b")
_BARE_ARG = re.compile(r"[^\s$]+")


@dataclass(frozen=True)
class Extraction:
    """What a completion answers: the answer text (None when there is none), where it came from, and whether the
    completion was cut off (then `text` is None and `source` is "none")."""

    text: str | None
    source: str  # box | statement | none
    cut_off: bool = False

    @property
    def too_deep(self) -> bool:
        """The box is nested too deeply to be a real answer; `text` holds only its start."""
        return isinstance(self.text, DeepBox)


def _box_argument(text: str, pos: int, budget: list[int]) -> str | None:
    """The argument of a box command whose name ends at `pos`: `{...}` with nested braces, or ` token`."""
    m = _HSPACE.match(text, pos)
    spaced = m is not None
    if spaced:
        pos = m.end()
    if pos >= len(text):
        return None
    if text[pos] == "{":
        depth = 0
        for tok in _BRACE_TOKENS.finditer(text, pos, min(len(text), pos + MAX_BOX_CHARS)):
            budget[0] -= 1
            if budget[0] < 0:
                return None
            t = tok.group()
            if t == "{":
                depth += 1
                if depth > MAX_BOX_DEPTH:
                    return _deep_box(text, pos)
            elif t == "}":
                depth -= 1
                if depth == 0:
                    return text[pos + 1 : tok.start()].strip() or None
        return None  # unclosed: a truncated answer
    if spaced:  # `\boxed 42`
        m = _BARE_ARG.match(text, pos)
        return m.group() if m else None
    return None  # `\boxedfoo` is another command


class DeepBox(str):
    """The start of a box nested too deeply to be a real answer (`\\frac` 3,000 deep): no checker should see it."""


def _deep_box(text: str, pos: int) -> str | None:
    """A DeepBox when the box opening at `pos` closes somewhere (braces after it balance), else None (truncated)."""
    rest = text[pos : pos + MAX_BOX_CHARS]
    # Counting is done in C; escaped braces are few enough in such text not to matter.
    opened = rest.count("{") - rest.count("\\{")
    closed = rest.count("}") - rest.count("\\}")
    return DeepBox(text[pos + 1 : pos + 1 + DEEP_BOX_SHOWN] + "...") if closed >= opened else None


def _last_box(text: str, start: int) -> str | None:
    """Content of the last non-empty, closed box in `text[start:]`, scanning backwards from the end."""
    # One pointer per command name, each moved backwards only, so the whole scan is linear in the text.
    ends = [len(text), len(text)]
    found = [text.rfind(name, start, ends[k]) for k, name in enumerate(_BOX_NAMES)]
    budget = [MAX_SCAN_TOKENS]
    for _ in range(MAX_BOX_CANDIDATES):
        k = 0 if found[0] >= found[1] else 1
        i = found[k]
        if i < 0:
            return None
        content = _box_argument(text, i + len(_BOX_NAMES[k]), budget)
        if content is not None:
            # `\boxed{\boxed{5}}`: the innermost box is the answer.
            inner = _last_box(content, 0) if "\\boxed" in content or "\\fbox" in content else None
            return inner if inner is not None else content
        ends[k] = i
        found[k] = text.rfind(_BOX_NAMES[k], start, ends[k])
    return None


def answer_start(completion: str) -> int:
    """Where the answer part begins: after the last `</think>`, or 0 when the completion has none."""
    cut = completion.rfind(THINK_END)
    return cut + len(THINK_END) if cut >= 0 else 0


def _looks_truncated(completion: str) -> bool:
    """Without a finish reason: the text stops inside a box, or runs on for pages after its last box and stops
    mid-sentence (a looping trajectory that hit its token limit, its last box a step it went on to doubt)."""
    start = answer_start(completion)
    last = max(completion.rfind(name, start) for name in _BOX_NAMES)
    if last < 0:
        return False
    tail = completion[last:].rstrip()
    if len(tail) <= UNCLOSED_TAIL_CHARS and _last_box(tail, 0) is None and "{" in tail:
        return True  # `... so the answer is \boxed{12` and nothing more
    if len(tail) <= RAN_ON_CHARS or extract_statement(tail) is not None:
        return False
    # Still reasoning after its last box: it stops mid-sentence, or keeps reconsidering ("\n\nWait, ...").
    return tail[-1].isalnum() or tail[-1] in ",-(" or len(_RECONSIDER.findall(tail)) >= MIN_RECONSIDERATIONS


def is_cut_off(completion: str, finish_reason: str | None = None) -> bool:
    """True when generation stopped at its token limit: finish reason `length`, a `<think>` block that never
    closed, or, when no finish reason is known, a text that visibly stops mid-answer (see `_looks_truncated`)."""
    known = isinstance(finish_reason, str) and bool(finish_reason.strip())
    if known and finish_reason.strip().lower() in CUT_OFF_REASONS:
        return True
    opened = completion.rfind(THINK_OPEN)
    if opened >= 0 and completion.find(THINK_END, opened) < 0:
        return True
    return not known and _looks_truncated(completion)


def extract_answer(completion: str) -> str | None:
    """The last `\\boxed{...}` (or `\\fbox{...}`, `\\boxed x`) of the answer part (after the last `</think>`)."""
    if not isinstance(completion, str) or not completion:
        return None
    return _last_box(completion, answer_start(completion))


# --- final statements ---------------------------------------------------------------------------------------------

# Minerva-style sign-offs and closing pleasantries that may follow the statement.
_SIGN_OFF = re.compile(
    r"(?:\s*(?:I hope (?:it|this) is correct|Hope (?:this|that) helps|Let me know[^.\n]*)[.!]?)+\s*$", re.I
)
_DECORATION = re.compile(r"^[\s*_#>]+|[\s*_]+$")
_ANSWER_WORD = re.compile(r"\banswer\b", re.I)
# What may follow the word "answer" in a statement: an optional "to the question ...", then ":", "=" or "is".
_STATEMENT_REST = re.compile(
    r"(?:\s+(?:to|for|of)\s+[^\n]{1,120}?)?\s*[*_]*\s*(?::|=|is\s*:?|would\s+be|will\s+be|should\s+be)\s*[*_]*\s*"
    r"(?:(?:indeed|therefore|thus|then|simply|just|clearly|exactly|equal\s+to)\s+)?(?P<value>[^\n]+?)\s*$",
    re.I,
)
_NEGATED = re.compile(r"^(?:not|no|never|unknown|undefined|unclear)\b", re.I)
# What a bare value line may contain: digits, letters of a short name, LaTeX and math punctuation.
_VALUE_LINE = re.compile(r"^[\w\s$\\{}()\[\]^_+\-*/=<>.,:;|!%'°√π∞·×÷−]+$")
_WORD = re.compile(r"(?<![\\a-zA-Z])[A-Za-z]{2,}")
_MATH_WRAP = re.compile(r"^\s*(?:\$\$?|\\\(|\\\[)\s*(?P<inner>.*?)\s*(?:\$\$?|\\\)|\\\])\s*$", re.S)
_END_PUNCT = re.compile(r"[\s.!;,]+$")


def _clean_value(value: str) -> str | None:
    value = _DECORATION.sub("", value)
    value = _END_PUNCT.sub("", value)
    m = _MATH_WRAP.match(value)
    if m is not None:
        value = m.group("inner")
    value = _END_PUNCT.sub("", value).strip()
    if not value or len(value) > MAX_STATEMENT_CHARS:
        return None
    # Prose ("that we need to check both cases") is not a value; a name or a unit next to a number is.
    if len(_WORD.findall(re.sub(r"\\text\{[^{}]*\}", "t", value))) > 3:
        return None
    return value


def _is_bare_value(line: str) -> bool:
    if len(line) > 80 or not _VALUE_LINE.match(line):
        return False
    stripped = _MATH_WRAP.match(line)
    inner = stripped.group("inner") if stripped else line
    # A value line has a digit or LaTeX in it (a lone word could be the end of any sentence) and hardly any words.
    return bool(re.search(r"\d|\\[a-zA-Z]", inner)) and len(_WORD.findall(inner)) <= 1


def extract_statement(answer_part: str) -> str | None:
    """The value of an explicit final-answer statement that ends `answer_part`, or None."""
    tail = _SIGN_OFF.sub("", answer_part[-STATEMENT_TAIL_CHARS:]).rstrip()
    lines = [ln.strip() for ln in tail.split("\n") if ln.strip()]
    if not lines:
        return None
    last = _DECORATION.sub("", lines[-1])
    # The statement ends the last line: "... so x = 3. The answer is 8."
    for word in reversed(list(_ANSWER_WORD.finditer(last))):  # the last statement on the line wins
        m = _STATEMENT_REST.match(last, word.end())
        if m is not None:
            value = m.group("value")
            return None if _NEGATED.match(value) else _clean_value(value)
    if _is_bare_value(last):
        return _clean_value(last)
    return None


def extract_final_answer(
    completion: str, answer_format: str = "boxed_or_final_statement", finish_reason: str | None = None
) -> Extraction:
    """The final answer of a completion under `answer_format` (see the module docstring)."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    if is_cut_off(completion, finish_reason):
        return Extraction(None, "none", cut_off=True)
    start = answer_start(completion)
    boxed = _last_box(completion, start)
    if boxed is not None:
        return Extraction(boxed, "box")
    if answer_format == "boxed_or_final_statement":
        stated = extract_statement(completion[start:])
        if stated is not None:
            return Extraction(stated, "statement")
    return Extraction(None, "none")

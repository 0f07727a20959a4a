"""Checkpoint location inside trajectories, paragraph counts and resampling schedules.

A checkpoint is a reconsideration marker (by default `Wait`, `Alternatively`, `But`) that starts a paragraph:
the two characters before it are exactly `"\\n\\n"` (so `"\\n\\n\\nWait"` is a checkpoint too, its paragraph break
is the last two newlines), the match is case-sensitive, and the marker is a whole word: the character after it,
if any, is not a word character (`str.isalnum()` or `_`, as Python's `\\w`), so `Waiting`, `Butterfly`, `Wait2`
and `But_x` are not checkpoints while `Wait,`, `Wait.`, `But ` and a marker at the end of the text are. The start
of the text is not a paragraph break: a text that opens with `Wait` has no checkpoint there (one that opens with
`"\\n\\nWait"` does). Only `"\\n"` counts as a newline; `"\\r\\n\\r\\n"` is not a paragraph break.
"""

from __future__ import annotations

import math
import operator
import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

DEFAULT_MARKERS: tuple[str, ...] = ("Wait", "Alternatively", "But")
POLICIES: tuple[str, ...] = ("seed", "uniform", "all", "decile", "front")
# Statuses a verdict can have (see ckptdpo.verify); only the first two say anything about correctness.
VERDICT_STATUSES = {"correct": True, "incorrect": False, "no_answer": None, "timeout": None, "error": None}
# A checkpoint schedule that spreads draws over a long list uses this many positions.
MAX_SPREAD = 10


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint: `index` is 1-based, `char` is the offset of the marker's first character."""

    index: int
    char: int
    marker: str


@lru_cache(maxsize=64)
def _checkpoint_regex(markers: tuple[str, ...]) -> re.Pattern[str]:
    """One compiled pattern per marker tuple: consume the "\\n\\n", capture the marker in a lookahead."""
    if not markers:
        raise ValueError("markers must not be empty")
    for m in markers:
        if not isinstance(m, str) or not m or m != m.strip():
            raise ValueError(f"marker {m!r} must be a non-empty string without surrounding whitespace")
    alternatives = []
    # Longest first, so that of two markers matching at one place ("But", "But then") the longer one wins.
    for m in sorted(set(markers), key=lambda s: (-len(s), s)):
        # The whole-word test only makes sense after a word character; "Wait," ends a word by itself.
        tail = r"(?!\w)" if re.match(r"\w", m[-1]) else ""
        alternatives.append(re.escape(m) + tail)
    # A literal "\n\n" prefix lets the regex engine skip ahead fast (a lookbehind would be ~4x slower); only the
    # two newlines are consumed, so "\n\n\nWait" is found at the second newline and no checkpoint is swallowed.
    return re.compile(r"\n\n(?=(" + "|".join(alternatives) + "))")


def locate_checkpoints(text: str, markers: Sequence[str] = DEFAULT_MARKERS) -> list[Checkpoint]:
    """All checkpoints of a trajectory, in order of position."""
    rx = _checkpoint_regex(tuple(markers))
    return [Checkpoint(i, m.start() + 2, m.group(1)) for i, m in enumerate(rx.finditer(text), 1)]


def count_paragraphs(text: str) -> int:
    """Non-empty paragraphs: pieces of `text.split("\\n\\n")` that hold at least one non-whitespace character."""
    return sum(1 for p in text.split("\n\n") if p and not p.isspace())


def split_at_checkpoint(text: str, cp: Checkpoint) -> tuple[str, str]:
    """(prefix, suffix) with prefix = text[:cp.char] (the resampling prompt) and prefix + suffix == text."""
    if not (2 <= cp.char <= len(text)) or not text.startswith(cp.marker, cp.char):
        raise ValueError(f"checkpoint {cp} does not belong to this text (no {cp.marker!r} at offset {cp.char})")
    return text[: cp.char], text[cp.char :]


def _spread(n: int, k: int) -> list[int]:
    """k positions in 1..n, evenly spaced from the first to the last (rounded half up); distinct when k <= n."""
    if k == 1:
        return [1]
    return [1 + (2 * (n - 1) * j + (k - 1)) // (2 * (k - 1)) for j in range(k)]


def _deciles(n: int) -> list[int]:
    """The first checkpoint of each tenth of the list: floor(n*d/10) + 1 for d = 0..9 (distinct when n >= 10)."""
    # The start of each tenth rather than its end: checkpoint 1 stays in the schedule as it is for n <= 10, and the
    # last checkpoint, usually the final re-check right before the answer, is left out ("too late to fix anything").
    return [n * d // 10 + 1 for d in range(10)]


def schedule_resample_points(num_checkpoints: int, policy: str = "seed") -> list[int]:
    """1-based checkpoint indices to resample from, one entry per draw, in non-decreasing order.

    Policies (n = num_checkpoints; every policy gives [] for n = 0):
    - `seed` (DESIGN.md): n <= 10: checkpoint 1 gets n draws, the next ceil((n-1)/2) checkpoints 2 draws each, the
      rest 1 draw each (n = 5: [1,1,1,1,1,2,2,3,3,4,5]); n > 10: one draw at each decile, floor(n*d/10) + 1 for
      d = 0..9 (the first checkpoint of each tenth; n = 100: [1, 11, 21, ..., 91]).
    - `all`: every checkpoint once, [1..n].
    - `uniform`: every checkpoint once when n <= 10, else 10 draws evenly spaced from checkpoint 1 to checkpoint n.
    - `decile`: floor(n*d/10) + 1 for d = 0..9 whatever n is: always 10 draws, repeated positions when n < 10.
    - `front`: the `uniform` positions (m = min(n, 10) of them) with linearly decreasing draws: the first gets m,
      the second m - 1, ..., the last 1 (m*(m+1)/2 draws, at most 55).
    """
    try:  # operator.index also takes numpy integers (counts read from Parquet), not floats or bools-as-ints
        n = operator.index(num_checkpoints) if not isinstance(num_checkpoints, bool) else -1
    except TypeError:
        n = -1
    if n < 0:
        raise ValueError(f"num_checkpoints must be a non-negative int, got {num_checkpoints!r}")
    if policy not in POLICIES:
        raise ValueError(f"unknown schedule policy {policy!r}; valid: {', '.join(POLICIES)}")
    if n == 0:
        return []
    if policy == "seed":
        if n > MAX_SPREAD:
            return _deciles(n)
        doubled = math.ceil((n - 1) / 2)
        return [1] * n + [i for i in range(2, 2 + doubled) for _ in range(2)] + list(range(2 + doubled, n + 1))
    if policy == "all":
        return list(range(1, n + 1))
    if policy == "decile":
        return _deciles(n)
    positions = _spread(n, min(n, MAX_SPREAD))
    if policy == "uniform":
        return positions
    m = len(positions)  # front
    return [p for j, p in enumerate(positions) for _ in range(m - j)]


def schedule_value_points(
    num_checkpoints: int,
    values: Sequence[Mapping],
    draws: int | None = None,
    threshold: float = 0.5,
) -> list[int]:
    """1-based checkpoint indices to resample from, one entry per draw, placed where the checkpoint values say.

    `values` are one trajectory's VALUES rows (checkpoint_index, value, ci_low, ci_high); only probed checkpoints
    get draws, and [] comes back when none was probed (the caller falls back to a fixed schedule). `draws` defaults to
    what the `seed` schedule spends on n checkpoints, so both schedules cost the same. With a critical checkpoint
    (the first probed one below `threshold`), half the draws (rounded up) go to the critical region, alternating
    from the last probed checkpoint before it (the last good state: w2r continuations there are likely right and
    isolate the error) to the critical one; the rest, or all when there is no critical checkpoint, are shared out in
    proportion to each probed checkpoint's Wilson interval width (largest remainder, ties to the earlier
    checkpoint): an uncertain value is where a draw is most likely to go either way.
    """
    n = num_checkpoints
    rows = sorted({int(r["checkpoint_index"]): r for r in values if 1 <= int(r["checkpoint_index"]) <= n}.items())
    if not rows:
        return []
    total = len(schedule_resample_points(n, "seed")) if draws is None else draws
    if total < 0:
        raise ValueError(f"draws must be >= 0, got {draws}")
    counts: Counter[int] = Counter()
    critical = next((i for i, r in rows if r["value"] < threshold), None)
    if critical is not None:
        region = [i for i, _ in rows if i < critical][-1:] + [critical]
        share = (total + 1) // 2
        for j in range(share):
            counts[region[j % len(region)]] += 1
        total -= share
    widths = [max(float(r["ci_high"]) - float(r["ci_low"]), 0.0) for _, r in rows]
    weight = sum(widths) or float(len(widths))
    quotas = [total * (w if sum(widths) else 1.0) / weight for w in widths]
    floors = [math.floor(q) for q in quotas]
    order = sorted(range(len(rows)), key=lambda k: (-(quotas[k] - floors[k]), k))
    for k in order[: total - sum(floors)]:
        floors[k] += 1
    for (i, _), c in zip(rows, floors, strict=True):
        counts[i] += c
    return sorted(i for i, c in counts.items() for _ in range(c))


def _summary(values: list[int]) -> dict[str, float | int | None]:
    if not values:
        return {"mean": None, "median": None, "max": None}
    return {"mean": statistics.fmean(values), "median": statistics.median(values), "max": max(values)}


def trajectory_stats(
    texts: Sequence[str], is_correct: Sequence[bool | None] | None = None, markers: Sequence[str] = DEFAULT_MARKERS
) -> dict[str, dict]:
    """Paragraphs and checkpoints per trajectory (mean/median/max), overall and split by correctness.

    Returns {"all": group} plus, when `is_correct` is given, "correct", "incorrect" and "unknown" (is_correct None)
    groups; a group is {"count", "paragraphs": {mean, median, max}, "checkpoints": {...}}, stats None when empty.
    """
    if is_correct is not None and len(is_correct) != len(texts):
        raise ValueError(f"is_correct has {len(is_correct)} entries for {len(texts)} texts")
    paragraphs = [count_paragraphs(t) for t in texts]
    checkpoints = [len(locate_checkpoints(t, markers)) for t in texts]
    groups = {"all": list(range(len(texts)))}
    if is_correct is not None:
        groups["correct"] = [i for i, c in enumerate(is_correct) if c is True]
        groups["incorrect"] = [i for i, c in enumerate(is_correct) if c is False]
        groups["unknown"] = [i for i, c in enumerate(is_correct) if c is None]
    return {
        name: {
            "count": len(rows),
            "paragraphs": _summary([paragraphs[i] for i in rows]),
            "checkpoints": _summary([checkpoints[i] for i in rows]),
        }
        for name, rows in groups.items()
    }


def checkpoint_rows(samples: Sequence[dict], verdicts: dict[str, bool | None], markers: Sequence[str]) -> list[dict]:
    """One CHECKPOINTS row per sample: its paragraph count and its checkpoints as parallel lists."""
    rows = []
    for s in samples:
        cps = locate_checkpoints(s["completion"], markers)
        rows.append(
            {
                "sample_id": s["sample_id"],
                "problem_id": s["problem_id"],
                "is_correct": verdicts[s["sample_id"]],
                "completion_tokens": s["completion_tokens"],
                "num_paragraphs": count_paragraphs(s["completion"]),
                "num_checkpoints": len(cps),
                "checkpoint_chars": [c.char for c in cps],
                "checkpoint_markers": [c.marker for c in cps],
            }
        )
    return rows

"""`verify_batch`: final answers extracted and normalised here, math-verify in the killable pool, verdicts cached.

The parent does the string work (extraction, normalisation, the complexity budget), so workers receive a few
characters per item rather than whole completions, and verdicts are cached by the normalised (gold, answer) pair.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ckptdpo.verify.answers import ANSWER_FORMATS, extract_final_answer
from ckptdpo.verify.budget import MAX_ANSWER_CHARS, over_budget
from ckptdpo.verify.math import check_math
from ckptdpo.verify.normalize import normalize_answer
from ckptdpo.verify.pool import run_calls

log = logging.getLogger(__name__)

STATUSES = ("correct", "incorrect", "no_answer", "timeout", "error")
DEFAULT_ANSWER_FORMAT = "boxed_or_final_statement"
DEFAULT_MAX_CHARS = 1_000_000
CACHE_SIZE = 65_536
_CACHEABLE = frozenset(("correct", "incorrect"))
# Normalising removes notation (`\\left`, `\\!`, units), never most of an answer: beyond this it stays over budget.
_MAX_NORMALIZED_CHARS = 4 * MAX_ANSWER_CHARS


@dataclass(frozen=True)
class Verdict:
    """One verification result; `is_correct` is None unless status is correct or incorrect.

    `extracted_from` says how sure the label is: `box` (a `\\boxed{}` answer), `statement` (an explicit final-answer
    statement, no box) or `none` (no answer found, or the completion was cut off).
    """

    status: str  # correct | incorrect | no_answer | timeout | error
    is_correct: bool | None
    extracted: str | None
    extracted_from: str = "none"  # box | statement | none


@dataclass
class _Item:
    gold: str
    answer: str
    extracted: str
    source: str


_CACHE_LOCK = threading.Lock()
_CACHE: collections.OrderedDict[tuple[str, str], tuple[str, bool | None]] = collections.OrderedDict()


def clear_cache() -> None:
    """Forget cached verdicts (benchmarks and tests)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _as_gold(value: Any) -> str | None:
    if value is None or isinstance(value, (bytes, bytearray)):
        return None
    text = value.strip() if isinstance(value, str) else str(value).strip()
    return text or None


def _unpack(item: Any, finish_reason: str | None) -> tuple[Any, Any, str | None]:
    """(gold, completion, finish_reason) from a `(gold, completion)` or `(gold, completion, finish_reason)` item."""
    if isinstance(item, (str, bytes)) or len(item) not in (2, 3):
        raise ValueError("an item is (gold, completion) or (gold, completion, finish_reason)")
    if len(item) == 3:
        return item[0], item[1], item[2]
    return item[0], item[1], finish_reason


def _prepare(item: Any, finish_reason: str | None, answer_format: str) -> Verdict | _Item:
    """A verdict that needs no math-verify (bad item, no answer, over budget), or the normalised pair to check."""
    try:
        gold_raw, completion, finish_reason = _unpack(item, finish_reason)
    except (TypeError, ValueError):
        return Verdict("error", None, None)
    if completion is None or (isinstance(completion, str) and not completion.strip()):
        return Verdict("no_answer", None, None)
    gold = _as_gold(gold_raw)
    if gold is None or not isinstance(completion, str):
        return Verdict("error", None, None)
    found = extract_final_answer(completion, answer_format, finish_reason)
    if found.text is None:
        return Verdict("no_answer", None, None)  # also every cut-off completion: it never gave its final answer
    if found.too_deep or len(found.text) > _MAX_NORMALIZED_CHARS:
        return Verdict("timeout", None, str(found.text), found.source)  # over budget whatever normalising removes
    answer, gold = normalize_answer(found.text), normalize_answer(gold)
    if not gold:
        return Verdict("error", None, found.text, found.source)
    if not answer:
        return Verdict("no_answer", None, found.text, found.source)
    reason = over_budget(answer) or over_budget(gold)
    if reason is not None:
        # What sympy would grind on until the deadline ends now with the same verdict.
        log.debug("verify: answer %s; timeout without running math-verify", reason)
        return Verdict("timeout", None, found.text, found.source)
    return _Item(gold, answer, found.text, found.source)


def _check_all(todo: dict[tuple[str, str], list[int]], timeout_s: float, workers: int | None) -> tuple[list, list]:
    keys = list(todo)
    results, latency = run_calls(check_math, keys, timeout_s=timeout_s, workers=workers)
    outcomes = []
    for outcome, value in results:
        if outcome == "ok":
            outcomes.append(tuple(value))
        elif outcome == "timeout":
            outcomes.append(("timeout", None))
        else:
            log.debug("verify: worker error %s", value)
            outcomes.append(("error", None))
    with _CACHE_LOCK:
        for key, outcome in zip(keys, outcomes, strict=True):
            if outcome[0] in _CACHEABLE:
                _CACHE[key] = outcome
                if len(_CACHE) > CACHE_SIZE:
                    _CACHE.popitem(last=False)
    return outcomes, latency


def verify_batch_timed(
    items: Sequence[Any],
    *,
    timeout_s: float = 5.0,
    workers: int | None = None,
    answer_format: str = DEFAULT_ANSWER_FORMAT,
    finish_reasons: Sequence[str | None] | None = None,
) -> tuple[list[Verdict], list[float]]:
    """`verify_batch` plus, per item, the seconds its check took in a worker (0 when no worker was needed)."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    if finish_reasons is not None and len(finish_reasons) != len(items):
        raise ValueError(f"finish_reasons has {len(finish_reasons)} entries for {len(items)} items")
    n = len(items)
    verdicts: list[Verdict | None] = [None] * n
    latency = [0.0] * n
    prepared: list[_Item | None] = [None] * n
    todo: dict[tuple[str, str], list[int]] = {}
    for idx in range(n):
        got = _prepare(items[idx], finish_reasons[idx] if finish_reasons is not None else None, answer_format)
        if isinstance(got, Verdict):
            verdicts[idx] = got
            continue
        prepared[idx] = got
        with _CACHE_LOCK:
            hit = _CACHE.get((got.gold, got.answer))
            if hit is not None:
                _CACHE.move_to_end((got.gold, got.answer))
        if hit is not None:
            verdicts[idx] = Verdict(hit[0], hit[1], got.extracted, got.source)
        else:
            todo.setdefault((got.gold, got.answer), []).append(idx)
    if todo:
        outcomes, job_latency = _check_all(todo, timeout_s, workers)
        for indices, (status, ok), seconds in zip(todo.values(), outcomes, job_latency, strict=True):
            for idx in indices:
                p = prepared[idx]
                verdicts[idx] = Verdict(status, ok, p.extracted, p.source)
                latency[idx] = seconds
    return [v if v is not None else Verdict("error", None, None) for v in verdicts], latency


def verify_batch(
    items: Sequence[Any],
    *,
    timeout_s: float = 5.0,
    workers: int | None = None,
    answer_format: str = DEFAULT_ANSWER_FORMAT,
    finish_reasons: Sequence[str | None] | None = None,
) -> list[Verdict]:
    """Verify `(gold, completion)` or `(gold, completion, finish_reason)` items; one Verdict per item, in order.

    `answer_format`: `boxed` takes only the last `\\boxed{}` of the answer part; `boxed_or_final_statement` (default)
    falls back to an explicit final-answer statement at the end. `finish_reasons` (one per item) is another way to
    pass finish reasons; a completion cut off at its token limit, or inside an unclosed `<think>`, is `no_answer`,
    never `correct`. Never hangs past `timeout_s` per item and never raises on bad items; raises
    `WorkersUnavailable` when no worker process can start.
    """
    return verify_batch_timed(
        items, timeout_s=timeout_s, workers=workers, answer_format=answer_format, finish_reasons=finish_reasons
    )[0]

"""The verify stage's pure part: (gold, completion) items of a shard's samples and their VERDICTS rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def verdict_items(samples: Sequence[dict[str, Any]], gold: Mapping[str, str]) -> list[tuple[str, str, str | None]]:
    """(gold answer, completion, finish reason) per sample: a completion cut off at `length` is never correct."""
    return [(gold[s["problem_id"]], s["completion"], s.get("finish_reason")) for s in samples]


def verdict_rows(samples: Sequence[dict[str, Any]], verdicts: Sequence[Any]) -> list[dict[str, Any]]:
    """One VERDICTS row per sample, in the samples' order."""
    rows = []
    for s, v in zip(samples, verdicts, strict=True):
        rows.append(
            {
                "sample_id": s["sample_id"],
                "problem_id": s["problem_id"],
                "status": v.status,
                "is_correct": v.is_correct,
                "extracted": v.extracted,
                "extracted_from": v.extracted_from,
            }
        )
    return rows

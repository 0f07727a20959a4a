"""The verify stage's pure part: (gold, completion) items of a shard's samples and their VERDICTS rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ckptdpo.schemas import VERDICTS


def verdict_items(samples: Sequence[dict[str, Any]], gold: Mapping[str, str]) -> list[tuple[str, str]]:
    """(gold answer, completion) per sample."""
    return [(gold[s["problem_id"]], s["completion"]) for s in samples]


def verdict_rows(samples: Sequence[dict[str, Any]], verdicts: Sequence[Any]) -> list[dict[str, Any]]:
    """One VERDICTS row per sample, in the samples' order."""
    rows = []
    for s, v in zip(samples, verdicts, strict=True):
        row = {
            "sample_id": s["sample_id"],
            "problem_id": s["problem_id"],
            "status": v.status,
            "is_correct": v.is_correct,
            "extracted": v.extracted,
        }
        if "extracted_from" in VERDICTS.names:
            row["extracted_from"] = v.extracted_from
        rows.append(row)
    return rows

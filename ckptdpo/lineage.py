"""The refresh's bookkeeping, as pure functions: lineage keys, problem hashes, version names and `state.json`.

A data directory's `state.json` says which problems a lineage has processed (id -> content hash), the latest
version, and the refresh still pending. A problem counts as processed only when it got verified samples: one whose
generation failed (an endpoint down, a failure budget that let the stage finish without it) stays new and is tried
again by the next refresh.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ckptdpo.configs import Recipe
from ckptdpo.shards import atomic_write_bytes, content_id

STATE = "state.json"
# Settings of the recipe that decide which pairs come out (not how fast): a change starts a new lineage. The
# sections are the stages the stage registry marks as deciding the pairs; these fields of them do not.
_NOT_LINEAGE = {"generate": {"shard_size"}, "verify": {"workers"}, "resample": {"shard_size"}}
# A verdict that says the sample was never really checked: its problem is tried again.
UNVERIFIED = frozenset({"error"})


def version_name(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y%m%d-%H%M%S")


def lineage_key(
    recipe: Recipe, model: str, backend: dict[str, Any], wanted: list[str], sections: Sequence[str]
) -> str:
    """The model fingerprint, the backend settings that change outputs and every pair-deciding recipe setting
    (`sections`: the recipe sections that decide which pairs come out)."""
    parts = {s: getattr(recipe, s).model_dump(mode="json", exclude=_NOT_LINEAGE.get(s)) for s in sections}
    return content_id("lineage", model, backend, parts, sorted(wanted))


def problem_hash(row: dict[str, Any]) -> str:
    return content_id(row["problem"], row["answer"])


def new_problems(rows: Iterable[dict[str, Any]], seen: dict[str, str]) -> list[dict[str, Any]]:
    """Rows never processed in this lineage, or whose problem or answer changed since."""
    return [r for r in rows if seen.get(r["problem_id"]) != problem_hash(r)]


def verified_problem_ids(verdicts: Iterable[dict[str, Any]]) -> set[str]:
    """Problems with at least one sample that got a real verdict."""
    return {v["problem_id"] for v in verdicts if v["status"] not in UNVERIFIED}


def record_processed(
    state: dict[str, Any], rows: Iterable[dict[str, Any]], verified: set[str]
) -> tuple[list[str], list[str]]:
    """Mark the rows whose problem got verified samples as processed; returns (recorded ids, left-out ids)."""
    recorded, left = [], []
    for row in rows:
        if row["id"] in verified:
            state["problems"][row["id"]] = problem_hash(row)
            recorded.append(row["id"])
        else:
            left.append(row["id"])
    return recorded, left


def fresh_state(lineage: str, previous: dict[str, Any]) -> dict[str, Any]:
    """The state of a new lineage: nothing processed; the latest version (of any lineage) is still the latest."""
    return {"lineage": lineage, "problems": {}, "latest": previous.get("latest"), "pairs_since_training": 0}


def read_state(data_dir: Path) -> dict[str, Any]:
    path = data_dir / STATE
    return json.loads(path.read_text()) if path.exists() else {}


def write_state(data_dir: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(data_dir / STATE, json.dumps(state, indent=1, sort_keys=True).encode())

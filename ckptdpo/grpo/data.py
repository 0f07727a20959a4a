"""GRPO's prompts: the run's own problems (its problems stage, read through the manifest) in the chat form the
factory generated from, each row carrying what its verifier needs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ckptdpo.backends.base import problem_messages
from ckptdpo.errors import UserError
from ckptdpo.grpo.reward import KIND_COLUMNS
from ckptdpo.shards import StageNotDone, listed_shards

PROBLEM_COLUMNS = ("problem_id", "problem", "answer")


def read_problems(problems_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a finished problems stage (problem_id, problem, answer, and any verifier columns it has)."""
    try:
        shards = listed_shards(problems_dir)
    except StageNotDone:
        raise UserError(
            f"{problems_dir}: the problems stage has not finished; run the generate stage first."
        ) from None
    rows: list[dict[str, Any]] = []
    for path in shards:
        table = pq.read_table(path)
        keep = [c for c in (*PROBLEM_COLUMNS, "kind", *KIND_COLUMNS) if c in table.column_names]
        rows += table.select(keep).to_pylist()
    return rows


def prompt_rows(
    problems: Sequence[dict[str, Any]], kind: str, few_shot: Sequence[tuple[str, str]] = ()
) -> list[dict[str, Any]]:
    """One GRPO dataset row per problem: `prompt` as chat messages (the worked examples, then the problem with the
    instruction, as `problem_messages` builds them for generation), plus `problem_id`, `answer` and `kind`.

    The trainer applies the model's chat template with the generation prompt, which gives the text the generate
    stage sent for the same problem (`templated_problem`)."""
    rows = []
    for p in problems:
        row = {
            "prompt": problem_messages(p["problem"], few_shot),
            "problem_id": p["problem_id"],
            "answer": p["answer"],
            "kind": p.get("kind") or kind,
        }
        row.update({c: p[c] for c in KIND_COLUMNS if c in p})
        rows.append(row)
    return rows

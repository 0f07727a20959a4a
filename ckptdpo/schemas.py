"""Every Parquet schema of the project, defined once.

Tables are built with `make_table(rows, SCHEMA)` so a missing or extra column fails at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1

PROBLEMS = pa.schema(
    [
        ("problem_id", pa.string()),
        ("problem", pa.string()),
        ("answer", pa.string()),
        ("source", pa.string()),
    ]
)

# One row per generated trajectory (and, in resampling, per continuation).
SAMPLES = pa.schema(
    [
        ("sample_id", pa.string()),
        ("problem_id", pa.string()),
        ("sample_index", pa.int32()),
        ("seed", pa.int64()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("finish_reason", pa.string()),  # stop | length | loop | error
        ("model", pa.string()),
    ]
)

VERDICTS = pa.schema(
    [
        ("sample_id", pa.string()),
        ("problem_id", pa.string()),
        ("status", pa.string()),  # correct | incorrect | no_answer | timeout | error
        ("is_correct", pa.bool_()),  # null unless status is correct or incorrect
        ("extracted", pa.string()),
        ("extracted_from", pa.string()),  # box | statement | none: how sure the label is
    ]
)

# One row per trajectory: its checkpoints as parallel lists (offsets of the marker's first character).
CHECKPOINTS = pa.schema(
    [
        ("sample_id", pa.string()),
        ("problem_id", pa.string()),
        ("is_correct", pa.bool_()),
        ("completion_tokens", pa.int32()),
        ("num_paragraphs", pa.int32()),
        ("num_checkpoints", pa.int32()),
        ("checkpoint_chars", pa.list_(pa.int64())),
        ("checkpoint_markers", pa.list_(pa.string())),
    ]
)

# One row per continuation drawn from a checkpoint during resampling.
ATTEMPTS = pa.schema(
    [
        ("attempt_id", pa.string()),
        ("round", pa.int32()),
        ("direction", pa.string()),  # r2w | w2r
        ("problem_id", pa.string()),
        ("source_sample_id", pa.string()),
        ("checkpoint_index", pa.int32()),
        ("checkpoint_char", pa.int64()),
        ("draw", pa.int32()),
        ("seed", pa.int64()),
        ("continuation", pa.string()),
        ("completion_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("status", pa.string()),
        ("is_correct", pa.bool_()),
        ("extracted", pa.string()),
        ("extracted_from", pa.string()),  # box | statement | none
    ]
)

PAIRS = pa.schema(
    [
        ("pair_id", pa.string()),
        ("pair_type", pa.string()),  # r2w | w2r | critical | dto
        ("problem_id", pa.string()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("gold_answer", pa.string()),
        ("source_sample_id", pa.string()),
        ("checkpoint_index", pa.int32()),
        ("prompt_tokens", pa.int32()),
        ("chosen_tokens", pa.int32()),
        ("rejected_tokens", pa.int32()),
        ("round", pa.int32()),
        ("attempt_id", pa.string()),
        ("model", pa.string()),
    ]
)

# One row per correct trajectory that DTO worked on (diagnostics; `ckptdpo.dto.DTOResult` plus where it exited).
DTO_RESULTS = pa.schema(
    [
        ("sample_id", pa.string()),
        ("problem_id", pa.string()),
        ("status", pa.string()),  # pruned | truncated | dropped | no_exit
        ("exit_kind", pa.string()),  # checkpoint | paragraph: what exit_index counts
        ("num_candidates", pa.int32()),
        ("exit_index", pa.int32()),  # 1-based; null when no_exit
        ("exit_char", pa.int64()),
        ("exit_probability", pa.float64()),
        ("reverify_probability", pa.float64()),  # null unless pruning removed segments
        ("num_segments", pa.int32()),
        ("removed_segments", pa.list_(pa.int32())),  # 0-based segment indices the judge removed
        ("truncated_text", pa.string()),
        ("text", pa.string()),  # the optimized completion; null when no_exit or dropped
        ("original_tokens", pa.int32()),
        ("truncated_tokens", pa.int32()),
        ("pruned_tokens", pa.int32()),
    ]
)

# One row per benchmark problem of the eval stage: PROBLEMS plus how to check an answer of its kind.
EVAL_PROBLEMS = pa.schema(
    [
        ("problem_id", pa.string()),
        ("problem", pa.string()),  # the user message: the benchmark's prompt (its harness's wording)
        ("answer", pa.string()),  # math: gold answer; choice: gold letter; code: the reference solution or ""
        ("source", pa.string()),
        ("kind", pa.string()),  # math | code | choice
        ("tests", pa.string()),  # code: Python run after the candidate ("" when none)
        ("setup", pa.string()),  # code: Python run before the candidate (imports the prompt had)
        ("cases", pa.list_(pa.struct([("stdin", pa.string()), ("expected_stdout", pa.string())]))),
        ("choice_order", pa.list_(pa.int32())),  # choice: presented[i] = original[choice_order[i]]; else null
    ]
)

# One row per evaluated sample.
EVAL_SAMPLES = pa.schema(
    [
        ("benchmark", pa.string()),
        ("model_name", pa.string()),
        ("model", pa.string()),  # what the backend loaded (path or hub id) under model_name
        ("problem_id", pa.string()),
        ("sample_index", pa.int32()),
        ("completion", pa.string()),
        ("completion_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("status", pa.string()),
        ("is_correct", pa.bool_()),
        ("extracted", pa.string()),
    ]
)

# One row per (benchmark, model): the headline numbers.
EVAL_RESULTS = pa.schema(
    [
        ("benchmark", pa.string()),
        ("model_name", pa.string()),
        ("reference_model", pa.string()),  # eta and aes compare against this model
        ("num_problems", pa.int32()),
        ("num_samples", pa.int32()),
        ("pass_at_1", pa.float64()),
        ("pass_at_k", pa.map_(pa.int32(), pa.float64())),
        ("cons_at_k", pa.map_(pa.int32(), pa.float64())),
        ("mean_tokens", pa.float64()),
        ("mean_tokens_correct", pa.float64()),
        ("mean_tokens_incorrect", pa.float64()),  # every sample not verified correct
        ("length_share", pa.float64()),
        ("loop_share", pa.float64()),
        ("eta", pa.float64()),
        ("aes", pa.float64()),
    ]
)


def make_table(rows: Sequence[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build a table from row dicts; a row with a missing or extra column raises ValueError."""
    names = set(schema.names)
    for i, row in enumerate(rows):
        keys = set(row)
        if keys != names:
            missing, extra = sorted(names - keys), sorted(keys - names)
            raise ValueError(f"row {i} does not match the schema: missing {missing}, extra {extra}")
    return pa.Table.from_pylist(list(rows), schema=schema)


# --- checkpoint values (the values stage) ---------------------------------------------------------------------------

# One row per probed checkpoint: `rollouts` continuations from `chat(problem) + completion[:checkpoint_char]`.
VALUES = pa.schema(
    [
        ("sample_id", pa.string()),
        ("problem_id", pa.string()),
        ("checkpoint_index", pa.int32()),  # 1-based, as in CHECKPOINTS
        ("checkpoint_char", pa.int64()),
        ("round", pa.int32()),  # the search round that probed it (1-based)
        ("seed", pa.int64()),
        ("rollouts", pa.int32()),
        ("successes", pa.int32()),  # rollouts verified correct (a rollout cut at `length` never is)
        ("incorrect", pa.int32()),  # rollouts with a final answer that verified wrong
        ("value", pa.float64()),  # successes / rollouts
        ("ci_low", pa.float64()),  # Wilson 95% interval
        ("ci_high", pa.float64()),
        ("completion_tokens", pa.int64()),  # tokens the rollouts generated
    ]
)

# One row per probed trajectory: how its search went and where its first error is.
VALUE_TRAJECTORIES = pa.schema(
    [
        ("sample_id", pa.string()),
        ("problem_id", pa.string()),
        ("status", pa.string()),  # the trajectory's verdict
        ("is_correct", pa.bool_()),
        ("num_checkpoints", pa.int32()),
        ("probed", pa.int32()),  # checkpoints probed
        ("rollouts_used", pa.int32()),
        ("completion_tokens", pa.int64()),  # tokens its rollouts generated
        ("search", pa.string()),  # binary | exhaustive
        ("resolved", pa.bool_()),  # the search ran to its end (false: stopped by max_rollouts_per_trajectory)
        ("critical_index", pa.int32()),  # first probed checkpoint below threshold, every earlier one at/above; or null
        ("critical_char", pa.int64()),
    ]
)

# TRL's stepwise-supervision format (PRMTrainer): one row per trajectory, its steps up to and including the first bad.
PRM_STEPS = pa.schema(
    [
        ("prompt", pa.string()),
        ("completions", pa.list_(pa.string())),
        ("labels", pa.list_(pa.bool_())),
        ("values", pa.list_(pa.float64())),  # the value measured at each step's end; null where not probed
        ("sample_id", pa.string()),
        ("problem_id", pa.string()),
    ]
)

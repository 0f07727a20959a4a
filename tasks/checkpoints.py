"""The checkpoints stage: trajectories + verdicts -> checkpoints per trajectory."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from ckptdpo.checkpoints import checkpoint_rows
from ckptdpo.configs import CheckpointConfig, Recipe
from ckptdpo.schemas import CHECKPOINTS, make_table
from ckptdpo.shards import write_shard
from tasks.common import content_cache_key
from tasks.planning import RETRY, StagePlan, fingerprints, plan_stage, read_rows, shard_exists

STAGE = "checkpoints"


def plan_checkpoints(run_dir: str, recipe: Recipe) -> StagePlan:
    inputs = fingerprints(run_dir, "generate", "verify")
    return plan_stage(run_dir, STAGE, inputs, recipe.checkpoints.model_dump(mode="json"), shards_of="generate")


@task(name="locate_checkpoints", task_run_name="checkpoints-shard-{index}", cache_key_fn=content_cache_key,
      persist_result=True, **RETRY)  # fmt: skip
def checkpoint_shard(run_dir: str, index: int, stage_key: str, checkpoints: CheckpointConfig) -> dict[str, float]:
    if shard_exists(run_dir, STAGE, index):
        return {}
    samples = read_rows(run_dir, "generate", index, ["sample_id", "problem_id", "completion", "completion_tokens"])
    verdicts = {
        v["sample_id"]: v["is_correct"] for v in read_rows(run_dir, "verify", index, ["sample_id", "is_correct"])
    }
    rows = checkpoint_rows(samples, verdicts, checkpoints.markers)
    write_shard(Path(run_dir) / STAGE, index, make_table(rows, CHECKPOINTS))
    return {}

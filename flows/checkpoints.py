"""The checkpoints flow: trajectories + verdicts -> checkpoints per trajectory."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.fanout import run_stage
from tasks import checkpoints
from tasks.common import load_recipe
from tasks.rundir import holds_run_dir


@flow(name="checkpoints", flow_run_name="checkpoints {run_dir}", timeout_seconds=7 * 24 * 3600)
@holds_run_dir
def checkpoint_flow(recipe_path: str, run_dir: str, overrides: dict[str, Any] | None = None) -> dict:
    """Trajectories + verdicts -> checkpoints per trajectory."""
    recipe = load_recipe(recipe_path, overrides)
    return run_stage(
        checkpoints.plan_checkpoints(run_dir, recipe),
        checkpoints.checkpoint_shard,
        runner=recipe.task_runner,
        checkpoints=recipe.checkpoints,
    )

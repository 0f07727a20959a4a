"""The verify flow: trajectories -> verdicts."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.fanout import run_stage
from tasks import verify
from tasks.common import load_recipe
from tasks.rundir import holds_run_dir


@flow(name="verify", flow_run_name="verify {run_dir}", timeout_seconds=7 * 24 * 3600)
@holds_run_dir
def verify_flow(recipe_path: str, run_dir: str, overrides: dict[str, Any] | None = None) -> dict:
    """Trajectories -> verdicts."""
    recipe = load_recipe(recipe_path, overrides)
    return run_stage(
        verify.plan_verify(run_dir, recipe),
        verify.verify_shard,
        runner=recipe.task_runner,
        verify=recipe.verify,
    )

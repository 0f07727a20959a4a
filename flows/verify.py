"""The verify flow: trajectories -> verdicts."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.fanout import run_stage
from tasks import verify
from tasks.common import load_recipe


@flow(name="verify", flow_run_name="verify {run_dir}", timeout_seconds=7 * 24 * 3600)
def verify_flow(recipe_path: str, run_dir: str, overrides: dict[str, Any] | None = None) -> dict:
    """Trajectories -> verdicts."""
    recipe = load_recipe(recipe_path, overrides)
    return run_stage(
        verify.plan_verify(run_dir, recipe),
        verify.verify_shard,
        in_flight=recipe.task_runner.max_in_flight,
        verify=recipe.verify,
    )

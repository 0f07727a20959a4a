"""The generate flow: problems -> sampled trajectories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.fanout import run_stage
from tasks import generate
from tasks.common import load_recipe
from tasks.problems import load_problems_stage
from tasks.rundir import holds_run_dir


@flow(name="generate", flow_run_name="generate {run_dir}", timeout_seconds=7 * 24 * 3600)
@holds_run_dir
def generate_flow(recipe_path: str, run_dir: str, overrides: dict[str, Any] | None = None) -> dict:
    """Problems -> sampled trajectories."""
    recipe = load_recipe(recipe_path, overrides)
    get_run_logger().info("recipe %s, config hash %s", recipe.name, recipe.config_hash())
    base_dir = str(Path(recipe_path).resolve().parent)
    load_problems_stage(run_dir, recipe.problems, recipe.generate.shard_size, base_dir)
    return run_stage(
        generate.plan_generate(run_dir, recipe),
        generate.generate_shard,
        runner=recipe.task_runner,
        failure_budget=recipe.failure_budget.generate,
        generate=recipe.generate,
        backend=recipe.backend,
    )

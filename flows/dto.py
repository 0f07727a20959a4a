"""The DTO flow: optimize the correct trajectories shard by shard, then build the SimPO pairs once."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.fanout import fan_out
from tasks import dto as dto_tasks
from tasks.common import load_recipe
from tasks.rundir import holds_run_dir


@flow(name="dto", flow_run_name="dto {run_dir}", timeout_seconds=7 * 24 * 3600)
@holds_run_dir
def dto_flow(recipe_path: str, run_dir: str, overrides: dict[str, Any] | None = None) -> dict:
    """Correct trajectories -> exit probing, truncation, judge pruning -> `dto` pairs and the dto stats section."""
    recipe = load_recipe(recipe_path, overrides)
    get_run_logger().info("dto of recipe %s, config hash %s", recipe.name, recipe.config_hash("dto"))
    plan = dto_tasks.plan_dto(run_dir, recipe)
    if plan.done:
        return {"stage": "dto", "skipped": True}
    fan_out(
        plan,
        dto_tasks.dto_shard,
        dto_tasks.OPTIMIZED,
        in_flight=recipe.task_runner.max_in_flight,
        runner=recipe.task_runner,
        dto=recipe.dto,
        backend=recipe.backend,
        judge=dto_tasks.judge_backend(recipe),
        markers=recipe.checkpoints.markers,
        verify=recipe.verify,
        failure_budget=recipe.failure_budget,
    )
    return dto_tasks.dto_pairs(run_dir, plan.key, recipe.dto, recipe.backend, inputs=plan.inputs, started=plan.started)

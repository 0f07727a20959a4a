"""The pipeline flow: the stages a recipe enables, in registry order. Flows order and fan out; tasks do the work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from ckptdpo.configs import Recipe
from flows.report import report_step
from flows.runners import with_task_runner
from flows.stage import run_context, stage_flow
from tasks import registry
from tasks.backends import close_backends
from tasks.rundir import run_dir_lock
from tasks.stage import RunContext
from tasks.stopping import stop_on_signals


@flow(name="pipeline", flow_run_name="pipeline {run_dir}", timeout_seconds=14 * 24 * 3600)
def pipeline_flow(
    recipe_path: str | None = None,
    run_dir: str = "runs/prefect",
    overrides: dict[str, Any] | None = None,
    stages_to_run: list[str] | None = None,
    ctx: RunContext | None = None,
) -> dict:
    """The stages the recipe enables (or `stages_to_run`), in pipeline order, then the report.

    A deployment passes a recipe path (loaded and validated once, here); the CLI and the refresh pass the run's
    context with the recipe they validated.
    """
    ctx = run_context(run_dir, recipe_path, overrides, ctx)
    recipe = ctx.recipe
    wanted = stages_to_run or recipe.stages
    get_run_logger().info(
        "pipeline %s: stages %s, run dir %s, config hash %s", recipe.name, wanted, run_dir, recipe.config_hash()
    )
    with run_dir_lock(run_dir), stop_on_signals():
        return _run_stages(ctx, wanted)


def _run_stages(ctx: RunContext, wanted: list[str]) -> dict:
    results: dict[str, Any] = {}
    try:
        for spec in registry.stages_to_run(wanted):
            results[spec.name] = with_task_runner(stage_flow, ctx.recipe.task_runner).with_options(name=spec.name)(
                spec.name, ctx.run_dir, ctx=ctx
            )
        if Path(ctx.run_dir, "stats.json").exists():
            report_step(ctx.run_dir)
    finally:
        close_backends()
    return results


def recipe_context(recipe: Recipe, recipe_path: str | Path, run_dir: str | Path) -> RunContext:
    """The context of a run whose recipe the caller loaded (and validated) itself."""
    return RunContext(recipe=recipe, run_dir=str(run_dir), base_dir=str(Path(recipe_path).resolve().parent))

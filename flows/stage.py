"""The stage flow: any registered stage, run the one way every stage runs (plan -> steps -> finalize).

It is the sub-flow the pipeline calls for each stage (with the run's context: the recipe validated once) and the
entry point of each stage's deployment (with a recipe path, loaded once here).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from ckptdpo.configs import Recipe
from ckptdpo.shards import read_manifest
from flows.fanout import run_step
from flows.runners import check_task_runner
from tasks.planning import finalize_stage
from tasks.registry import stage as stage_spec
from tasks.rundir import run_dir_lock
from tasks.stage import RunContext, ShardStep, Stage


def run_context(
    run_dir: str, recipe_path: str | None, overrides: dict[str, Any] | None, ctx: RunContext | None
) -> RunContext:
    """The run's context: passed in by the pipeline, or built here from a recipe path (a deployment's entry)."""
    if ctx is not None:
        return ctx
    if recipe_path is None:
        raise ValueError("give recipe_path (a recipe YAML file) or a run context")
    recipe = Recipe.from_yaml(recipe_path, overrides)
    check_task_runner(recipe)
    return RunContext(recipe=recipe, run_dir=str(run_dir), base_dir=str(Path(recipe_path).resolve().parent))


@flow(name="stage", flow_run_name="{stage} {run_dir}", timeout_seconds=14 * 24 * 3600)
def stage_flow(
    stage: str,
    run_dir: str,
    recipe_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    ctx: RunContext | None = None,
) -> dict:
    """Run one stage of a recipe in a run directory (its inputs must be done there)."""
    ctx = run_context(run_dir, recipe_path, overrides, ctx)
    spec = stage_spec(stage)
    get_run_logger().info(
        "stage %s of recipe %s, config hash %s", stage, ctx.recipe.name, ctx.recipe.config_hash(*_sections(spec))
    )
    with run_dir_lock(run_dir):
        return run_stage(spec, ctx)


def _sections(spec: Stage) -> tuple[str, ...]:
    return (spec.name,) if spec.name in Recipe.model_fields else ()


def run_stage(spec: Stage, ctx: RunContext) -> dict:
    """Plan the stage; unless it is done, run its steps in order, then finalize it."""
    plan = spec.plan(ctx)
    if plan.done:
        stats = (read_manifest(plan.directory) or {}).get("stats", {})
        return {**spec.published(stats), "stage": spec.name, "skipped": True}
    runner = ctx.recipe.task_runner
    steps = spec.steps(ctx, plan)
    outcomes: list[Any] = []
    shard_results: list[dict[str, Any]] = []
    budget = 0
    outcome = None
    while True:
        try:
            step = steps.send(outcome)
        except StopIteration:
            break
        outcome = run_step(step, runner)
        outcomes.append(outcome)
        if isinstance(step, ShardStep) and step.summarize is None:
            shard_results.extend(outcome)
            budget = step.failure_budget
    return finalize_stage(
        plan,
        shard_results,
        functools.partial(spec.summarize, ctx, plan, outcomes),
        failure_budget=budget,
        section=spec.name,
        published=spec.published,
    )

"""The resample flow: rounds of resampling from checkpoints until the round or token budget is spent, then pairs."""

from __future__ import annotations

from typing import Any

from prefect import flow

from ckptdpo.shards import read_manifest
from flows.fanout import fan_out
from tasks import resample
from tasks.common import load_recipe
from tasks.planning import finalize_stage
from tasks.rundir import holds_run_dir


@flow(name="resample", flow_run_name="resample {run_dir}", timeout_seconds=7 * 24 * 3600)
@holds_run_dir
def resample_flow(recipe_path: str, run_dir: str, overrides: dict[str, Any] | None = None) -> dict:
    """Rounds of resampling from checkpoints until the round or token budget is spent, then r2w / w2r pairs."""
    recipe = load_recipe(recipe_path, overrides)
    cfg, in_flight = recipe.resample, recipe.task_runner.max_in_flight
    top = resample.plan_resample(run_dir, recipe)
    if top.done:
        return {"stage": "resample", "skipped": True}
    round_stats: list[dict[str, Any]] = []
    spent = 0
    for r in range(1, cfg.max_rounds + 1):
        plan = resample.plan_round(run_dir, recipe, r)
        if plan.done:
            stats = read_manifest(plan.directory)["stats"]
        else:
            results = fan_out(
                plan,
                resample.resample_shard,
                plan.stage,
                in_flight=in_flight,
                runner=recipe.task_runner,
                round_index=r,
                resample=cfg,
                backend=recipe.backend,
                verify=recipe.verify,
                failure_budget=recipe.failure_budget.resample,
            )
            stats = finalize_stage(plan, results, failure_budget=recipe.failure_budget.resample)
        round_stats.append(stats)
        spent += stats["tokens"]
        if stats["attempts"] == 0 or (cfg.token_budget and spent >= cfg.token_budget):
            break
    plan = resample.plan_pairs(run_dir, recipe, len(round_stats))
    pair_results = []
    if not plan.done:
        pair_results = fan_out(
            plan,
            resample.pairs_shard,
            plan.stage,
            in_flight=in_flight,
            runner=recipe.task_runner,
            rounds=len(round_stats),
            resample=cfg,
            backend=recipe.backend,
        )
        finalize_stage(plan, pair_results)
    return resample.finalize_resample(top, round_stats, pair_results)

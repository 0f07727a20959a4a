"""The resample flow: rounds of resampling from checkpoints until the round or token budget is spent, then pairs."""

from __future__ import annotations

from typing import Any

from prefect import flow

from ckptdpo.shards import read_manifest
from flows.fanout import run_stage
from tasks import resample
from tasks.common import load_recipe
from tasks.rundir import holds_run_dir


@flow(name="resample", flow_run_name="resample {run_dir}", timeout_seconds=7 * 24 * 3600)
@holds_run_dir
def resample_flow(recipe_path: str, run_dir: str, overrides: dict[str, Any] | None = None) -> dict:
    """Rounds of resampling from checkpoints until the round or token budget is spent, then r2w / w2r pairs."""
    recipe = load_recipe(recipe_path, overrides)
    cfg = recipe.resample
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
            stats = run_stage(
                plan,
                resample.resample_shard,
                runner=recipe.task_runner,
                failure_budget=recipe.failure_budget.resample,
                round_index=r,
                resample=cfg,
                backend=recipe.backend,
                verify=recipe.verify,
            )
        round_stats.append(stats)
        spent += stats["tokens"]
        if stats["attempts"] == 0 or (cfg.token_budget and spent >= cfg.token_budget):
            break
    plan = resample.plan_pairs(run_dir, recipe, len(round_stats))
    pairs = {"rounds": len(round_stats), "resample": cfg, "backend": recipe.backend}
    run_stage(plan, resample.pairs_shard, runner=recipe.task_runner, **pairs)
    return resample.finalize_resample(top, round_stats)

"""The pipeline flow: the stages a recipe enables, in order. Flows order and fan out; tasks do the work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.checkpoints import checkpoint_flow
from flows.dto import dto_flow
from flows.eval import eval_flow
from flows.generate import generate_flow
from flows.report import report_step
from flows.resample import resample_flow
from flows.runners import check_task_runner, with_task_runner
from flows.train import train_flow
from flows.verify import verify_flow
from tasks.backends import close_backends
from tasks.common import load_recipe
from tasks.pairs import collect_pairs
from tasks.rundir import holds_run_dir
from tasks.stopping import stop_on_signals

DATA_STAGES = ("generate", "verify", "checkpoints", "resample")
_DATA_FLOWS = {
    "generate": generate_flow,
    "verify": verify_flow,
    "checkpoints": checkpoint_flow,
    "resample": resample_flow,
}
__all__ = ["DATA_STAGES", "checkpoint_flow", "generate_flow", "pipeline_flow", "resample_flow", "verify_flow"]


@flow(name="pipeline", flow_run_name="pipeline {run_dir}", timeout_seconds=14 * 24 * 3600)
@holds_run_dir
def pipeline_flow(
    recipe_path: str, run_dir: str, overrides: dict[str, Any] | None = None, stages_to_run: list[str] | None = None
) -> dict:
    """The stages the recipe enables (or `stages_to_run`), in order; pairs are collected at the end."""
    recipe = load_recipe(recipe_path, overrides)
    check_task_runner(recipe)  # a UI or scheduled run gets the CLI's refusal, before any stage runs
    wanted = stages_to_run or recipe.stages
    log = get_run_logger()
    log.info("pipeline %s: stages %s, run dir %s, config hash %s", recipe.name, wanted, run_dir, recipe.config_hash())
    results: dict[str, Any] = {}
    with stop_on_signals():
        return _run_stages(recipe, recipe_path, run_dir, overrides, wanted, results)


def _run_stages(recipe, recipe_path: str, run_dir: str, overrides, wanted: list[str], results: dict) -> dict:
    try:
        for name in DATA_STAGES:
            if name in wanted:
                results[name] = with_task_runner(_DATA_FLOWS[name], recipe.task_runner)(
                    recipe_path, run_dir, overrides
                )
        if "dto" in wanted:
            results["dto"] = with_task_runner(dto_flow, recipe.task_runner)(recipe_path, run_dir, overrides)
        pair_sources = [s for s, on in (("resample/pairs", "resample" in wanted), ("dto", "dto" in wanted)) if on]
        if pair_sources:
            results["pairs"] = collect_pairs(run_dir, pair_sources)
        if "train" in wanted:
            results["train"] = train_flow(recipe_path, run_dir, overrides)
        if "eval" in wanted:
            results["eval"] = eval_flow(recipe_path, run_dir, overrides)
        if Path(run_dir, "stats.json").exists():
            report_step(run_dir)
    finally:
        close_backends()
    return results

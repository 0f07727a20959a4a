"""The eval flow: every model on every benchmark, one task per problem shard, then metrics against the reference."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from ckptdpo import evaluate, sandbox
from flows.fanout import fan_out
from tasks import eval as eval_tasks
from tasks.backends import close_backends
from tasks.common import load_recipe
from tasks.rundir import holds_run_dir


@flow(name="eval", flow_run_name="eval {run_dir}", timeout_seconds=14 * 24 * 3600)
@holds_run_dir
def eval_flow(recipe_path: str, run_dir: str, overrides: dict[str, Any] | None = None) -> dict:
    """Benchmarks x models -> EVAL_SAMPLES shards, `eval/results.parquet` and the eval section of stats.json."""
    started = time.time()
    recipe = load_recipe(recipe_path, overrides)
    cfg = recipe.eval
    log = get_run_logger()
    log.info("eval of recipe %s, config hash %s", recipe.name, recipe.config_hash("eval"))
    base_dir = str(Path(recipe_path).resolve().parent)
    benchmarks = evaluate.resolve_benchmarks(cfg, recipe.problems, source=recipe_path)
    if any(b.kind == "code" for b in benchmarks.values()):
        # Before any model is loaded: a machine that cannot sandbox model-written code is one sentence, not a retry.
        sandbox.require_isolation(cfg.allow_unsandboxed)
    models, skipped = evaluate.resolve_models(cfg, recipe.backend, Path(run_dir))
    for name, reason in skipped.items():
        log.warning("model %s skipped: %s", name, reason)
    if models and models[0].backend != recipe.backend:
        # The pipeline's generation backend may still be loaded; one in-process model at a time.
        close_backends()
    bench_stats = {
        name: eval_tasks.load_benchmark(run_dir, name, pcfg, cfg.shard_size, base_dir, cfg.exclude_training_problems)
        for name, pcfg in benchmarks.items()
    }
    budget = recipe.failure_budget.eval
    for spec in models:
        for bench in benchmarks:
            plan = eval_tasks.plan_eval(run_dir, recipe, spec, bench, benchmarks[bench].kind)
            results = (
                []
                if plan.done
                else fan_out(
                    plan,
                    eval_tasks.evaluate_shard,
                    plan.stage,
                    in_flight=recipe.task_runner.max_in_flight,
                    runner=recipe.task_runner,
                    benchmark=bench,
                    model_name=spec.name,
                    eval=cfg,
                    backend=spec.backend,
                    verify=recipe.verify,
                    failure_budget=budget,
                    few_shot=recipe.generate.few_shot_pairs(),
                )
            )
            # Always: a changed k list re-aggregates the kept shards without generating again.
            eval_tasks.finalize_eval_model(plan, results, cfg, failure_budget=budget)
        # One loaded model at a time: two in-process engines (vLLM above all) would not fit on one GPU.
        close_backends()
    return eval_tasks.finalize_eval(run_dir, bench_stats, [m.name for m in models], skipped, cfg, started)

"""The eval flow: every model on every benchmark, one task per problem shard, then metrics against the reference."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from ckptdpo import evaluate
from flows.fanout import fan_out
from tasks import eval as eval_tasks
from tasks import planning
from tasks.backends import close_backends
from tasks.common import load_recipe


@flow(name="eval")
def eval_flow(recipe_path: str, run_dir: str, overrides: dict[str, Any] | None = None) -> dict:
    """Benchmarks x models -> EVAL_SAMPLES shards, `eval/results.parquet` and the eval section of stats.json."""
    started = time.time()
    recipe = load_recipe(recipe_path, overrides)
    cfg = recipe.eval
    log = get_run_logger()
    log.info("eval of recipe %s, config hash %s", recipe.name, recipe.config_hash("eval"))
    base_dir = str(Path(recipe_path).resolve().parent)
    benchmarks = evaluate.resolve_benchmarks(cfg, recipe.problems, source=recipe_path)
    models, skipped = evaluate.resolve_models(cfg, recipe.backend, Path(run_dir))
    for name, reason in skipped.items():
        log.warning("model %s skipped: %s", name, reason)
    if models and models[0].backend != recipe.backend:
        # The pipeline's generation backend may still be loaded; one in-process model at a time.
        close_backends()
    bench_stats = {
        name: eval_tasks.load_benchmark(
            run_dir, name, pcfg.model_dump(), cfg.shard_size, base_dir, cfg.exclude_training_problems
        )
        for name, pcfg in benchmarks.items()
    }
    sampling = cfg.model_dump(include={"num_samples", "temperature", "top_p", "max_tokens", "seed"})
    for spec in models:
        for bench in benchmarks:
            plan = planning.plan_stage(
                run_dir,
                eval_tasks.samples_stage(bench, spec.name),
                planning.fingerprints(run_dir, eval_tasks.problems_stage(bench)),
                sampling,
                planning.backend_key(spec.backend),
                eval_tasks.model_key(spec.backend, run_dir),
                shards_of=eval_tasks.problems_stage(bench),
            )
            results = (
                []
                if plan.done
                else fan_out(
                    plan,
                    eval_tasks.evaluate_shard,
                    plan.stage,
                    benchmark=bench,
                    model_name=spec.name,
                    eval_config=cfg.model_dump(),
                    backend=spec.backend.model_dump(),
                    timeout_s=recipe.verify.timeout_s,
                    workers=recipe.verify.workers,
                    in_flight=recipe.task_runner.max_in_flight,
                )
            )
            # Always: a changed k list re-aggregates the kept shards without generating again.
            eval_tasks.finalize_eval_model(plan, results, cfg.model_dump())
        # One loaded model at a time: two in-process engines (vLLM above all) would not fit on one GPU.
        close_backends()
    return eval_tasks.finalize_eval(run_dir, bench_stats, [m.name for m in models], skipped, cfg.model_dump(), started)

"""Prefect flows: one per stage and the whole pipeline. Flows order and fan out; tasks do the work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.dto import dto_flow
from flows.eval import eval_flow
from flows.fanout import fan_out
from flows.report import report_step
from flows.runners import with_task_runner
from flows.train import train_flow
from tasks import stages
from tasks.backends import close_backends, model_fingerprint
from tasks.common import load_recipe

DATA_STAGES = ("generate", "verify", "checkpoints", "resample")


@flow(name="generate")
def generate_flow(recipe_path: str, run_dir: str, overrides: dict[str, Any] | None = None) -> dict:
    """Problems -> sampled trajectories."""
    recipe = load_recipe(recipe_path, overrides)
    get_run_logger().info("recipe %s, config hash %s", recipe.name, recipe.config_hash())
    base_dir = str(Path(recipe_path).resolve().parent)
    stages.load_problems_stage(run_dir, recipe.problems.model_dump(), recipe.generate.shard_size, base_dir)
    plan = stages.plan_stage(
        run_dir,
        "generate",
        stages.fingerprints(run_dir, "problems"),
        recipe.generate.model_dump(exclude={"shard_size"}),
        stages.backend_key(recipe.backend),
        model_fingerprint(recipe.backend),
        shards_of="problems",
    )
    if plan.done:
        return {"stage": "generate", "skipped": True}
    results = fan_out(
        plan,
        stages.generate_shard,
        "generate",
        generate=recipe.generate.model_dump(),
        backend=recipe.backend.model_dump(),
        in_flight=recipe.task_runner.max_in_flight,
    )
    return stages.finalize_stage(plan, results)


@flow(name="verify")
def verify_flow(recipe_path: str, run_dir: str, overrides: dict[str, Any] | None = None) -> dict:
    """Trajectories -> verdicts."""
    recipe = load_recipe(recipe_path, overrides)
    # The verifier's timeout and pool size do not change verdicts of well-behaved items; the key still includes
    # the timeout because it decides which items end as `timeout`.
    plan = stages.plan_stage(
        run_dir,
        "verify",
        stages.fingerprints(run_dir, "problems", "generate"),
        recipe.verify.timeout_s,
        shards_of="generate",
    )
    if plan.done:
        return {"stage": "verify", "skipped": True}
    results = fan_out(
        plan,
        stages.verify_shard,
        "verify",
        timeout_s=recipe.verify.timeout_s,
        workers=recipe.verify.workers,
        in_flight=recipe.task_runner.max_in_flight,
    )
    return stages.finalize_stage(plan, results)


@flow(name="checkpoints")
def checkpoint_flow(recipe_path: str, run_dir: str, overrides: dict[str, Any] | None = None) -> dict:
    """Trajectories + verdicts -> checkpoints per trajectory."""
    recipe = load_recipe(recipe_path, overrides)
    plan = stages.plan_stage(
        run_dir,
        "checkpoints",
        stages.fingerprints(run_dir, "generate", "verify"),
        recipe.checkpoints.model_dump(),
        shards_of="generate",
    )
    if plan.done:
        return {"stage": "checkpoints", "skipped": True}
    results = fan_out(
        plan,
        stages.checkpoint_shard,
        "checkpoints",
        markers=recipe.checkpoints.markers,
        in_flight=recipe.task_runner.max_in_flight,
    )
    return stages.finalize_stage(plan, results)


@flow(name="resample")
def resample_flow(recipe_path: str, run_dir: str, overrides: dict[str, Any] | None = None) -> dict:
    """Rounds of resampling from checkpoints until the round or token budget is spent, then r2w / w2r pairs."""
    recipe = load_recipe(recipe_path, overrides)
    cfg, backend = recipe.resample, recipe.backend
    inputs = stages.fingerprints(run_dir, "problems", "generate", "verify", "checkpoints")
    model = model_fingerprint(backend)
    top = stages.plan_stage(
        run_dir, "resample", inputs, cfg.model_dump(), stages.backend_key(backend), model, shards_of="generate"
    )
    if top.done:
        return {"stage": "resample", "skipped": True}
    round_stats: list[dict[str, Any]] = []
    spent = 0
    for r in range(1, cfg.max_rounds + 1):
        previous = stages.fingerprints(run_dir, *[stages.round_dir(i) for i in range(1, r)])
        plan = stages.plan_stage(
            run_dir,
            stages.round_dir(r),
            {**inputs, **previous},
            cfg.model_dump(exclude={"max_rounds", "token_budget"}),
            stages.backend_key(backend),
            model,
            shards_of="generate",
        )
        if not plan.done:
            results = fan_out(
                plan,
                stages.resample_shard,
                plan.stage,
                round_index=r,
                resample=cfg.model_dump(),
                backend=backend.model_dump(),
                timeout_s=recipe.verify.timeout_s,
                in_flight=recipe.task_runner.max_in_flight,
            )
            stats = stages.finalize_stage(plan, results)
        else:
            stats = stages.read_manifest(plan.directory)["stats"]
        round_stats.append(stats)
        spent += stats["tokens"]
        if stats["attempts"] == 0 or (cfg.token_budget and spent >= cfg.token_budget):
            break
    rounds = len(round_stats)
    plan = stages.plan_stage(
        run_dir,
        "resample/pairs",
        stages.fingerprints(run_dir, *[stages.round_dir(i) for i in range(1, rounds + 1)]),
        cfg.model_dump(include={"max_pair_tokens", "max_length_ratio", "r2w", "w2r"}),
        model,
        shards_of="generate",
    )
    pair_results = []
    if not plan.done:
        pair_results = fan_out(
            plan,
            stages.pairs_shard,
            "resample/pairs",
            rounds=rounds,
            resample=cfg.model_dump(),
            backend=backend.model_dump(),
            in_flight=recipe.task_runner.max_in_flight,
        )
        stages.finalize_stage(plan, pair_results)
    return stages.finalize_resample(top, round_stats, pair_results)


@flow(name="pipeline")
def pipeline_flow(
    recipe_path: str, run_dir: str, overrides: dict[str, Any] | None = None, stages_to_run: list[str] | None = None
) -> dict:
    """The stages the recipe enables (or `stages_to_run`), in order; pairs are collected at the end."""
    recipe = load_recipe(recipe_path, overrides)
    wanted = stages_to_run or recipe.stages
    log = get_run_logger()
    log.info("pipeline %s: stages %s, run dir %s, config hash %s", recipe.name, wanted, run_dir, recipe.config_hash())
    results: dict[str, Any] = {}
    try:
        flows = {
            "generate": generate_flow,
            "verify": verify_flow,
            "checkpoints": checkpoint_flow,
            "resample": resample_flow,
        }
        for name in DATA_STAGES:
            if name in wanted:
                results[name] = with_task_runner(flows[name], recipe.task_runner)(recipe_path, run_dir, overrides)
        pair_sources = [s for s, on in (("resample/pairs", "resample" in wanted), ("dto", "dto" in wanted)) if on]
        if "dto" in wanted:
            results["dto"] = with_task_runner(dto_flow, recipe.task_runner)(recipe_path, run_dir, overrides)
        if pair_sources:
            results["pairs"] = stages.collect_pairs(run_dir, pair_sources)
        if "train" in wanted:
            results["train"] = train_flow(recipe_path, run_dir, overrides)
        if "eval" in wanted:
            results["eval"] = eval_flow(recipe_path, run_dir, overrides)
        if Path(run_dir, "stats.json").exists():
            report_step(run_dir)
    finally:
        close_backends()
    return results

"""The DTO flow: optimize the correct trajectories shard by shard, then build the SimPO pairs once."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.fanout import fan_out
from tasks import dto as dto_tasks
from tasks import stages
from tasks.backends import model_fingerprint
from tasks.common import load_recipe


@flow(name="dto")
def dto_flow(recipe_path: str, run_dir: str, overrides: dict[str, Any] | None = None) -> dict:
    """Correct trajectories -> exit probing, truncation, judge pruning -> `dto` pairs and the dto stats section."""
    recipe = load_recipe(recipe_path, overrides)
    cfg, backend = recipe.dto, recipe.backend
    judge = cfg.judge.backend or backend
    get_run_logger().info("dto of recipe %s, config hash %s", recipe.name, recipe.config_hash("dto"))
    # The markers decide the candidate positions, the verifier's timeout which sampled probes verify; the judge
    # counts only when pruning is on.
    plan = stages.plan_stage(
        run_dir,
        "dto",
        stages.fingerprints(run_dir, "problems", "generate", "verify", "checkpoints"),
        cfg.model_dump(exclude=None if cfg.prune else {"judge"}),
        recipe.checkpoints.markers,
        recipe.verify.timeout_s if cfg.probe == "sample" else None,
        stages.backend_key(backend),
        model_fingerprint(backend),
        [stages.backend_key(judge), model_fingerprint(judge)] if cfg.prune else None,
        shards_of="generate",
    )
    if plan.done:
        return {"stage": "dto", "skipped": True}
    fan_out(
        plan,
        dto_tasks.dto_shard,
        dto_tasks.OPTIMIZED,
        dto=cfg.model_dump(),
        backend=backend.model_dump(),
        judge_backend=cfg.judge.backend.model_dump() if cfg.judge.backend else None,
        markers=recipe.checkpoints.markers,
        timeout_s=recipe.verify.timeout_s,
        in_flight=recipe.task_runner.max_in_flight,
    )
    return dto_tasks.dto_pairs(
        run_dir, plan.key, cfg.model_dump(), backend.model_dump(), inputs=plan.inputs, started=plan.started
    )

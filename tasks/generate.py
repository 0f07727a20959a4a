"""The generate stage: problems -> sampled trajectories, one task run per problem shard."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import task

from ckptdpo.configs import BackendConfig, GenerateConfig, Recipe
from ckptdpo.generation import build_generation_requests, sample_rows
from ckptdpo.schemas import SAMPLES, make_table
from ckptdpo.shards import write_shard
from tasks.backends import backend_session, model_fingerprint
from tasks.common import content_cache_key
from tasks.planning import (
    RETRY,
    StagePlan,
    backend_key,
    check_requests,
    fingerprints,
    plan_stage,
    read_rows,
    shard_exists,
)

STAGE = "generate"


def plan_generate(run_dir: str, recipe: Recipe) -> StagePlan:
    """Keyed by the problems, the sampling settings (not the shard size) and the model."""
    return plan_stage(
        run_dir,
        STAGE,
        fingerprints(run_dir, "problems"),
        recipe.generate.model_dump(mode="json", exclude={"shard_size"}),
        backend_key(recipe.backend),
        model_fingerprint(recipe.backend),
        shards_of="problems",
    )


@task(
    name="generate_samples",
    task_run_name="generate-shard-{index}",
    cache_key_fn=content_cache_key,
    persist_result=True,
    **RETRY,
)
def generate_shard(
    run_dir: str, index: int, stage_key: str, generate: GenerateConfig, backend: BackendConfig, failure_budget: int = 0
) -> dict[str, Any]:
    """Sample `num_samples` trajectories per problem of one shard; failed requests fail the shard (then its retry)."""
    if shard_exists(run_dir, STAGE, index):
        return {"generate_s": 0.0}
    problems = read_rows(run_dir, "problems", index)
    with backend_session(backend) as b:
        requests = build_generation_requests(problems, generate, b.chat_prompt)
        t0 = time.perf_counter()
        results = b.generate(requests)
        elapsed = time.perf_counter() - t0
        model = b.model_id
    rows, failed = sample_rows(problems, requests, results, model)
    outcome = check_requests(STAGE, index, failed, [r.error for r in results if r.error], failure_budget)
    write_shard(Path(run_dir) / STAGE, index, make_table(rows, SAMPLES))
    return {"generate_s": elapsed, **outcome}

"""The verify stage: trajectories -> verdicts, in the library's killable verifier pool."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import task

from ckptdpo.configs import Recipe, VerifyConfig
from ckptdpo.schemas import VERDICTS, make_table
from ckptdpo.shards import write_shard
from ckptdpo.verdicts import verdict_items, verdict_rows
from ckptdpo.verify import verify_batch
from tasks.common import content_cache_key
from tasks.planning import RETRY, StagePlan, fingerprints, plan_stage, read_rows, shard_exists

STAGE = "verify"


def verify_key(cfg: VerifyConfig) -> dict[str, Any]:
    """The settings that change verdicts: the timeout decides which items end as `timeout`; the pool size does not."""
    return cfg.model_dump(mode="json", exclude={"workers"})


def plan_verify(run_dir: str, recipe: Recipe) -> StagePlan:
    inputs = fingerprints(run_dir, "problems", "generate")
    return plan_stage(run_dir, STAGE, inputs, verify_key(recipe.verify), shards_of="generate")


def verify_kwargs(cfg: VerifyConfig) -> dict[str, Any]:
    """`verify_batch` keyword arguments of a verify config (also used by resample, DTO and eval)."""
    return {"timeout_s": cfg.timeout_s, "workers": cfg.workers, "answer_format": cfg.answer_format}


@task(name="verify_samples", task_run_name="verify-shard-{index}", cache_key_fn=content_cache_key,
      persist_result=True, **RETRY)  # fmt: skip
def verify_shard(run_dir: str, index: int, stage_key: str, verify: VerifyConfig) -> dict[str, float]:
    """Verdicts for one shard of samples against the gold answers of the same problem shard."""
    if shard_exists(run_dir, STAGE, index):
        return {"verify_s": 0.0}
    gold = {p["problem_id"]: p["answer"] for p in read_rows(run_dir, "problems", index, ["problem_id", "answer"])}
    samples = read_rows(run_dir, "generate", index, ["sample_id", "problem_id", "completion", "finish_reason"])
    t0 = time.perf_counter()
    verdicts = verify_batch(verdict_items(samples, gold), **verify_kwargs(verify))
    elapsed = time.perf_counter() - t0
    write_shard(Path(run_dir) / STAGE, index, make_table(verdict_rows(samples, verdicts), VERDICTS))
    return {"verify_s": elapsed}

"""The verify stage: trajectories -> verdicts, in the library's killable verifier pool."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptdpo import summary
from ckptdpo.configs import VerifyConfig
from ckptdpo.report import format_counts
from ckptdpo.report import format_number as fmt
from ckptdpo.schemas import VERDICTS, make_table
from ckptdpo.shards import write_shard
from ckptdpo.verdicts import verdict_items, verdict_rows
from ckptdpo.verify import verify_batch
from tasks.planning import StagePlan, fingerprints, plan_stage, read_rows, read_stage_rows, shard_exists, shard_task
from tasks.stage import RunContext, Shard, ShardStep, Stage, Steps

NAME = "verify"
_SAMPLE_COLUMNS = ["sample_id", "problem_id", "completion", "finish_reason"]


def verify_key(cfg: VerifyConfig) -> dict[str, Any]:
    """The settings that change verdicts: the timeout decides which items end as `timeout`; the pool size does not."""
    return cfg.model_dump(mode="json", exclude={"workers"})


def verify_kwargs(cfg: VerifyConfig) -> dict[str, Any]:
    """`verify_batch` keyword arguments of a verify config (also used by resample, DTO and eval)."""
    return {"timeout_s": cfg.timeout_s, "workers": cfg.workers, "answer_format": cfg.answer_format}


@shard_task("verify_samples", "verify-shard-{shard.index}")
def verify_shard(shard: Shard, verify: VerifyConfig, failure_budget: int = 0) -> dict[str, float]:
    """Verdicts for one shard of samples against the gold answers of the same problem shard."""
    run_dir, index = shard.run_dir, shard.index
    if shard_exists(run_dir, NAME, index):
        return {"verify_s": 0.0}
    gold = {p["problem_id"]: p["answer"] for p in read_rows(run_dir, "problems", index, ["problem_id", "answer"])}
    samples = read_rows(run_dir, "generate", index, _SAMPLE_COLUMNS)
    t0 = time.perf_counter()
    verdicts = verify_batch(verdict_items(samples, gold), **verify_kwargs(verify))
    elapsed = time.perf_counter() - t0
    write_shard(Path(run_dir) / NAME, index, make_table(verdict_rows(samples, verdicts), VERDICTS))
    return {"verify_s": elapsed}


class Verify(Stage):
    """Trajectories -> verdicts (math-verify under a hard time limit)."""

    name = NAME
    reads = {"problems": ["problem_id", "answer"], "generate": _SAMPLE_COLUMNS}
    writes = {NAME: VERDICTS}
    pool = "cpu"
    lineage = True

    def plan(self, ctx: RunContext) -> StagePlan:
        inputs = fingerprints(ctx.run_dir, "problems", "generate")
        return plan_stage(ctx.run_dir, NAME, inputs, verify_key(ctx.recipe.verify), shards_of="generate")

    def steps(self, ctx: RunContext, plan: StagePlan) -> Steps:
        yield ShardStep(plan, verify_shard, {"verify": ctx.recipe.verify})

    def summarize(self, ctx: RunContext, plan: StagePlan, outcomes: list[Any]) -> dict[str, Any]:
        columns = ["problem_id", "status", "extracted_from"]
        return summary.summarize_verify(read_stage_rows(ctx.run_dir, NAME, columns, plan.indices))

    def headline(self, s: Mapping[str, Any]) -> str:
        by = s.get("by_status") or {}
        return (
            f"accuracy {fmt(s.get('accuracy'))} ({fmt(by.get('correct', 0))} of {fmt(s.get('num_samples'))} correct); "
            f"{format_counts(by)}"
        )


STAGE = Verify()

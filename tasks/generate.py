"""The generate stage: problems -> sampled trajectories, one task run per problem shard."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptdpo import summary
from ckptdpo.configs import BackendConfig, GenerateConfig
from ckptdpo.generation import build_generation_requests, sample_rows
from ckptdpo.problems import load_problems
from ckptdpo.report import format_counts
from ckptdpo.report import format_number as fmt
from ckptdpo.schemas import PROBLEMS, SAMPLES, make_table
from ckptdpo.shards import write_shard
from tasks.backends import backend_session
from tasks.environment import hub_offline
from tasks.planning import (
    StagePlan,
    backend_key,
    check_requests,
    fingerprints,
    plan_stage,
    read_rows,
    read_stage_rows,
    shard_exists,
    shard_task,
)
from tasks.problems import load_problems_stage
from tasks.stage import RunContext, Shard, ShardStep, Stage, Steps

NAME = "generate"
_SUMMARY_COLUMNS = ["problem_id", "completion_tokens", "finish_reason"]


@shard_task("generate_samples", "generate-shard-{shard.index}")
def generate_shard(
    shard: Shard, generate: GenerateConfig, backend: BackendConfig, failure_budget: int = 0
) -> dict[str, Any]:
    """Sample `num_samples` trajectories per problem of one shard; failed requests fail the shard (then its retry)."""
    run_dir, index = shard.run_dir, shard.index
    if shard_exists(run_dir, NAME, index):
        return {"generate_s": 0.0}
    problems = read_rows(run_dir, "problems", index)
    with backend_session(backend) as b:
        requests = build_generation_requests(problems, generate, b.chat_prompt)
        t0 = time.perf_counter()
        results = b.generate(requests)
        elapsed = time.perf_counter() - t0
        model = b.model_id
    rows, failed = sample_rows(problems, requests, results, model)
    outcome = check_requests(NAME, index, failed, [r.error for r in results if r.error], failure_budget)
    write_shard(Path(run_dir) / NAME, index, make_table(rows, SAMPLES))
    return {"generate_s": elapsed, **outcome}


class Generate(Stage):
    """Problems -> sampled trajectories."""

    name = NAME
    writes = {"problems": PROBLEMS, NAME: SAMPLES}
    lineage = True

    def plan(self, ctx: RunContext) -> StagePlan:
        """Load the problem source into problem shards, then key the stage by the problems, the sampling settings
        (not the shard size) and the model."""
        recipe = ctx.recipe
        load_problems_stage(ctx.run_dir, recipe.problems, recipe.generate.shard_size, ctx.base_dir)
        return plan_stage(
            ctx.run_dir,
            NAME,
            fingerprints(ctx.run_dir, "problems"),
            recipe.generate.model_dump(mode="json", exclude={"shard_size"}),
            backend_key(recipe.backend),
            ctx.fingerprint(recipe.backend),
            shards_of="problems",
        )

    def steps(self, ctx: RunContext, plan: StagePlan) -> Steps:
        params = {"generate": ctx.recipe.generate, "backend": ctx.recipe.backend}
        yield ShardStep(plan, generate_shard, params, failure_budget=ctx.recipe.failure_budget.generate)

    def summarize(self, ctx: RunContext, plan: StagePlan, outcomes: list[Any]) -> dict[str, Any]:
        stats = summary.summarize_generate(read_stage_rows(ctx.run_dir, NAME, _SUMMARY_COLUMNS, plan.indices))
        return {**stats, "generated_tokens": stats["completion_tokens"]}

    def headline(self, s: Mapping[str, Any]) -> str:
        mean = (s.get("completion_tokens_per_sample") or {}).get("mean")
        return (
            f"{fmt(s.get('num_samples'))} samples of {fmt(s.get('num_problems'))} problems, "
            f"{fmt(s.get('completion_tokens'))} tokens ({fmt(mean)} each); "
            f"ended by {format_counts(s.get('finish_reasons'))}"
        )

    def preflight(self, ctx: RunContext) -> None:
        """The problem source loads (a missing file or column is one sentence before anything is written)."""
        load_problems(ctx.recipe.problems, base_dir=Path(ctx.base_dir), offline=hub_offline())


STAGE = Generate()

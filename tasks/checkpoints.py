"""The checkpoints stage: trajectories + verdicts -> checkpoints per trajectory."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptdpo import summary
from ckptdpo.checkpoints import checkpoint_rows
from ckptdpo.configs import CheckpointConfig
from ckptdpo.report import ReportSection, sections
from ckptdpo.report import format_number as fmt
from ckptdpo.schemas import CHECKPOINTS, make_table
from ckptdpo.shards import write_shard
from tasks.planning import StagePlan, fingerprints, plan_stage, read_rows, read_stage_rows, shard_exists, shard_task
from tasks.stage import RunContext, Shard, ShardStep, Stage, Steps

NAME = "checkpoints"
_SAMPLE_COLUMNS = ["sample_id", "problem_id", "completion", "completion_tokens"]
_SUMMARY_COLUMNS = ["is_correct", "num_paragraphs", "num_checkpoints", "completion_tokens"]


@shard_task("locate_checkpoints", "checkpoints-shard-{shard.index}")
def checkpoint_shard(shard: Shard, checkpoints: CheckpointConfig, failure_budget: int = 0) -> dict[str, float]:
    run_dir, index = shard.run_dir, shard.index
    if shard_exists(run_dir, NAME, index):
        return {}
    samples = read_rows(run_dir, "generate", index, _SAMPLE_COLUMNS)
    verdicts = {
        v["sample_id"]: v["is_correct"] for v in read_rows(run_dir, "verify", index, ["sample_id", "is_correct"])
    }
    rows = checkpoint_rows(samples, verdicts, checkpoints.markers)
    write_shard(Path(run_dir) / NAME, index, make_table(rows, CHECKPOINTS))
    return {}


class Checkpoints(Stage):
    """Trajectories + verdicts -> checkpoints per trajectory."""

    name = NAME
    reads = {"generate": _SAMPLE_COLUMNS, "verify": ["sample_id", "is_correct"]}
    writes = {NAME: CHECKPOINTS}
    pool = "cpu"
    lineage = True
    report = (
        ReportSection(
            "lengths", "Trajectory lengths: correct vs incorrect", lambda r: sections.section_lengths(r.traj())
        ),
        ReportSection("checkpoints", "Checkpoints per trajectory", lambda r: sections.section_checkpoints(r.traj())),
    )

    def plan(self, ctx: RunContext) -> StagePlan:
        inputs = fingerprints(ctx.run_dir, "generate", "verify")
        config = ctx.recipe.checkpoints.model_dump(mode="json")
        return plan_stage(ctx.run_dir, NAME, inputs, config, shards_of="generate")

    def steps(self, ctx: RunContext, plan: StagePlan) -> Steps:
        yield ShardStep(plan, checkpoint_shard, {"checkpoints": ctx.recipe.checkpoints})

    def summarize(self, ctx: RunContext, plan: StagePlan, outcomes: list[Any]) -> dict[str, Any]:
        return summary.summarize_checkpoints(read_stage_rows(ctx.run_dir, NAME, _SUMMARY_COLUMNS, plan.indices))

    def headline(self, s: Mapping[str, Any]) -> str:
        by = s.get("by_correctness", {})
        means = ", ".join(f"{k} {fmt(v['checkpoints']['mean'])}" for k, v in by.items() if v.get("count"))
        return (
            f"{fmt(s.get('with_checkpoints'))} of {fmt(s.get('num_trajectories'))} trajectories have a checkpoint; "
            f"checkpoints per trajectory: {means}"
        )


STAGE = Checkpoints()

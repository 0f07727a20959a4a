"""The grpo stage: a cost-matched GRPO baseline, trained in a subprocess like the train stage.

Layout: `<run_dir>/grpo/` holds `job.yaml`, `grpo.log`, `checkpoint-*` (a retry resumes from the newest), `model/`,
`summary.json` and `_manifest.json`, written last. Keyed by the job (its config, the budget resolved from what the
factory generated, the base model) and the problems' content.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import task

from ckptdpo.grpo import GRPOJob, build_grpo_job, build_grpo_launch_command, build_grpo_merge_command
from ckptdpo.report import ReportSection
from ckptdpo.report import format_number as fmt
from ckptdpo.report.baseline import section_cost_matched
from ckptdpo.schemas import PROBLEMS
from ckptdpo.shards import read_manifest
from tasks.planning import StagePlan
from tasks.problems import load_problems_stage
from tasks.stage import RunContext
from tasks.train import TrainingStage, resolve_accelerate_config, retry_unless_user_error, run_training_job

NAME = "grpo"
LOG_FILE = "grpo.log"


def grpo_job(ctx: RunContext) -> GRPOJob:
    """The job of this run: its budget resolved from stats.json (what the factory generated to make its pairs)."""
    job = build_grpo_job(ctx.recipe, ctx.run_dir, ctx.model_path(ctx.recipe.backend.model))
    if job.grpo.accelerate_config:
        path = resolve_accelerate_config(job.grpo.accelerate_config, ctx.base_dir)
        job = job.model_copy(update={"grpo": job.grpo.model_copy(update={"accelerate_config": path})})
    return job


# Not cached by Prefect (see tasks/train.py): the stage's manifest says when it is done.
@task(name="grpo_model", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
def grpo_model(job: GRPOJob, key: str) -> dict[str, Any]:
    """Run one GRPO job into its output directory (then the LoRA merge); returns its summary."""
    return run_training_job(job, job.grpo, build_grpo_launch_command, build_grpo_merge_command, LOG_FILE, key)


class GRPO(TrainingStage):
    """GRPO from the base model on the run's problems, stopped at the generation budget the factory spent."""

    name = NAME
    settings = ("generate", "verify", "eval")
    keyed_by = ("problems",)
    writes = {"problems": PROBLEMS, NAME: None}
    pool = "gpu_train"
    report = (
        ReportSection("grpo", "Cost-matched baseline: GRPO", lambda r: section_cost_matched(r.run_dir, r.stats)),
    )

    def plan(self, ctx: RunContext) -> StagePlan:
        """Keyed by the job (its budget resolved) and the problems' content. Without a generate stage before it (a
        GRPO-only run with an explicit budget), it loads the problems itself."""
        if read_manifest(Path(ctx.run_dir) / "problems") is None:
            recipe = ctx.recipe
            load_problems_stage(ctx.run_dir, recipe.problems, recipe.generate.shard_size, ctx.base_dir)
        return super().plan(ctx)

    def job(self, ctx: RunContext) -> GRPOJob:
        return grpo_job(ctx)

    def run(self) -> Any:
        return grpo_model

    def headline(self, s: Mapping[str, Any]) -> str:
        return (
            f"{fmt(s.get('global_step'))} steps, {fmt(s.get('generated_tokens'))} tokens generated of a budget of "
            f"{fmt(s.get('generation_budget'))}, stopped by {s.get('stopped_by')}"
        )


STAGE = GRPO()

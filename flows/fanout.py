"""Running a stage's steps: one task run per shard still to write in a bounded window, or one job task."""

from __future__ import annotations

import functools
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from ckptdpo.configs import TaskRunnerConfig
from ckptdpo.shards import read_manifest
from flows import progress
from tasks.planning import StagePlan, finalize_stage, shards_written
from tasks.stage import JobStep, Shard, ShardStep


def fan_out(
    plan: StagePlan, task, *, in_flight: int = 2, runner: TaskRunnerConfig | None = None, **params: Any
) -> list[dict[str, Any]]:
    """One task run per shard still to write, at most `in_flight` at a time, with a progress artifact.

    The window bounds memory: each running task holds one shard, so peak memory follows the window, not the number
    of shards. A shard whose file is gone is recomputed even when Prefect's cache remembers it (the cache outlives a
    deleted run directory).
    """
    artifact = create_progress_artifact(progress=0.0, description=f"{plan.stage}: shards written")
    total = len(plan.indices)
    progress.publish(plan.stage, 0, total)

    options = {}
    if runner is not None:
        options = {"retries": runner.retries, "retry_delay_seconds": runner.retry_delay_s}
        if runner.task_timeout_s:
            options["timeout_seconds"] = runner.task_timeout_s

    def submit(i: int):
        refresh = not shards_written(plan, i)
        return task.with_options(refresh_cache=refresh, **options).submit(Shard(plan.run_dir, i, plan.key), **params)

    pending = [submit(i) for i in plan.indices[:in_flight]]
    results = []
    for done in range(1, total + 1):
        results.append(pending.pop(0).result())
        if done + len(pending) < total:
            pending.append(submit(plan.indices[done + len(pending)]))
        update_progress_artifact(artifact, progress=100.0 * done / max(total, 1))
        progress.publish(plan.stage, done, total)
    return results


def run_step(step: ShardStep | JobStep, runner: TaskRunnerConfig) -> Any:
    """Run one step of a stage; its outcome goes back to the stage's `steps` generator.

    A shard step with its own summary is finalized here (its directory's manifest) and returns its stats; one on the
    stage's own directory returns its shard results, which the stage's finalize checks and adds up.
    """
    if isinstance(step, JobStep):
        return step.task(**step.params)
    plan = step.plan
    if plan.done and not step.always_summarize:
        return (read_manifest(plan.directory) or {}).get("stats", {}) if step.summarize else []
    results = [] if plan.done else fan_out(
        plan, step.task, in_flight=runner.max_in_flight, runner=runner, failure_budget=step.failure_budget,
        **step.params,
    )  # fmt: skip
    if step.summarize is None:
        return results
    return finalize_stage(plan, results, functools.partial(step.summarize, plan), failure_budget=step.failure_budget)

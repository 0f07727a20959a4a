"""Fan-out of one stage's shards: one task run per shard still to write, a bounded window, a progress artifact."""

from __future__ import annotations

import inspect
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from ckptdpo.configs import TaskRunnerConfig
from flows import progress
from tasks.planning import StagePlan, finalize_stage, shard_exists


def fan_out(
    plan: StagePlan,
    task,
    refresh_stage: str,
    *,
    in_flight: int = 2,
    runner: TaskRunnerConfig | None = None,
    **params: Any,
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
        refresh = not shard_exists(plan.run_dir, refresh_stage, i)
        return task.with_options(refresh_cache=refresh, **options).submit(plan.run_dir, i, plan.key, **params)

    pending = [submit(i) for i in plan.indices[:in_flight]]
    results = []
    for done in range(1, total + 1):
        results.append(pending.pop(0).result())
        if done + len(pending) < total:
            pending.append(submit(plan.indices[done + len(pending)]))
        update_progress_artifact(artifact, progress=100.0 * done / max(total, 1))
        progress.publish(plan.stage, done, total)
    return results


def run_stage(
    plan: StagePlan, task, *, runner: TaskRunnerConfig, failure_budget: int = 0, **params: Any
) -> dict[str, Any]:
    """The sequence every sharded stage follows: skip when done, else fan out its shards, then finalize it."""
    if plan.done:
        return {"stage": plan.stage, "skipped": True}
    if "failure_budget" in inspect.signature(task.fn).parameters:
        params["failure_budget"] = failure_budget  # a shard tolerates its failed rows only within the stage's budget
    results = fan_out(plan, task, plan.stage, in_flight=runner.max_in_flight, runner=runner, **params)
    return finalize_stage(plan, results, failure_budget=failure_budget)

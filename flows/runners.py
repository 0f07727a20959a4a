"""The recipe's task runner: shard tasks run in threads of the flow's process, or on a Dask or Ray cluster.

Only where tasks run changes, never what they compute, so the task runner is no part of any cache key. Each stage
flow fans its shards out itself, so the runner is applied to every stage flow the pipeline calls, not only to the
pipeline flow. prefect-dask and prefect-ray are optional (`pip install 'ckptdpo[dask]'` or `'ckptdpo[ray]'`) and
imported only when a recipe asks for them.

A cluster runner is refused with an in-process backend (hf, vllm): every Dask or Ray worker process would load its own
copy of the model, and a persistent cluster keeps it loaded after the run. On a cluster the model is served once
(`vllm serve`) and the shard tasks reach it through `backend.kind: openai`.
"""

from __future__ import annotations

import importlib.util

from prefect import Flow
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from ckptdpo.configs import Recipe, TaskRunnerConfig
from ckptdpo.errors import UserError

_PACKAGES = {"dask": ("prefect_dask", "prefect-dask", "dask"), "ray": ("prefect_ray", "prefect-ray", "ray")}
IN_PROCESS_BACKENDS = ("hf", "vllm")


def check_task_runner(recipe: Recipe) -> None:
    """Refuse a Dask or Ray task runner with a backend that loads the model inside each task's process."""
    if recipe.task_runner.kind == "thread":
        return
    judge = recipe.dto.judge.backend if "dto" in recipe.stages and recipe.dto.prune else None
    for field, backend in (("backend", recipe.backend), ("dto.judge.backend", judge)):
        if backend is not None and backend.kind in IN_PROCESS_BACKENDS:
            raise UserError(
                f"recipe field task_runner.kind is {recipe.task_runner.kind!r} but {field}.kind is {backend.kind!r}, "
                "which would load the model in every cluster worker; use `backend.kind: openai` with served models "
                "or set task_runner.kind: thread."
            )
    make_task_runner(recipe.task_runner)  # a missing prefect-dask / prefect-ray is a user error too


def make_task_runner(cfg: TaskRunnerConfig) -> TaskRunner | None:
    """The task runner a recipe asks for; None means the flow's default (a thread pool)."""
    if cfg.kind == "thread":
        return ThreadPoolTaskRunner(max_workers=cfg.max_workers) if cfg.max_workers else None
    module, package, extra = _PACKAGES[cfg.kind]
    if importlib.util.find_spec(module) is None:
        raise UserError(
            f"recipe field task_runner.kind is {cfg.kind!r} but {package} is not installed; "
            f"run `pip install 'ckptdpo[{extra}]'` or set task_runner.kind: thread."
        )
    if cfg.kind == "dask":
        import dask
        from prefect_dask import DaskTaskRunner

        if cfg.address:
            return DaskTaskRunner(address=cfg.address)
        # Dask worker processes are daemonic by default, and a daemonic process may not start the verifier's
        # killable worker processes; a local cluster's nannies live in this process and read this setting.
        # (Workers of a remote cluster need DASK_DISTRIBUTED__WORKER__DAEMON=False in their environment.)
        dask.config.set({"distributed.worker.daemon": False})
        kwargs = {"n_workers": cfg.max_workers, "threads_per_worker": 1} if cfg.max_workers else {}
        return DaskTaskRunner(cluster_kwargs=kwargs)
    from prefect_ray import RayTaskRunner

    return RayTaskRunner(address=cfg.address) if cfg.address else RayTaskRunner()


def with_task_runner(stage_flow: Flow, cfg: TaskRunnerConfig) -> Flow:
    """`stage_flow` with the recipe's task runner (unchanged for the default thread pool)."""
    runner = make_task_runner(cfg)
    return stage_flow if runner is None else stage_flow.with_options(task_runner=runner)

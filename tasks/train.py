"""Prefect task: train on the pair shards in a subprocess (python, torchrun or accelerate launch).

Layout: `<run_dir>/train/` holds `job.yaml` (what the subprocess runs), `train.log`, `data/`, `checkpoint-*`,
`model/` (and `adapter/` for LoRA), `ranks/`, `summary.json` and `_manifest.json`, written last. A LoRA run is
followed by a second, single-process command that merges the adapter into `model/`. The stage is keyed by the
train config, the base model and the fingerprints of the pair stages: a stage left by an interrupted run under
the same key keeps its checkpoints, so a retry resumes from the newest one; a stage written under another key is
cleared first, so no run resumes from a checkpoint of a different config.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from pydantic import ValidationError

from ckptdpo.configs import describe_validation_error
from ckptdpo.errors import UserError
from ckptdpo.report import ReportSection, load_train_summary, sections
from ckptdpo.report import format_number as fmt
from ckptdpo.shards import read_manifest
from ckptdpo.train import FAULT_FIELDS, SUMMARY, TrainJob, build_launch_command, build_merge_command, write_job
from tasks.planning import StagePlan, fingerprints, plan_stage
from tasks.stage import JobStep, RunContext, Stage, Steps

NAME = "train"
JOB_FILE = "job.yaml"
LOG_FILE = "train.log"
PAIRS = "pairs"
_USER_ERROR = re.compile(r"^(?:\[rank\d+\]:\s*)?error: (.+)$")


class TrainFailed(RuntimeError):
    """The training subprocess exited with an error (retried: it resumes from its newest checkpoint)."""


def retry_unless_user_error(task, task_run, state) -> bool:
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # a result that cannot be read back: let the retry policy decide
        return True
    return not isinstance(exc, UserError)


def resolve_accelerate_config(path: str, base_dir: str) -> str:
    """An accelerate config path as given, else relative to the recipe's folder, else relative to the recipes/ root."""
    recipe_dir = Path(base_dir).resolve()
    for candidate in (Path(path).expanduser(), recipe_dir / path, recipe_dir.parent / path):
        if candidate.is_file():
            return str(candidate.resolve())
    raise UserError(f"train.accelerate_config '{path}' not found (also not next to the recipe in {recipe_dir}); "
                    "give a path to an accelerate YAML.")  # fmt: skip


def train_job(ctx: RunContext) -> TrainJob:
    """The job the training subprocess runs: the train config, the pairs, the base model's local path."""
    train = ctx.recipe.train
    if train.accelerate_config:
        train = train.model_copy(
            update={"accelerate_config": resolve_accelerate_config(train.accelerate_config, ctx.base_dir)}
        )
    pairs = Path(ctx.run_dir) / PAIRS
    if not (read_manifest(pairs) or {}).get("num_rows"):
        raise UserError(
            f"{pairs}: this run made no preference pairs, so there is nothing to train on; generate more "
            "problems or samples, or raise generate.max_tokens / resample.max_tokens so answers get finished."
        )
    try:
        return TrainJob(
            train=train,
            pairs_dirs=[str(pairs)],
            model=ctx.model_path(ctx.recipe.backend.model),
            output_dir=str(Path(ctx.run_dir) / NAME),
        )
    except ValidationError as e:
        raise UserError(describe_validation_error(e, "train job")) from None


# No Prefect result cache here: a cached result outlives a deleted run directory and would skip training with no
# model on disk. The stage's own manifest (same key, same pairs) says when it is done.
@task(name="train_model", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
def train_model(job: TrainJob, key: str) -> dict[str, Any]:
    """Run one training job into its output directory (python, torchrun or accelerate launch, then the LoRA merge);
    returns its summary."""
    return run_training_job(job, job.train, build_launch_command, build_merge_command, LOG_FILE, key)


def run_training_job(job: Any, config: Any, launch: Any, merge: Any, log_file: str, key: str) -> dict[str, Any]:
    """Write `job` into its output directory and run it there (`launch(job_path, config)`, then `merge(job_path)`
    when `config.lora`); returns the summary.json it wrote. Shared by the train and grpo stages."""
    stage = Path(job.output_dir)
    (stage / SUMMARY).unlink(missing_ok=True)  # a summary left by an earlier attempt is not this run's
    job_path = write_job(job, stage / JOB_FILE)
    commands = [launch(job_path, config)] + ([merge(job_path)] if config.lora else [])
    run_launched(commands, stage / log_file, key)
    return json.loads((stage / SUMMARY).read_text())


def run_launched(commands: list[list[str]], log_path: Path, key: str) -> None:
    """Run a training job's commands in order, streaming their output into the Prefect run log and `log_path`."""
    log = get_run_logger()
    for cmd in commands:
        log.info("key %s: %s", key, " ".join(cmd))
        _check(*_run_streaming(cmd, log_path, log), log_path)


def _check(rc: int, tail: list[str], log_path: Path) -> None:
    """A failed command is a UserError when it printed one, else a TrainFailed the retry policy retries."""
    if rc == 0:
        return
    # `python -m ckptdpo.train` prints a user error as one "error: ..." line (torchrun may prefix "[rankN]:").
    user = next((m.group(1) for line in reversed(tail) if (m := _USER_ERROR.match(line))), None)
    if user:
        raise UserError(user)
    raise TrainFailed(f"training exited with status {rc}; see {log_path}; last lines:\n" + "\n".join(tail))


def _run_streaming(cmd: list[str], log_path: Path, log) -> tuple[int, list[str]]:
    """Run `cmd`, sending each output line to the Prefect run log and to `log_path`; returns (status, last lines)."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    tail: deque[str] = deque(maxlen=20)
    with open(log_path, "a") as sink:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env, errors="replace"
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                line = line.rstrip()
                sink.write(line + "\n")
                if line:
                    tail.append(line)
                    log.info(line)
        finally:
            # A cancelled flow run must not leave the trainer behind.
            if proc.poll() is None:
                proc.kill()
            rc = proc.wait()
    return rc, list(tail)


class TrainingStage(Stage):
    """A stage that trains in a subprocess: keyed by its job (config, base model, what it trains on) and its inputs'
    content, not where it writes; one job step; the job's summary is its statistics. A stage left by an interrupted
    run under the same key keeps its checkpoints, so the run resumes from the newest one."""

    keyed_by: tuple[str, ...] = ()

    def job(self, ctx: RunContext) -> Any:
        raise NotImplementedError

    def run(self) -> Any:
        """The task that runs a job (`task(job=..., key=...)`)."""
        raise NotImplementedError

    def plan(self, ctx: RunContext) -> StagePlan:
        what = self.job(ctx).model_dump(mode="json", exclude={"output_dir", *FAULT_FIELDS})
        return plan_stage(ctx.run_dir, self.name, fingerprints(ctx.run_dir, *self.keyed_by), what, shards_of=None)

    def steps(self, ctx: RunContext, plan: StagePlan) -> Steps:
        yield JobStep(self.run(), {"job": self.job(ctx), "key": plan.key})

    def summarize(self, ctx: RunContext, plan: StagePlan, outcomes: list[Any]) -> dict[str, Any]:
        (summary,) = outcomes
        return summary


class Train(TrainingStage):
    """DPO / SimPO on the run's pairs."""

    name = NAME
    keyed_by = (PAIRS,)
    reads = {PAIRS: ["prompt", "chosen", "rejected", "pair_type", "problem_id"]}
    writes = {NAME: None}
    pool = "gpu_train"
    report = (
        ReportSection(
            "training", "Training curves", lambda r: sections.section_training(load_train_summary(r.run_dir))
        ),
    )

    def job(self, ctx: RunContext) -> TrainJob:
        return train_job(ctx)

    def run(self) -> Any:
        return train_model

    def headline(self, s: Mapping[str, Any]) -> str:
        pairs = s.get("pairs") or {}
        speed = s.get("tokens_per_s")
        return (
            f"{s.get('loss', '')} {fmt(s.get('global_step'))} steps on {fmt(pairs.get('num_train'))} pairs, "
            f"final loss {fmt(s.get('final_loss'))}" + (f", {fmt(speed)} tokens/s" if speed else "")
        )


STAGE = Train()

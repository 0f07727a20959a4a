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
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from pydantic import ValidationError

from ckptdpo.configs import TrainConfig, describe_validation_error
from ckptdpo.errors import UserError
from ckptdpo.shards import prepare_stage, read_manifest, update_stats, write_manifest
from ckptdpo.train import FAULT_FIELDS, SUMMARY, TrainJob, build_launch_command, build_merge_command, write_job
from tasks.common import content_key

STAGE = "train"
JOB_FILE = "job.yaml"
LOG_FILE = "train.log"
_USER_ERROR = re.compile(r"^(?:\[rank\d+\]:\s*)?error: (.+)$")


class TrainFailed(RuntimeError):
    """The training subprocess exited with an error (retried: it resumes from its newest checkpoint)."""


def _retry_unless_user_error(task, task_run, state) -> bool:
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # a result that cannot be read back: let the retry policy decide
        return True
    return not isinstance(exc, UserError)


def train_key(job: TrainJob, inputs: dict[str, str]) -> str:
    """Content key of a training run: train config, base model, pair fingerprints (not where it writes)."""
    what = job.model_dump(mode="json", exclude={"output_dir", *FAULT_FIELDS})
    return content_key(STAGE, what, inputs)[:16]


# No Prefect result cache here: a cached result outlives a deleted run directory and would skip training with no
# model on disk. The task checks the stage's own manifest (same key, same pairs) and returns at once when done.
@task(
    name="train_model",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_unless_user_error,
)
def train_model(
    run_dir: str, train: TrainConfig, model: str, pairs_dirs: list[str], pairs_fingerprints: dict[str, str]
) -> dict[str, Any]:
    """Run one training job into `<run_dir>/train`; returns its summary (also the `train` section of stats.json).

    `model` is the base model's local path; `pairs_fingerprints` (stage name -> fingerprint of each pair stage)
    makes the cache key follow the pairs' content.
    """
    log = get_run_logger()
    stage = Path(run_dir) / STAGE
    try:
        train_job = TrainJob(train=train, pairs_dirs=pairs_dirs, model=model, output_dir=str(stage))
    except ValidationError as e:
        raise UserError(describe_validation_error(e, "train job")) from None
    key = train_key(train_job, pairs_fingerprints)
    manifest = read_manifest(stage)
    if manifest and manifest.get("config_hash") == key and manifest.get("inputs") == pairs_fingerprints:
        log.info("train stage already done under key %s; skipping", key)
        return json.loads((stage / SUMMARY).read_text())
    prepare_stage(stage, key)
    (stage / SUMMARY).unlink(missing_ok=True)  # a summary left by an earlier attempt is not this run's
    job_path = write_job(train_job, stage / JOB_FILE)
    commands = [build_launch_command(job_path, train_job.train)]
    if train_job.train.lora:
        commands.append(build_merge_command(job_path))
    for cmd in commands:
        log.info("train key %s: %s", key, " ".join(cmd))
        _check(*_run_streaming(cmd, stage / LOG_FILE, log), stage / LOG_FILE)
    summary = json.loads((stage / SUMMARY).read_text())
    compact = {k: v for k, v in summary.items() if k not in ("steps", "ranks")}
    write_manifest(stage, config_hash=key, stats=compact, inputs=pairs_fingerprints)
    update_stats(run_dir, STAGE, summary)
    return summary


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

"""The train job file: the recipe's `train` section plus where the pairs, the base model and the outputs are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ckptdpo.configs import TrainConfig, describe_validation_error
from ckptdpo.errors import UserError

MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
DATA_DIR = "data"
SUMMARY = "summary.json"
RANKS_DIR = "ranks"
TRAINER_STATE = "trainer_state.json"
# Exit status of the fault injected by `TrainJob.fail_after_step` (EX_TEMPFAIL: worth retrying).
FAULT_EXIT_CODE = 75


class TrainJob(BaseModel):
    """One training run: the train config plus where the pairs, the base model and the outputs are."""

    model_config = ConfigDict(extra="forbid")

    train: TrainConfig = Field(default_factory=TrainConfig)
    pairs_dirs: list[str] = Field(min_length=1, description="completed pair stage directories (with _manifest.json)")
    model: str = Field(description="local path of the base model (and its tokenizer)")
    output_dir: str = Field(description="checkpoints, model/, ranks/ and summary.json go here")
    fail_after_step: int | None = Field(
        None, ge=1, description="testing: exit with status 75 right after the checkpoint of this step is saved"
    )
    kill_in_save_step: int | None = Field(
        None, ge=1, description="testing: SIGKILL the process while checkpoint-N is half written (no trainer_state)"
    )


# Fields that say how a test breaks a run, not what the run computes: never part of a cache key.
FAULT_FIELDS = frozenset({"fail_after_step", "kill_in_save_step"})


def load_job(path: str | Path, job_class: type[BaseModel] = TrainJob, what: str = "train") -> Any:
    """Read and validate a job YAML (a `job_class`, written by the `what` task); problems are one UserError."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: {what} job file not found; pass the YAML written by the {what} task.") from None
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read the {what} job ({' '.join(str(e).split())}); fix the file.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a {what} job must be a YAML mapping, got {type(data).__name__}.")
    try:
        return job_class.model_validate(data)
    except ValidationError as e:
        raise UserError(describe_validation_error(e, str(path))) from None


def write_job(job: BaseModel, path: str | Path) -> Path:
    """Write a job YAML atomically, for the launcher to pass by path."""
    from ckptdpo.shards import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False).encode())
    return path

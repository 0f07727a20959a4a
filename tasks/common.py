"""Plumbing shared by the Prefect tasks: the environment edge, run-dir layout and content cache keys."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect.context import TaskRunContext
from pydantic import BaseModel

# Task parameters that identify *where* work happens but not *what* it computes are still part of the key:
# a cache hit must mean "this exact output already exists in this run directory".
# The failure budget decides whether failed rows fail the shard, not what a written shard holds.
_IGNORED_PARAMS = frozenset({"progress", "failure_budget"})


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / stage


def _jsonable(value: Any) -> Any:
    # Typed configs enter keys as their JSON dump, so equal settings give equal keys whatever their Python form.
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return str(value)


def content_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=_jsonable, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def content_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key from the task's name and its (small) parameters: stage config, input hashes, model revision.

    Prefect's default policy includes the flow-run id and never hits across runs; this one does. Tasks take
    paths, hashes and typed configs as parameters, never row data, so hashing them is cheap.
    """
    params = {k: v for k, v in parameters.items() if k not in _IGNORED_PARAMS}
    return content_key(context.task.name, params)

"""What every stage shares: its plan (content key, shards to write), reading input shards, finishing it.

Every stage is planned the same way (`plan_stage`): its key is a content hash of the stage's config, the
fingerprints of its input stages and the model revision. A stage whose manifest carries that key and whose shards
are intact is done and skipped whole; otherwise one task run per input shard writes one output shard, keeping the
shards an interrupted run already wrote (complete by construction), and `finalize_stage` writes the manifest last.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from ckptdpo import summary
from ckptdpo.configs import BackendConfig
from ckptdpo.errors import UserError
from ckptdpo.shards import (
    check_shards_present,
    listed_shards,
    prepare_stage,
    read_shard,
    shard_path,
    stage_fingerprint,
    update_stats,
    write_manifest,
)
from tasks.common import content_key


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry I/O and model failures; a user error (bad recipe, bad file) fails the same way every time."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return True


RETRY = {
    "retries": 2,
    "retry_delay_seconds": [5, 30],
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": _retry_unless_user_error,
}


class StageFailed(RuntimeError):
    """Rows of a stage failed past its failure budget: the stage is not done (the next run retries them)."""


@dataclass
class StagePlan:
    """What a stage has to do: its directory, content key, and one job per shard still to write."""

    stage: str
    run_dir: str
    key: str
    done: bool
    indices: list[int] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    @property
    def directory(self) -> Path:
        return Path(self.run_dir) / self.stage


def plan_stage(run_dir: str, stage: str, inputs: dict[str, str], *key_parts: Any, shards_of: str) -> StagePlan:
    """Key the stage by content; clear it if it was written under another key; list the shards to write."""
    key = content_key(stage, inputs, *key_parts)[:16]
    plan = StagePlan(stage=stage, run_dir=run_dir, key=key, done=False, inputs=inputs)
    plan.done = prepare_stage(plan.directory, key)
    if not plan.done:
        plan.indices = list(range(len(listed_shards(Path(run_dir) / shards_of))))
    return plan


def fingerprints(run_dir: str, *stages: str) -> dict[str, str]:
    """Content fingerprints of finished input stages, after checking their shards are all there (cheap: sizes)."""
    out = {}
    for s in stages:
        directory = Path(run_dir) / s
        out[s] = stage_fingerprint(directory)
        check_shards_present(directory, f"run stage {s.split('/')[0]} again (it rewrites damaged shards)")
    return out


def shard_exists(run_dir: str, stage: str, index: int) -> bool:
    return shard_path(Path(run_dir) / stage, index).exists()


def read_rows(run_dir: str, stage: str, index: int, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of shard `index` of a stage (shard i of every stage comes from problem shard i)."""
    return read_shard(shard_path(Path(run_dir) / stage, index), columns=columns).to_pylist()


def read_stage_rows(run_dir: str, stage: str, columns: list[str], indices: list[int]) -> list[dict[str, Any]]:
    """Rows of the given shards of a stage being finished (its manifest is not written yet)."""
    rows: list[dict[str, Any]] = []
    for i in indices:
        rows.extend(read_rows(run_dir, stage, i, columns))
    return rows


def check_requests(what: str, index: int, ids: list[str], errors: list[str], budget: int) -> dict[str, Any]:
    """Failed requests of one shard: logged; past `budget` the shard task fails (nothing is written, Prefect retries
    it, a later run again); within it, the ids to list in the manifest so the next run retries them."""
    if not ids:
        return {}
    # A result without samples and without an error (a backend that broke its protocol) still gets a reason.
    silent = [f"{len(ids) - len(errors)} returned no sample and no error"] if len(ids) > len(errors) else []
    reasons = "; ".join(sorted(set(errors)) + silent)[:300]
    get_run_logger().warning("%s shard %d: %d request(s) failed: %s", what, index, len(ids), reasons)
    if len(ids) > budget:
        raise RuntimeError(f"{what} shard {index}: {len(ids)} request(s) failed (failure budget {budget}): {reasons}")
    return {"shard": f"part-{index:05d}.parquet", "failed": ids}


def check_failures(stage: str, shard_results: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """The failed rows the shards reported; past `budget` the stage fails and no manifest is written."""
    failed = [{"shard": r["shard"], "ids": r["failed"]} for r in shard_results if r.get("failed")]
    count = sum(len(f["ids"]) for f in failed)
    if count > budget:
        raise StageFailed(
            f"stage {stage}: {count} row(s) failed after retries (failure budget {budget}); the stage is not done. "
            "Fix the cause (e.g. the endpoint) and run again: finished shards are kept."
        )
    return failed


_SUMMARIES = {
    "generate": (summary.summarize_generate, ["problem_id", "completion_tokens", "finish_reason"]),
    "verify": (summary.summarize_verify, ["problem_id", "status", "extracted_from"]),
    "checkpoints": (
        summary.summarize_checkpoints,
        ["is_correct", "num_paragraphs", "num_checkpoints", "completion_tokens"],
    ),
}
_ROUND_COLUMNS = ["direction", "source_sample_id", "checkpoint_index", "status", "finish_reason", "completion_tokens"]


@task(name="finalize_stage", **RETRY)
def finalize_stage(
    plan: StagePlan, shard_results: list[dict[str, Any]], extra: dict[str, Any] | None = None, failure_budget: int = 0
) -> dict:
    """Summarize the stage, write its manifest last, and its section of stats.json; publish a table artifact."""
    failed = check_failures(plan.stage, shard_results, failure_budget)
    missing = [i for i in plan.indices if not shard_exists(plan.run_dir, plan.stage, i)]
    if missing:
        raise StageFailed(f"stage {plan.stage}: shards {missing[:5]} were not written; the stage is not done.")
    stats = dict(extra or {})
    if plan.stage in _SUMMARIES:
        fn, columns = _SUMMARIES[plan.stage]
        stats.update(fn(read_stage_rows(plan.run_dir, plan.stage, columns, plan.indices)))
    elif plan.stage.startswith("resample/round-"):
        stats.update(summary.summarize_round(read_stage_rows(plan.run_dir, plan.stage, _ROUND_COLUMNS, plan.indices)))
    if plan.stage == "generate":
        stats["generated_tokens"] = stats["completion_tokens"]
    for name in ("generate_s", "verify_s", "prompt_tokens_requested", "prompt_tokens_computed"):
        total = sum(r.get(name, 0) for r in shard_results)
        if total:
            stats[name] = round(total, 3)
    dropped = sum((Counter(r.get("dropped") or {}) for r in shard_results), Counter())
    if dropped:
        stats["dropped"] = dict(sorted(dropped.items()))
    if failed:
        stats["failed_rows"] = sum(len(f["ids"]) for f in failed)
    stats["wall_s"] = round(time.time() - plan.started, 3)
    write_manifest(plan.directory, config_hash=plan.key, stats=stats, inputs=plan.inputs, failed=failed)
    update_stats(plan.run_dir, plan.stage, stats)
    publish_table(plan.run_dir, plan.stage, stats)
    return stats


def artifact_key(run_dir: str, name: str) -> str:
    """A Prefect artifact key per run directory (keys allow lowercase letters, digits and dashes)."""
    slug = "".join(c if c.isalnum() else "-" for c in f"{Path(run_dir).name}-{content_key(str(run_dir))[:8]}")
    return f"{slug}-{name}".lower().replace("_", "-").replace("/", "-")


def publish_table(run_dir: str, stage: str, stats: dict[str, Any]) -> None:
    """A flat key/value table artifact of a stage's statistics, for the Prefect UI."""
    rows = [{"metric": k, "value": str(v)} for k, v in _flatten(stats).items()]
    create_table_artifact(
        table=rows, key=artifact_key(run_dir, f"{stage}-summary"), description=f"ckptdpo {stage} statistics"
    )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v and len(v) <= 12:
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def backend_key(cfg: BackendConfig) -> dict[str, Any]:
    """The backend settings that change what is generated (not how fast)."""
    return cfg.model_dump(
        mode="json", include={"kind", "model", "dtype", "loop_guard", "loop_min_repeats", "loop_ngram", "script"}
    )

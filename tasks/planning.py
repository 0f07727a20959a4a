"""What every stage shares: its plan (content key, shards to write), reading input shards, finishing it.

Every stage is planned the same way (`plan_stage`): its key is a content hash of the stage's config, the
fingerprints of its input stages and the model revision. A stage whose manifest carries that key and whose shards
are intact is done and skipped whole; otherwise one task run per input shard writes one output shard, keeping the
shards an interrupted run already wrote (complete by construction), and `finalize_stage` writes the manifest last.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from ckptdpo.configs import BackendConfig
from ckptdpo.errors import UserError
from ckptdpo.shards import (
    check_shards_present,
    listed_shards,
    prepare_stage,
    read_manifest,
    read_shard,
    shard_path,
    stage_fingerprint,
    update_stats,
    write_manifest,
)
from tasks.common import content_cache_key, content_key
from tasks.stage import StagePlan


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry I/O and model failures; a user error (bad recipe, bad file) fails the same way every time."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return True


RETRY_ONLY = {
    "retries": 2,
    "retry_delay_seconds": [5, 30],
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": _retry_unless_user_error,
}
# Shard tasks: retried, and cached by content (`content_cache_key`) so a rerun's task runs hit.
RETRY = RETRY_ONLY


def shard_task(name: str, run_name: str):
    """The decorator of a stage's shard task: retried (never for a user error), cached by content, so a rerun's task
    runs hit; `run_name` names each run in the UI (it may use the task's parameters)."""
    return task(name=name, task_run_name=run_name, cache_key_fn=content_cache_key, persist_result=True, **RETRY)


class StageFailed(RuntimeError):
    """Rows of a stage failed past its failure budget: the stage is not done (the next run retries them)."""


def plan_stage(
    run_dir: str,
    stage: str,
    inputs: dict[str, str],
    *key_parts: Any,
    shards_of: str | None,
    outputs: Sequence[str] = (),
) -> StagePlan:
    """Key the stage by content; clear it if it was written under another key; list the shards to write.

    `outputs`: more directories the same shard tasks write (one shard each per input shard), under the same key; the
    stage is done only when all of them are. `shards_of` None: a stage without shards (training), planned only.
    """
    from tasks.registry import schema_of

    key = content_key(stage, inputs, *key_parts)[:16]
    plan = StagePlan(stage=stage, run_dir=run_dir, key=key, done=False, inputs=inputs, outputs=list(outputs))
    # A shard of another schema (another stage's file under this name) is damaged like a truncated one: rewritten.
    done = [prepare_stage(Path(run_dir) / d, key, schema=schema_of(d)) for d in plan.directories]
    plan.done = all(done)
    if not plan.done and shards_of is not None:
        plan.indices = list(range(len(listed_shards(Path(run_dir) / shards_of))))
    return plan


def fingerprints(run_dir: str, *stages: str) -> dict[str, str]:
    """Content fingerprints of finished input stages, after checking their shards are all there (cheap: sizes)."""
    from tasks.registry import producer_of, schema_of

    out = {}
    for s in stages:
        directory = Path(run_dir) / s
        out[s] = stage_fingerprint(directory)
        fix = f"run stage {producer_of(s) or s.split('/')[0]} again (it rewrites damaged shards)"
        check_shards_present(directory, fix, schema=schema_of(s))
    return out


def shard_exists(run_dir: str, stage: str, index: int) -> bool:
    return shard_path(Path(run_dir) / stage, index).exists()


def shards_written(plan: StagePlan, index: int) -> bool:
    """Shard `index` is written in every directory of the plan (a task that writes several writes all or redoes)."""
    return all(shard_exists(plan.run_dir, d, index) for d in plan.directories)


def read_rows(run_dir: str, stage: str, index: int, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of shard `index` of a stage (shard i of every stage comes from problem shard i)."""
    return read_shard(shard_path(Path(run_dir) / stage, index), columns=columns).to_pylist()


def read_stage_rows(run_dir: str, stage: str, columns: list[str] | None, indices: list[int]) -> list[dict[str, Any]]:
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


TOTALS = ("generate_s", "verify_s", "prompt_tokens_requested", "prompt_tokens_computed", "failed_requests")


def shard_totals(shard_results: list[dict[str, Any]]) -> dict[str, Any]:
    """What every stage's shard tasks report and its manifest adds up: model time, prompt tokens, dropped rows."""
    stats: dict[str, Any] = {}
    for name in TOTALS:
        total = sum(r.get(name, 0) for r in shard_results)
        if total:
            stats[name] = round(total, 3)
    dropped = sum((Counter(r.get("dropped") or {}) for r in shard_results), Counter())
    if dropped:
        stats["dropped"] = dict(sorted(dropped.items()))
    return stats


@task(name="finalize_stage", cache_policy=NO_CACHE, **RETRY_ONLY)
def finalize_stage(
    plan: StagePlan,
    shard_results: list[dict[str, Any]],
    summarize: Callable[[], dict[str, Any]],
    failure_budget: int = 0,
    section: str | None = None,
    published: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> dict:
    """Check a stage's (or step's) shards, summarize it, write its manifest last (its outputs' manifests before it),
    and, given a `section`, its stats.json section (`published` picks what goes there) and a table artifact.

    A plan that was already done is only re-summarized (eval after its k list changed): the failures and timings the
    run that wrote its shards recorded are kept.
    """
    if plan.done:
        old = read_manifest(plan.directory) or {}
        failed = old.get("failed", [])
        kept = {k: v for k, v in old.get("stats", {}).items() if k.endswith("_s") or k in TOTALS}
    else:
        failed = check_failures(plan.stage, shard_results, failure_budget)
        for directory in plan.directories:
            missing = [i for i in plan.indices if not shard_exists(plan.run_dir, directory, i)]
            if missing:
                raise StageFailed(f"stage {directory}: shards {missing[:5]} were not written; the stage is not done.")
        kept = {**shard_totals(shard_results), "wall_s": round(time.time() - plan.started, 3)}
        if failed:
            kept["failed_rows"] = sum(len(f["ids"]) for f in failed)
    stats = {**summarize(), **kept}
    for output in plan.outputs:
        write_manifest(Path(plan.run_dir) / output, config_hash=plan.key, inputs=plan.inputs)
    write_manifest(plan.directory, config_hash=plan.key, stats=stats, inputs=plan.inputs, failed=failed)
    # A step's table artifact (a resampling round, say) shows in the UI next to its stage's.
    if section is None:
        publish_table(plan.run_dir, plan.stage, stats)
        return stats
    shown = (published or dict)(stats)
    update_stats(plan.run_dir, section, shown)
    publish_table(plan.run_dir, section, shown)
    return shown


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

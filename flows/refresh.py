"""The incremental refresh (the `nightly-refresh` deployment): run the pipeline over what is new in the problem
source, publish a new dated version of the pair dataset, move `latest`, and train once enough new pairs arrived.

Layout of a data directory:

    state.json                      what is processed: lineage, problem content hashes, latest version, pending run
    runs/<version>/                 the pipeline run of one refresh, over that refresh's new problems only
    versions/<version>/pairs/       part-*.parquet + _manifest.json: every pair of the lineage so far
    versions/<version>/version.json counts, the previous version, the run it came from
    latest -> versions/<version>    a symlink, replaced atomically (temporary symlink + rename)
    train/<version>/                a training run on that version (its `pairs` links to the version's pairs)

A version is complete and immutable: the previous version's shards are hard-linked into it (no writer ever
changes a shard in place: shards are replaced by rename), then the new pairs are appended, so
`load_dataset("parquet", data_files="<data_dir>/latest/pairs/*.parquet")` always gets the whole dataset and an
older version never changes. A problem is new when its id was never processed in this lineage or its content
(problem, answer) changed; a changed problem's old pairs are left out of the new version. Problems that left the
source keep their pairs. The lineage is the model fingerprint plus every setting that decides which pairs come
out; when it changes (a new model revision, say) every problem is new again and the version starts empty, so
pairs of two policies are never mixed. A problem is recorded as processed only when it got verified samples, so
a night with the generation endpoint down leaves its problems new for the next refresh.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from ckptdpo.configs import ProblemsConfig, Recipe
from ckptdpo.errors import UserError
from ckptdpo.lineage import fresh_state, lineage_key, read_state, record_processed, version_name, write_state
from flows.pipeline import pipeline_flow
from flows.runners import check_task_runner
from flows.stage import stage_flow
from tasks import registry
from tasks.planning import backend_key
from tasks.refresh import (
    LATEST,
    find_verified_problems,
    point_latest,
    publish_version,
    read_new_problems,
    refresh_lock,
    select_new_problems,
)
from tasks.stage import RunContext


@flow(name="refresh", flow_run_name="refresh {data_dir}", timeout_seconds=7 * 24 * 3600)
def refresh_flow(recipe_path: str, data_dir: str, overrides: dict[str, Any] | None = None) -> dict:
    """Process what is new since the last refresh into a new version of the pair dataset; train past a threshold."""
    recipe_path = str(Path(recipe_path).resolve())
    recipe = Recipe.from_yaml(recipe_path, overrides)
    check_task_runner(recipe)
    data_stages = [s.name for s in registry.data_stages()]
    wanted = [s for s in recipe.stages if s in data_stages]
    makers = [s.name for s in registry.registry().values() if s.pairs]
    if not set(makers) & set(wanted):
        raise UserError(f"{recipe_path}: stages has none of {', '.join(makers)}, so a refresh makes no pairs; add one")
    data = Path(data_dir).resolve()
    with refresh_lock(data):
        meta = _refresh_locked(recipe, recipe_path, data, overrides, wanted)
    if meta.get("version"):
        create_markdown_artifact(
            key="refresh", markdown=refresh_report(data, meta), description=f"pair dataset {meta['version']}"
        )
    return meta


def _refresh_locked(
    recipe: Recipe, recipe_path: str, data: Path, overrides: dict[str, Any] | None, wanted: list[str]
) -> dict[str, Any]:
    log = get_run_logger()
    state = read_state(data)
    base = RunContext(recipe=recipe, run_dir=str(data), base_dir=str(Path(recipe_path).parent))
    lineage = lineage_key(
        recipe, base.fingerprint(recipe.backend), backend_key(recipe.backend), wanted, registry.lineage_sections()
    )
    if state.get("lineage") != lineage:
        if state:
            log.info("model or pair settings changed: a new lineage, every problem is processed again")
        state = fresh_state(lineage, state)
    # An unfinished refresh of the same lineage is resumed in its run directory (complete shards are kept).
    version = state.get("pending") or _fresh_version(data, datetime.now(timezone.utc))
    run_dir = data / "runs" / version
    scan = select_new_problems(recipe_path, recipe.problems.model_dump(mode="json"), str(run_dir), state["problems"])
    log.info("%d problems in the source, %d new or changed", scan["num_source"], scan["num_new"])
    if not scan["num_new"]:
        if state.get("latest"):
            point_latest(data, state["latest"])  # repairs a pointer a crash left behind
        shutil.rmtree(run_dir, ignore_errors=True)
        state.pop("pending", None)
        write_state(data, state)
        return {"version": None, "latest": state.get("latest"), "new_problems": 0, "num_source": scan["num_source"]}
    # Written before the run: a refresh that fails (endpoint down, crash) leaves `pending` and records nothing, so
    # the next one resumes this run directory with the same problems still new.
    state["pending"] = version
    write_state(data, state)

    # The pipeline sees only the new problems: the user's own problem settings are already in the file.
    new = recipe.model_copy(update={"problems": ProblemsConfig(source="file", path=scan["path"])})
    ctx = base.model_copy(update={"recipe": new, "run_dir": str(run_dir)})
    pipeline_flow(run_dir=str(run_dir), stages_to_run=wanted, ctx=ctx)
    return _publish(recipe, recipe_path, data, overrides, state, version, run_dir, scan, lineage)


def _publish(recipe, recipe_path, data, overrides, state, version, run_dir, scan, lineage) -> dict[str, Any]:
    """Publish the run's pairs as a new version, record the problems that got verified samples, maybe train."""
    log = get_run_logger()
    info = {
        "lineage": lineage,
        "new_problems": scan["num_new"],
        "changed_problems": len(scan["changed"]),
        "num_source": scan["num_source"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    previous = state.get("previous_in_lineage")
    meta = publish_version(str(data), version, previous, str(run_dir), scan["changed"], info)

    verified = set(find_verified_problems(str(run_dir)))
    recorded, left = record_processed(state, read_new_problems(run_dir), verified)
    if left:
        log.warning("%d problems got no verified samples (%s...): left new for the next refresh", len(left), left[:5])
    meta.update(recorded_problems=len(recorded), unverified_problems=left)
    new_train_pairs = sum(n for t, n in meta["new_by_type"].items() if t in recipe.train.pair_types)
    state.update(latest=version, previous_in_lineage=version)
    state["pairs_since_training"] = state.get("pairs_since_training", 0) + new_train_pairs
    state.pop("pending")
    write_state(data, state)
    point_latest(data, version)
    log.info("version %s: %d pairs (%d new); latest -> %s", version, meta["num_pairs"], meta["new_pairs"], version)

    meta["training"] = _maybe_train(recipe, recipe_path, data, version, overrides, state)
    write_state(data, state)
    return meta


def _fresh_version(data: Path, now: datetime) -> str:
    base = version_name(now)
    name, n = base, 1
    while (data / "versions" / name).exists() or (data / "runs" / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def _maybe_train(
    recipe: Recipe, recipe_path: str, data: Path, version: str, overrides: dict[str, Any] | None, state: dict
) -> dict[str, Any] | None:
    """Train on the new version once `refresh.train_threshold` new pairs arrived since the last training."""
    cfg = recipe.refresh
    if cfg.train_threshold is None or state["pairs_since_training"] < cfg.train_threshold:
        return None
    train_dir = data / "train" / version
    train_dir.mkdir(parents=True, exist_ok=True)
    link = train_dir / "pairs"
    if not link.is_symlink():
        os.symlink(Path("..", "..", "versions", version, "pairs"), link)
    if cfg.train_deployment:
        from prefect.deployments import run_deployment

        # Fire and forget: training runs on the deployment's (GPU) pool, not inside this refresh.
        params = {"stage": "train", "recipe_path": recipe_path, "run_dir": str(train_dir), "overrides": overrides}
        run = run_deployment(cfg.train_deployment, parameters=params, timeout=0)
        result = {"deployment": cfg.train_deployment, "flow_run_id": str(run.id), "run_dir": str(train_dir)}
    else:
        ctx = RunContext(recipe=recipe, run_dir=str(train_dir), base_dir=str(Path(recipe_path).parent))
        result = {"run_dir": str(train_dir), "summary": stage_flow("train", run_dir=str(train_dir), ctx=ctx)}
    state.update(pairs_since_training=0, last_training=version)
    return result


def refresh_report(data: Path, meta: dict[str, Any]) -> str:
    rows = "\n".join(f"| {t} | {n} | {meta['new_by_type'].get(t, 0)} |" for t, n in meta["by_type"].items())
    return (
        f"# Pair dataset {meta['version']}\n\n`{data / LATEST}` -> `versions/{meta['version']}`; previous version: "
        f"`{meta['previous']}`\n\n{meta['new_problems']} new problems ({meta['changed_problems']} changed) of "
        f"{meta['num_source']} in the source; {meta['num_pairs']} pairs, {meta['new_pairs']} new, "
        f"{meta['dropped_pairs']} dropped.\n\n| pair type | pairs | new |\n| --- | --- | --- |\n{rows}\n"
    )

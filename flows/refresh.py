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
pairs of two policies are never mixed.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from ckptdpo.configs import Recipe
from ckptdpo.errors import UserError
from ckptdpo.problems import load_problems
from ckptdpo.shards import (
    atomic_write_bytes,
    content_id,
    list_shards,
    read_shard,
    shard_path,
    write_manifest,
    write_shard,
)
from flows.pipeline import DATA_STAGES, pipeline_flow
from tasks.backends import model_fingerprint
from tasks.common import load_recipe
from tasks.environment import hub_offline
from tasks.planning import backend_key

STATE = "state.json"
LATEST = "latest"
NEW_PROBLEMS = "new_problems.jsonl"
PAIR_STAGES = ("resample", "dto")
# Settings of the recipe that decide which pairs come out (not how fast): a change starts a new lineage.
LINEAGE_SECTIONS = ("generate", "verify", "checkpoints", "resample", "dto")
_NOT_LINEAGE = {"generate": {"shard_size"}, "verify": {"workers"}, "resample": {"shard_size"}}


def version_name(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y%m%d-%H%M%S")


def lineage_key(recipe: Recipe, model: str, wanted: list[str]) -> str:
    parts = {s: getattr(recipe, s).model_dump(mode="json", exclude=_NOT_LINEAGE.get(s)) for s in LINEAGE_SECTIONS}
    return content_id("lineage", model, backend_key(recipe.backend), parts, sorted(wanted))


def problem_hash(row: dict[str, Any]) -> str:
    return content_id(row["problem"], row["answer"])


def read_state(data_dir: Path) -> dict[str, Any]:
    path = data_dir / STATE
    return json.loads(path.read_text()) if path.exists() else {}


def write_state(data_dir: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(data_dir / STATE, json.dumps(state, indent=1, sort_keys=True).encode())


@contextmanager
def refresh_lock(data_dir: Path):
    """One refresh per data directory at a time; a second one fails at once instead of interleaving versions."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".refresh.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{data_dir}: another refresh is running on this data directory; wait for it.") from None
        yield


# --- tasks ---------------------------------------------------------------------------------------------------------


@task(name="select_new_problems", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def select_new_problems(recipe_path: str, problems: dict, run_dir: str, seen: dict[str, str]) -> dict[str, Any]:
    """Load the problem source and write the problems that are new (or changed) to `<run_dir>/new_problems.jsonl`."""
    recipe = Recipe.model_validate({"problems": problems})
    source = load_problems(recipe.problems, base_dir=Path(recipe_path).resolve().parent, offline=hub_offline())
    new = [r for r in source.rows if seen.get(r["problem_id"]) != problem_hash(r)]
    changed = sorted(r["problem_id"] for r in new if r["problem_id"] in seen)
    path = Path(run_dir) / NEW_PROBLEMS
    if new:
        lines = (json.dumps({"id": r["problem_id"], "problem": r["problem"], "answer": r["answer"]}) for r in new)
        atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode())
    return {"num_source": len(source.rows), "num_new": len(new), "changed": changed, "path": str(path)}


@task(name="publish_version", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def publish_version(
    data_dir: str, version: str, previous: str | None, run_dir: str, drop_problems: list[str], info: dict[str, Any]
) -> dict[str, Any]:
    """`versions/<version>/pairs`: the previous version's pairs (hard links) minus dropped problems, plus new pairs.

    Built under a hidden name and renamed into place, so a version directory either is complete or does not exist.
    """
    versions = Path(data_dir) / "versions"
    final, tmp = versions / version, versions / f".{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    out = tmp / "pairs"
    out.mkdir(parents=True)
    drop = pa.array(drop_problems, type=pa.string())
    seen: set[str] = set()
    counts: Counter[str] = Counter()
    index = carried = dropped = 0
    if previous:
        for shard in list_shards(versions / previous / "pairs"):
            table = read_shard(shard)
            keep = pc.invert(pc.is_in(table.column("problem_id"), value_set=drop))
            kept = table.filter(keep)
            dropped += table.num_rows - kept.num_rows
            if kept.num_rows == table.num_rows:
                _link_or_copy(shard, shard_path(out, index))
            elif kept.num_rows:
                write_shard(out, index, kept)
            else:
                continue
            index += 1
            carried += kept.num_rows
            seen.update(kept.column("pair_id").to_pylist())
            counts.update(kept.column("pair_type").to_pylist())
    new_by_type: Counter[str] = Counter()
    for shard in list_shards(Path(run_dir) / "pairs"):
        table = read_shard(shard)
        old = pa.array(sorted(seen), type=pa.string())
        fresh = table.filter(pc.invert(pc.is_in(table.column("pair_id"), value_set=old)))
        if not fresh.num_rows:
            continue
        write_shard(out, index, fresh)
        index += 1
        seen.update(fresh.column("pair_id").to_pylist())
        new_by_type.update(fresh.column("pair_type").to_pylist())
    counts.update(new_by_type)
    stats = {
        "num_pairs": sum(counts.values()),
        "by_type": dict(sorted(counts.items())),
        "new_pairs": sum(new_by_type.values()),
        "new_by_type": dict(sorted(new_by_type.items())),
        "carried_pairs": carried,
        "dropped_pairs": dropped,
    }
    write_manifest(out, config_hash=info["lineage"], stats=stats, inputs={"previous": previous or "", "run": run_dir})
    meta = {"version": version, "previous": previous, "run_dir": run_dir, **info, **stats}
    atomic_write_bytes(tmp / "version.json", json.dumps(meta, indent=1, sort_keys=True).encode())
    # A version directory that state.json does not name is the leftover of a crash before the commit: never read.
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return meta


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


def point_latest(data_dir: Path, version: str) -> None:
    """Move `latest` to `versions/<version>` atomically: readers see the old or the new version, never neither."""
    tmp = data_dir / f".{LATEST}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(Path("versions") / version, tmp)
    os.replace(tmp, data_dir / LATEST)


# --- the flow ------------------------------------------------------------------------------------------------------


@flow(name="refresh")
def refresh_flow(recipe_path: str, data_dir: str, overrides: dict[str, Any] | None = None) -> dict:
    """Process what is new since the last refresh into a new version of the pair dataset; train past a threshold."""
    log = get_run_logger()
    recipe_path = str(Path(recipe_path).resolve())
    recipe = load_recipe(recipe_path, overrides)
    wanted = [s for s in recipe.stages if s in (*DATA_STAGES, "dto")]
    if not set(PAIR_STAGES) & set(wanted):
        raise UserError(f"{recipe_path}: stages has neither resample nor dto, so a refresh makes no pairs; add one.")
    data = Path(data_dir).resolve()
    with refresh_lock(data):
        state = read_state(data)
        lineage = lineage_key(recipe, model_fingerprint(recipe.backend), wanted)
        if state.get("lineage") != lineage:
            if state:
                log.info("model or pair settings changed: a new lineage, every problem is processed again")
            state = {"lineage": lineage, "problems": {}, "latest": state.get("latest"), "pairs_since_training": 0}
        # An unfinished refresh of the same lineage is resumed in its run directory (complete shards are kept).
        pending = state.get("pending")
        version = pending or _fresh_version(data, datetime.now(timezone.utc))
        run_dir = data / "runs" / version
        scan = select_new_problems(
            recipe_path, recipe.problems.model_dump(mode="json"), str(run_dir), state["problems"]
        )
        log.info("%d problems in the source, %d new or changed", scan["num_source"], scan["num_new"])
        if not scan["num_new"]:
            if state.get("latest"):
                point_latest(data, state["latest"])  # repairs a pointer a crash left behind
            shutil.rmtree(run_dir, ignore_errors=True)
            state.pop("pending", None)
            write_state(data, state)
            return {
                "version": None,
                "latest": state.get("latest"),
                "new_problems": 0,
                "num_source": scan["num_source"],
            }
        state["pending"] = version
        write_state(data, state)

        # The pipeline sees only the new problems: the user's own problem overrides are already in the file.
        run_overrides = {k: v for k, v in (overrides or {}).items() if not k.startswith("problems")}
        run_overrides["problems"] = {"source": "file", "path": scan["path"]}
        pipeline_flow(recipe_path, str(run_dir), run_overrides, wanted)

        info = {
            "lineage": lineage,
            "new_problems": scan["num_new"],
            "changed_problems": len(scan["changed"]),
            "num_source": scan["num_source"],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        previous = state.get("previous_in_lineage")
        meta = publish_version(str(data), version, previous, str(run_dir), scan["changed"], info)

        for line in (run_dir / NEW_PROBLEMS).read_text().splitlines():
            row = json.loads(line)
            state["problems"][row["id"]] = problem_hash(row)
        new_train_pairs = sum(n for t, n in meta["new_by_type"].items() if t in recipe.train.pair_types)
        state.update(latest=version, previous_in_lineage=version)
        state["pairs_since_training"] = state.get("pairs_since_training", 0) + new_train_pairs
        state.pop("pending")
        write_state(data, state)
        point_latest(data, version)
        log.info("version %s: %d pairs (%d new); latest -> %s", version, meta["num_pairs"], meta["new_pairs"], version)

        meta["training"] = _maybe_train(recipe, recipe_path, data, version, overrides, state)
        write_state(data, state)
    create_markdown_artifact(key="refresh", markdown=_report(data, meta), description=f"pair dataset {version}")
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
    params = {"recipe_path": recipe_path, "run_dir": str(train_dir), "overrides": overrides}
    if cfg.train_deployment:
        from prefect.deployments import run_deployment

        # Fire and forget: training runs on the deployment's (GPU) pool, not inside this refresh.
        run = run_deployment(cfg.train_deployment, parameters=params, timeout=0)
        result = {"deployment": cfg.train_deployment, "flow_run_id": str(run.id), "run_dir": str(train_dir)}
    else:
        from flows.train import train_flow

        result = {"run_dir": str(train_dir), "summary": train_flow(**params)}
    state.update(pairs_since_training=0, last_training=version)
    return result


def _report(data: Path, meta: dict[str, Any]) -> str:
    rows = "\n".join(f"| {t} | {n} | {meta['new_by_type'].get(t, 0)} |" for t, n in meta["by_type"].items())
    return (
        f"# Pair dataset {meta['version']}\n\n`{data / LATEST}` -> `versions/{meta['version']}`; previous version: "
        f"`{meta['previous']}`\n\n{meta['new_problems']} new problems ({meta['changed_problems']} changed) of "
        f"{meta['num_source']} in the source; {meta['num_pairs']} pairs, {meta['new_pairs']} new, "
        f"{meta['dropped_pairs']} dropped.\n\n| pair type | pairs | new |\n| --- | --- | --- |\n{rows}\n"
    )

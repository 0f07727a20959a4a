"""The refresh's Prefect tasks: pick the new problems, see which got verified samples, publish a version, move
`latest`. The bookkeeping itself (lineage, hashes, state.json) is in `ckptdpo.lineage`."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NO_CACHE

from ckptdpo.configs import Recipe
from ckptdpo.errors import UserError
from ckptdpo.lineage import new_problems, verified_problem_ids
from ckptdpo.problems import load_problems
from ckptdpo.shards import (
    atomic_write_bytes,
    iter_stage,
    listed_shards,
    read_manifest,
    read_shard,
    shard_path,
    write_manifest,
    write_shard,
)
from tasks.environment import hub_offline

LATEST = "latest"
NEW_PROBLEMS = "new_problems.jsonl"


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


@task(name="select_new_problems", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def select_new_problems(recipe_path: str, problems: dict, run_dir: str, seen: dict[str, str]) -> dict[str, Any]:
    """Load the problem source and write the problems that are new (or changed) to `<run_dir>/new_problems.jsonl`."""
    recipe = Recipe.model_validate({"problems": problems})
    source = load_problems(recipe.problems, base_dir=Path(recipe_path).resolve().parent, offline=hub_offline())
    new = new_problems(source.rows, seen)
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
        for shard in listed_shards(versions / previous / "pairs"):
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
    for shard in listed_shards(Path(run_dir) / "pairs"):
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


@task(name="find_verified_problems", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def find_verified_problems(run_dir: str) -> list[str]:
    """The problems of a refresh's run that got verified samples (none when its verify stage never completed)."""
    verify = Path(run_dir) / "verify"
    if read_manifest(verify) is None:
        return []
    rows = (r for batch in iter_stage(verify, columns=["problem_id", "status"]) for r in batch.to_pylist())
    return sorted(verified_problem_ids(rows))


def read_new_problems(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / NEW_PROBLEMS).read_text().splitlines()]

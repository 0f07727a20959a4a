"""The problems stage: load and validate the problem source into problem shards (shard i feeds every stage's i)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from ckptdpo.configs import ProblemsConfig
from ckptdpo.problems import load_problems
from ckptdpo.schemas import PROBLEMS, make_table
from ckptdpo.shards import prepare_stage, read_manifest, update_stats, write_manifest, write_shard
from tasks.common import content_key
from tasks.environment import hub_offline
from tasks.planning import RETRY


@task(name="load_problems", **RETRY)
def load_problems_stage(run_dir: str, problems: ProblemsConfig, shard_size: int, base_dir: str) -> dict[str, Any]:
    """Load the problem source; write problem shards when their content changed."""
    problem_set = load_problems(problems, base_dir=Path(base_dir), offline=hub_offline())
    rows = problem_set.rows
    key = content_key("problems", [(r["problem_id"], r["problem"], r["answer"]) for r in rows], shard_size)[:16]
    stage = Path(run_dir) / "problems"
    if not prepare_stage(stage, key):
        for i in range(0, len(rows), shard_size):
            write_shard(stage, i // shard_size, make_table(rows[i : i + shard_size], PROBLEMS))
        stats = {"num_problems": len(rows), "num_invalid": problem_set.num_invalid, "source": problem_set.source}
        write_manifest(stage, config_hash=key, stats=stats)
        update_stats(run_dir, "problems", stats)
    return read_manifest(stage)["stats"]

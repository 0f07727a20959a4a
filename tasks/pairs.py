"""The pairs stage: `<run_dir>/pairs`, the union of the pair-producing stages (resample, dto), deduplicated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import task

from ckptdpo import summary
from ckptdpo.shards import (
    listed_shards,
    prepare_stage,
    read_manifest,
    read_shard,
    read_stage,
    write_manifest,
    write_shard,
)
from tasks.common import content_key
from tasks.planning import RETRY, fingerprints

_PAIR_COLUMNS = ["pair_type", "problem_id", "round", "checkpoint_index", "prompt_tokens", "chosen_tokens",
                 "rejected_tokens"]  # fmt: skip


@task(name="collect_pairs", **RETRY)
def collect_pairs(run_dir: str, sources: list[str]) -> dict[str, Any]:
    """`<run_dir>/pairs`: every source's pairs, each pair id once, in source order."""
    inputs = fingerprints(run_dir, *sources)
    key = content_key("pairs", inputs)[:16]
    stage = Path(run_dir) / "pairs"
    if prepare_stage(stage, key):
        return read_manifest(stage)["stats"]
    seen: set[str] = set()
    index = 0
    for source in sources:
        for p in listed_shards(Path(run_dir) / source):
            table = read_shard(p)
            ids = table.column("pair_id").to_pylist()
            keep = [i for i, pid in enumerate(ids) if pid not in seen]
            seen.update(ids)
            if keep:
                write_shard(stage, index, table.take(pa.array(keep, type=pa.int64())))
                index += 1
    generated = sum(
        (read_manifest(Path(run_dir) / s) or {}).get("stats", {}).get("generated_tokens", 0)
        for s in ("generate", "resample")
    )
    rows = [r for i in range(index) for r in read_shard(stage / f"part-{i:05d}.parquet", _PAIR_COLUMNS).to_pylist()]
    stats = summary.summarize_pairs(rows, generated)
    write_manifest(stage, config_hash=key, stats=stats, inputs=inputs)
    return stats


def read_pairs(run_dir: str) -> pa.Table:
    """The collected pairs of a run (from the manifest's list of shards)."""
    return read_stage(Path(run_dir) / "pairs")

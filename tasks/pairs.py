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
    update_stats,
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
    written = [read_shard(stage / f"part-{i:05d}.parquet", _PAIR_COLUMNS) for i in range(index)]
    rows = pa.concat_tables(written) if written else []
    stats = summary.summarize_pairs(rows, generated)
    write_manifest(stage, config_hash=key, stats=stats, inputs=inputs)
    update_stats(run_dir, "pair_quality", pair_quality(run_dir, sources))
    return stats


def _stage_rows(stage: Path, columns: list[str]) -> list[dict[str, Any]]:
    """Rows of a finished stage's listed shards; none for a stage that listed none (a run that made no pairs)."""
    return [r for p in listed_shards(stage) for r in read_shard(p, columns).to_pylist()]


def pair_quality(run_dir: str, sources: list[str]) -> dict[str, Any]:
    """How each pair's labels were read (box or final statement, from the verdicts of both sides' sources), the
    chosen/rejected length ratios and the share of candidates each filter dropped, per pair type."""
    run = Path(run_dir)
    labels = {
        r["sample_id"]: r["extracted_from"] for r in _stage_rows(run / "verify", ["sample_id", "extracted_from"])
    }
    for rounds in sorted(run.glob("resample/round-*")):
        if read_manifest(rounds) is not None:
            labels.update(
                (r["attempt_id"], r["extracted_from"]) for r in _stage_rows(rounds, ["attempt_id", "extracted_from"])
            )
    columns = ["pair_type", "chosen_tokens", "rejected_tokens", "source_sample_id", "attempt_id"]
    rows = []
    for p in _stage_rows(run / "pairs", columns):
        source, attempt = labels.get(p["source_sample_id"]), labels.get(p["attempt_id"])
        if p["pair_type"] == "r2w":
            p["chosen_extracted_from"], p["rejected_extracted_from"] = source, attempt
        elif p["pair_type"] == "w2r":
            p["chosen_extracted_from"], p["rejected_extracted_from"] = attempt, source
        else:  # dto: the optimized side ends in the boxed gold answer DTO appends; the rejected side's is not kept
            p["chosen_extracted_from"], p["rejected_extracted_from"] = "box", None
        rows.append(p)
    dropped = {}
    for s in sources:
        top = s.split("/")[0]
        stats = (read_manifest(run / top) or {}).get("stats", {})
        if isinstance(stats.get("dropped"), dict):
            dropped[top] = stats["dropped"]
    return summary.summarize_pair_quality(rows, dropped)


def read_pairs(run_dir: str) -> pa.Table:
    """The collected pairs of a run (from the manifest's list of shards)."""
    return read_stage(Path(run_dir) / "pairs")

"""The pairs stage: `<run_dir>/pairs`, the union of every pair-producing stage's pairs, deduplicated.

An implicit stage (no recipe section): it runs after the stages that make pairs, before the first stage that reads
`pairs/`, and gathers the `pairs` directory each stage's declaration names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import task

from ckptdpo import summary
from ckptdpo.report import ReportSection, format_counts, sections
from ckptdpo.report import format_number as fmt
from ckptdpo.schemas import PAIRS
from ckptdpo.shards import list_shards, listed_shards, read_manifest, read_shard, read_stage, update_stats, write_shard
from tasks.planning import RETRY, StagePlan, fingerprints, plan_stage
from tasks.stage import JobStep, RunContext, Stage, Steps

NAME = "pairs"

_PAIR_COLUMNS = ["pair_type", "problem_id", "round", "checkpoint_index", "prompt_tokens", "chosen_tokens",
                 "rejected_tokens"]  # fmt: skip


def pair_sources(ctx: RunContext) -> list[str]:
    """The pair directories of the recipe's stages that are finished in the run directory, in pipeline order."""
    from tasks.registry import registry

    made = [s.pairs for s in registry().values() if s.pairs and s.name in ctx.recipe.stages]
    return [d for d in made if read_manifest(Path(ctx.run_dir) / d) is not None]


@task(name="collect_pairs", **RETRY)
def collect_pairs(run_dir: str, sources: list[str]) -> dict[str, Any]:
    """`<run_dir>/pairs` shards: every source's pairs, each pair id once, in source order; and their quality."""
    stage = Path(run_dir) / NAME
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
    for p in list_shards(stage)[index:]:
        p.unlink()  # a rerun under the same key that keeps fewer shards must not leave an old one behind
    update_stats(run_dir, "pair_quality", pair_quality(run_dir, sources))
    return {"shards": index}


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
    written = list_shards(run / NAME)  # called by the stage writing them, before its manifest lists them
    for p in (r for path in written for r in read_shard(path, columns).to_pylist()):
        source, attempt = labels.get(p["source_sample_id"]), labels.get(p["attempt_id"])
        if p["pair_type"] == "r2w":
            p["chosen_extracted_from"], p["rejected_extracted_from"] = source, attempt
        elif p["pair_type"] == "w2r":
            p["chosen_extracted_from"], p["rejected_extracted_from"] = attempt, source
        elif p["pair_type"] == "critical":  # a rollout of the values stage (its label is not kept), the own suffix
            p["chosen_extracted_from"], p["rejected_extracted_from"] = None, source
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


class Pairs(Stage):
    """The preference pairs of every pair-making stage, each pair once."""

    name = NAME
    writes = {NAME: PAIRS}
    pool = "cpu"
    implicit = True
    gathers_pairs = True
    report = (
        ReportSection(
            "pairs", "Pairs by type and checkpoint position", lambda r: sections.section_pairs(r.pairs(), r.traj())
        ),
        ReportSection(
            "pairquality",
            "Pair quality",
            lambda r: sections.section_pair_quality(r.pairs(), r.stats.get("pair_quality")),
        ),
    )

    def plan(self, ctx: RunContext) -> StagePlan:
        return plan_stage(ctx.run_dir, NAME, fingerprints(ctx.run_dir, *pair_sources(ctx)), shards_of=None)

    def steps(self, ctx: RunContext, plan: StagePlan) -> Steps:
        yield JobStep(collect_pairs, {"run_dir": ctx.run_dir, "sources": pair_sources(ctx)})

    def summarize(self, ctx: RunContext, plan: StagePlan, outcomes: list[Any]) -> dict[str, Any]:
        """Pairs by type and per 1k tokens generated to make them."""
        generated = sum(
            (read_manifest(Path(ctx.run_dir) / s) or {}).get("stats", {}).get("generated_tokens", 0)
            for s in ("generate", *[d.split("/")[0] for d in pair_sources(ctx)])
        )
        written = [read_shard(p, _PAIR_COLUMNS) for p in list_shards(Path(ctx.run_dir) / NAME)]
        return summary.summarize_pairs(pa.concat_tables(written) if written else [], generated)

    def headline(self, s: Mapping[str, Any]) -> str:
        per_1k = fmt(s.get("pairs_per_1k_generated_tokens"))
        return (
            f"{fmt(s.get('num_pairs', 0))} pairs: {format_counts(s.get('by_type'))} ({per_1k} per 1k generated tokens)"
        )


STAGE = Pairs()

"""Prefect tasks of the DTO stage: optimize the correct trajectories of each shard, then build SimPO pairs.

Layout under `<run_dir>/dto`: `optimized/part-XXXXX.parquet` (DTO_RESULTS, one shard per generate shard, the
shard's `optimize_trajectories` stats in its Parquet metadata, with its own manifest) and `part-XXXXX.parquet`
(PAIRS) with the stage's `_manifest.json`. The pair shards sit directly in `dto/` because the pairs stage and the
stage fingerprint read every shard the manifest lists there; the diagnostics live one level down so they are never
mistaken for pairs.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Mapping
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task

from ckptdpo import shards, summary
from ckptdpo.configs import BackendConfig, DTOConfig, Recipe, VerifyConfig
from ckptdpo.dto import (
    DTOItem,
    DTOResult,
    build_dto_pairs,
    candidate_positions,
    merge_dto_stats,
    optimize_trajectories,
)
from ckptdpo.errors import UserError
from ckptdpo.report import ReportSection, sections
from ckptdpo.report import format_number as fmt
from ckptdpo.schemas import DTO_RESULTS, PAIRS, make_table
from ckptdpo.verify import verify_batch
from tasks.backends import backend_session, check_backend
from tasks.planning import (
    RETRY,
    StageFailed,
    StagePlan,
    backend_key,
    fingerprints,
    plan_stage,
    shard_exists,
    shard_task,
)
from tasks.resample import load_trajectories
from tasks.stage import JobStep, RunContext, Shard, ShardStep, Stage, Steps
from tasks.verify import verify_key, verify_kwargs

NAME = "dto"
OPTIMIZED = "dto/optimized"
INPUTS = ("problems", "generate", "verify", "checkpoints")
STATS_METADATA = b"ckptdpo.dto_stats"
PAIRS_PER_SHARD = 10_000


class JudgeUnparsed(UserError):
    """The judge's replies could not be parsed past the recipe's budget: a judge model or template problem."""


def _read(run_dir: str, stage: str, index: int, columns: list[str] | None = None) -> list[dict[str, Any]]:
    return shards.read_shard(shards.shard_path(Path(run_dir) / stage, index), columns=columns).to_pylist()


def judge_backend(recipe: Recipe) -> BackendConfig:
    return recipe.dto.judge.backend or recipe.backend


def _key_parts(ctx: RunContext) -> list[Any]:
    """The markers (they decide the candidate positions), the verifier settings when sampled probes are verified,
    the policy and, when pruning is on, the judge."""
    recipe = ctx.recipe
    cfg, backend = recipe.dto, recipe.backend
    judge = judge_backend(recipe)
    return [
        # The judge's endpoint (a port, say) is where it runs, not what it is: the judge enters as backend_key below.
        cfg.model_dump(mode="json", exclude={"judge": {"backend"}} if cfg.prune else {"judge"}),
        recipe.checkpoints.markers,
        verify_key(recipe.verify) if cfg.probe == "sample" else None,
        backend_key(backend),
        ctx.fingerprint(backend),
        [backend_key(judge), ctx.fingerprint(judge)] if cfg.prune else None,
    ]


def plan_optimized(ctx: RunContext) -> StagePlan:
    inputs = fingerprints(ctx.run_dir, *INPUTS)
    return plan_stage(ctx.run_dir, OPTIMIZED, inputs, *_key_parts(ctx), shards_of="generate")


def check_dto_failures(index: int, stats: dict[str, Any], probe_budget: int, judge_unparsed_share: float) -> None:
    """Failed probes past the budget fail the shard (retried); a judge that answers nonsense fails the stage."""
    if stats.get("probe_errors", 0) > probe_budget:
        raise StageFailed(f"dto shard {index}: {stats['probe_errors']} exit probe(s) failed (budget {probe_budget})")
    failures = stats.get("judge_parse_failures", 0)
    asked = stats.get("segments_judged", 0)  # every segment the judge was asked about, parsed or not
    if asked and failures / asked > judge_unparsed_share:
        raise JudgeUnparsed(
            f"dto shard {index}: the judge's replies could not be parsed for {failures} of {asked} segments (over "
            f"failure_budget.judge_unparsed_share {judge_unparsed_share}); check dto.judge.backend's model "
            "and chat template, or raise that share."
        )


def _result_row(result: DTOResult, kind: str, num_candidates: int) -> dict[str, Any]:
    return {
        "sample_id": result.sample_id,
        "problem_id": result.problem_id,
        "status": result.status,
        "exit_kind": kind,
        "num_candidates": num_candidates,
        "exit_index": result.exit_index,
        "exit_char": result.exit_char,
        "exit_probability": result.exit_probability,
        "reverify_probability": result.reverify_probability,
        "num_segments": result.num_segments,
        "removed_segments": result.removed_segments,
        "truncated_text": result.truncated_text,
        "text": result.text,
        "original_tokens": result.tokens_before,
        "truncated_tokens": result.tokens_after_truncation,
        "pruned_tokens": result.tokens_after_pruning,
    }


def _row_result(row: dict[str, Any]) -> DTOResult:
    return DTOResult(
        problem_id=row["problem_id"],
        sample_id=row["sample_id"],
        status=row["status"],
        exit_index=row["exit_index"],
        exit_char=row["exit_char"],
        exit_probability=row["exit_probability"],
        truncated_text=row["truncated_text"],
        text=row["text"],
        num_segments=row["num_segments"],
        removed_segments=list(row["removed_segments"] or []),
        reverify_probability=row["reverify_probability"],
        tokens_before=row["original_tokens"],
        tokens_after_truncation=row["truncated_tokens"],
        tokens_after_pruning=row["pruned_tokens"],
    )


def read_shard_stats(run_dir: str, index: int) -> dict[str, Any]:
    """The stats `dto_shard` stored in an optimized shard's metadata (so a resumed run still has them)."""
    metadata = pq.read_schema(shards.shard_path(Path(run_dir) / OPTIMIZED, index)).metadata or {}
    return json.loads(metadata[STATS_METADATA])


@shard_task("optimize_trajectories", "dto-shard-{shard.index}")
def dto_shard(
    shard: Shard,
    dto: DTOConfig,
    backend: BackendConfig,
    judge: BackendConfig,
    markers: list[str],
    verify: VerifyConfig,
    judge_unparsed_share: float,
    failure_budget: int = 0,
) -> dict[str, Any]:
    """Exit probing, truncation, judge pruning and re-verification of the correct trajectories of one shard."""
    run_dir, index = shard.run_dir, shard.index
    if shard_exists(run_dir, OPTIMIZED, index):
        return read_shard_stats(run_dir, index)
    cfg, bcfg, jcfg = dto, backend, judge
    problems = {p["problem_id"]: p["problem"] for p in _read(run_dir, "problems", index, ["problem_id", "problem"])}
    trajectories = sorted(load_trajectories(run_dir, index).values(), key=lambda t: t["sample_id"])
    items = [
        DTOItem(
            problem_id=t["problem_id"],
            sample_id=t["sample_id"],
            problem=problems[t["problem_id"]],
            prompt=t["prompt"],
            completion=t["completion"],
            gold=t["gold_answer"],
        )
        for t in trajectories
        if t["status"] == "correct"
    ]
    results: list[DTOResult] = []
    stats: dict[str, Any] = merge_dto_stats([])
    elapsed = 0.0
    if items:  # a shard without correct trajectories never loads a model
        verify_fn = functools.partial(verify_batch, **verify_kwargs(verify))
        # Same config: reuse the one session (a nested session on the same lock would deadlock). Otherwise the
        # policy lock is always taken before the judge's, so two shards running at once cannot deadlock.
        same = jcfg.model_dump_json() == bcfg.model_dump_json()
        with backend_session(bcfg) as policy:
            judge_session = (
                nullcontext(None) if not cfg.prune else nullcontext(policy) if same else backend_session(jcfg)
            )
            with judge_session as judge:
                t0 = time.perf_counter()
                results, stats = optimize_trajectories(policy, judge, items, cfg, verify_fn, markers=markers)
                elapsed = time.perf_counter() - t0
    stats = {**stats, "optimize_s": round(elapsed, 3)}
    check_dto_failures(index, stats, failure_budget, judge_unparsed_share)
    rows = []
    for item, result in zip(items, results, strict=True):
        kind, positions = candidate_positions(item.completion, markers, cfg.min_checkpoints)
        rows.append(_result_row(result, kind, len(positions)))
    table = make_table(rows, DTO_RESULTS)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), STATS_METADATA: json.dumps(stats)})
    shards.write_shard(Path(run_dir) / OPTIMIZED, index, table)
    return stats


def _originals(run_dir: str, index: int) -> list[dict[str, Any]]:
    """Every generated trajectory of one shard (any verdict) with its verdict status: the rejected candidates."""
    status = {v["sample_id"]: v["status"] for v in _read(run_dir, "verify", index, ["sample_id", "status"])}
    rows = _read(run_dir, "generate", index, ["sample_id", "problem_id", "prompt", "completion", "model"])
    return [{**r, "status": status[r["sample_id"]]} for r in rows]


@task(name="build_dto_pairs", **RETRY)
def dto_pairs(run_dir: str, dto: DTOConfig, backend: BackendConfig) -> dict[str, Any]:
    """DTO pairs from all optimized shards, written as the stage's pair shards (its manifest comes after)."""
    cfg, bcfg = dto, backend
    stage = Path(run_dir) / NAME
    t0 = time.perf_counter()
    pairs: list[dict[str, Any]] = []
    # Shard by shard: all samples of a problem live in its one generate shard, so every problem sees all of its
    # optimized and original trajectories while only one shard is in memory.
    with ExitStack() as stack:
        b = None  # opened on first use: a stage without any optimized text loads no model just to count tokens
        for i, path in enumerate(shards.listed_shards(Path(run_dir) / OPTIMIZED)):
            optimized = [_row_result(r) for r in shards.read_shard(path).to_pylist()]
            if not any(r.text is not None for r in optimized):
                continue
            if b is None:
                b = stack.enter_context(backend_session(bcfg))
            problems = _read(run_dir, "problems", i, ["problem_id", "answer"])
            originals = _originals(run_dir, i)
            pairs.extend(
                build_dto_pairs(
                    problems, optimized, originals, b.count_tokens, rejected=cfg.rejected, model=b.model_id
                )
            )
    written = 0
    for start in range(0, max(len(pairs), 1), PAIRS_PER_SHARD):
        shards.write_shard(stage, written, make_table(pairs[start : start + PAIRS_PER_SHARD], PAIRS))
        written += 1
    for p in shards.list_shards(stage)[written:]:
        p.unlink()  # a rerun under the same key with fewer pairs must not leave an old shard behind
    return {"num_pairs": len(pairs), "pairs_s": round(time.perf_counter() - t0, 3)}


def summarize_optimized(plan: StagePlan) -> dict[str, Any]:
    return {}


class DTO(Stage):
    """Exit probing, truncation and judge pruning -> DTO pairs."""

    name = NAME
    settings = ("verify", "checkpoints")
    reads = {
        "problems": ["problem_id", "problem", "answer"],
        "generate": ["sample_id", "problem_id", "prompt", "completion", "model"],
        "verify": ["sample_id", "status"],
        "checkpoints": ["sample_id", "checkpoint_chars"],
    }
    writes = {NAME: PAIRS, OPTIMIZED: DTO_RESULTS}
    pairs = NAME
    lineage = True
    report = (
        ReportSection(
            "dto", "DTO token reductions", lambda r: sections.section_dto(r.dto_pairs(), r.dto_figures(), r.stats)
        ),
    )

    def plan(self, ctx: RunContext) -> StagePlan:
        return plan_stage(ctx.run_dir, NAME, fingerprints(ctx.run_dir, *INPUTS), *_key_parts(ctx), shards_of=None)

    def steps(self, ctx: RunContext, plan: StagePlan) -> Steps:
        """Optimize the correct trajectories shard by shard, then build the SimPO pairs from all shards once."""
        recipe = ctx.recipe
        params = {
            "dto": recipe.dto,
            "backend": recipe.backend,
            "judge": judge_backend(recipe),
            "markers": recipe.checkpoints.markers,
            "verify": recipe.verify,
            "judge_unparsed_share": recipe.failure_budget.judge_unparsed_share,
        }
        budget = recipe.failure_budget.dto
        yield ShardStep(plan_optimized(ctx), dto_shard, params, budget, summarize=summarize_optimized)
        yield JobStep(dto_pairs, {"run_dir": ctx.run_dir, "dto": recipe.dto, "backend": recipe.backend})

    def summarize(self, ctx: RunContext, plan: StagePlan, outcomes: list[Any]) -> dict[str, Any]:
        """Exit, truncation and pruning figures over all shards, statuses, and the pairs per 1k generated tokens."""
        run_dir = ctx.run_dir
        _, built = outcomes
        optimized = shards.listed_shards(Path(run_dir) / OPTIMIZED)
        by_status: dict[str, int] = {}
        for path in optimized:
            for status in shards.read_shard(path, ["status"]).column("status").to_pylist():
                by_status[status] = by_status.get(status, 0) + 1
        shard_stats = [read_shard_stats(run_dir, i) for i in range(len(optimized))]
        stats: dict[str, Any] = merge_dto_stats(shard_stats, num_pairs=built["num_pairs"])
        stats["optimize_s"] = round(stats.get("optimize_s", 0.0), 3)
        stats["by_status"] = dict(sorted(by_status.items()))
        generated = (
            (shards.read_manifest(Path(run_dir) / "generate") or {}).get("stats", {}).get("generated_tokens", 0)
        )
        written = [shards.read_shard(p) for p in shards.list_shards(Path(run_dir) / NAME)]  # its manifest is next
        stats["pairs"] = summary.summarize_pairs(pa.concat_tables(written), generated)
        stats["pairs_s"] = built["pairs_s"]
        get_run_logger().info(
            "dto: %d trajectories, tokens %d -> %d (truncated) -> %d (pruned), %d pairs",
            stats["num_trajectories"],
            stats["tokens_before"],
            stats["tokens_after_truncation"],
            stats["tokens_after_pruning"],
            stats["num_pairs"],
        )
        return stats

    def headline(self, s: Mapping[str, Any]) -> str:
        before, after = s.get("tokens_before") or 0, s.get("tokens_after_pruning") or 0
        cut = f" ({fmt(1 - after / before)} fewer)" if before else ""
        return (
            f"{fmt(s.get('num_trajectories'))} correct trajectories, tokens {fmt(before)} → {fmt(after)}{cut}, "
            f"{fmt(s.get('num_pairs'))} pairs"
        )

    def preflight(self, ctx: RunContext) -> None:
        """A separate judge backend loads (its model and tokenizer, or its script), before anything is written."""
        judge = ctx.recipe.dto.judge.backend
        if judge is not None and ctx.recipe.dto.prune:
            check_backend(judge, "dto.judge.backend", ctx.model_path)


STAGE = DTO()

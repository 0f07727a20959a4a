"""The resample stage: rounds of continuations from checkpoints, verified, then r2w / w2r pairs per shard.

Layout under `<run_dir>/resample`: `round-NN/` (ATTEMPTS shards, one manifest per round), `pairs/` (PAIRS shards)
and the stage's own `_manifest.json`, written last.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptdpo import summary
from ckptdpo.configs import BackendConfig, ResampleConfig, VerifyConfig
from ckptdpo.errors import UserError
from ckptdpo.report import ReportSection, format_counts, sections
from ckptdpo.report import format_number as fmt
from ckptdpo.resample import attempt_rows, build_pairs, build_requests, draws_this_round, plan_slots, slot_key
from ckptdpo.schemas import ATTEMPTS, PAIRS, make_table
from ckptdpo.shards import read_manifest, read_stage, write_shard
from ckptdpo.values import rows_by_sample
from ckptdpo.verify import verify_batch
from tasks import planning
from tasks.backends import backend_session
from tasks.stage import RunContext, Shard, ShardStep, Stage, Steps
from tasks.verify import verify_kwargs

NAME = "resample"
PAIRS_STAGE = "resample/pairs"
INPUTS = ("problems", "generate", "verify", "checkpoints")
_PAIR_COLUMNS = ["pair_type", "problem_id", "round", "checkpoint_index", "prompt_tokens", "chosen_tokens",
                 "rejected_tokens"]  # fmt: skip


def inputs_of(ctx: RunContext) -> tuple[str, ...]:
    """What a run's resampling reads: the values too when they place the draws."""
    return (*INPUTS, "values") if ctx.recipe.resample.policy == "value" else INPUTS


def round_dir(round_index: int) -> str:
    return f"resample/round-{round_index:02d}"


def plan_round(ctx: RunContext, round_index: int) -> planning.StagePlan:
    """Round r: keyed by the earlier rounds too; the round and token budgets decide only how many rounds run."""
    cfg, backend = ctx.recipe.resample, ctx.recipe.backend
    inputs = {
        **planning.fingerprints(ctx.run_dir, *inputs_of(ctx)),
        **planning.fingerprints(ctx.run_dir, *[round_dir(i) for i in range(1, round_index)]),
    }
    return planning.plan_stage(
        ctx.run_dir,
        round_dir(round_index),
        inputs,
        cfg.model_dump(mode="json", exclude={"max_rounds", "token_budget"}),
        planning.backend_key(backend),
        ctx.fingerprint(backend),
        shards_of="generate",
    )


def plan_pairs(ctx: RunContext, rounds: int) -> planning.StagePlan:
    cfg = ctx.recipe.resample
    return planning.plan_stage(
        ctx.run_dir,
        PAIRS_STAGE,
        planning.fingerprints(ctx.run_dir, *[round_dir(i) for i in range(1, rounds + 1)]),
        cfg.model_dump(mode="json", include={"max_pair_tokens", "max_length_ratio", "r2w", "w2r"}),
        ctx.fingerprint(ctx.recipe.backend),
        shards_of="generate",
    )


_ROUND_COLUMNS = ["direction", "source_sample_id", "checkpoint_index", "status", "finish_reason", "completion_tokens"]


def summarize_round(plan: planning.StagePlan) -> dict[str, Any]:
    return summary.summarize_round(planning.read_stage_rows(plan.run_dir, plan.stage, _ROUND_COLUMNS, plan.indices))


def summarize_pair_shards(plan: planning.StagePlan) -> dict[str, Any]:
    """The pairs' figures are the stage's; their manifest keeps what each shard dropped (added by the finalize)."""
    return {}


def load_trajectories(run_dir: str, index: int) -> dict[str, dict[str, Any]]:
    """Samples of one shard joined with their verdicts, checkpoints and gold answers, keyed by sample id."""
    gold = {
        p["problem_id"]: p["answer"] for p in planning.read_rows(run_dir, "problems", index, ["problem_id", "answer"])
    }
    verdicts = {v["sample_id"]: v for v in planning.read_rows(run_dir, "verify", index)}
    cps = {c["sample_id"]: c["checkpoint_chars"] for c in planning.read_rows(run_dir, "checkpoints", index)}
    out = {}
    for s in planning.read_rows(run_dir, "generate", index):
        v = verdicts[s["sample_id"]]
        s["status"] = v["status"]
        s["extracted_from"] = v.get("extracted_from")
        s["checkpoint_chars"] = cps[s["sample_id"]]
        s["gold_answer"] = gold[s["problem_id"]]
        out[s["sample_id"]] = s
    return out


def _round_work(
    run_dir: str, index: int, round_index: int, cfg: ResampleConfig, trajectories: dict, value_threshold: float
) -> list:
    history: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in range(1, round_index):
        for a in planning.read_rows(run_dir, round_dir(r), index, ["source_sample_id", "checkpoint_index", "status"]):
            history[(a["source_sample_id"], a["checkpoint_index"])].append(a)
    # `policy: value`: draws go where the values stage's estimates put the first error (same shard index).
    values = rows_by_sample(planning.read_rows(run_dir, "values", index)) if cfg.policy == "value" else {}
    work = []
    for t in trajectories.values():
        for slot in plan_slots(t, cfg, values=values.get(t["sample_id"]), threshold=value_threshold):
            n = draws_this_round(slot, history[slot_key(slot)], cfg)
            if n:
                work.append((slot, n))
    return work


@planning.shard_task("resample_round", "resample-round-{round_index}-shard-{shard.index}")
def resample_shard(
    shard: Shard,
    round_index: int,
    resample: ResampleConfig,
    backend: BackendConfig,
    verify: VerifyConfig,
    value_threshold: float,
    failure_budget: int = 0,
) -> dict[str, Any]:
    """One resampling round over one shard: continue unsatisfied slots, verify, write the attempts."""
    run_dir, index = shard.run_dir, shard.index
    stage = round_dir(round_index)
    if planning.shard_exists(run_dir, stage, index):
        return {"generate_s": 0.0, "verify_s": 0.0}
    trajectories = load_trajectories(run_dir, index)
    work = _round_work(run_dir, index, round_index, resample, trajectories, value_threshold)
    requests = build_requests(work, trajectories, resample, round_index)
    out: dict[str, Any] = {"generate_s": 0.0, "verify_s": 0.0}
    rows: list[dict[str, Any]] = []
    if requests:
        with backend_session(backend) as b:
            t0 = time.perf_counter()
            results = b.generate(requests)
            out["generate_s"] = time.perf_counter() - t0
        failed = [slot.source_sample_id for (slot, _), res in zip(work, results, strict=True) if res.error]
        errors = [r.error for r in results if r.error]
        out.update(planning.check_requests(f"resample round {round_index}", index, failed, errors, failure_budget))
        items, owners = [], []
        for k, ((slot, _), res) in enumerate(zip(work, results, strict=True)):
            gold = trajectories[slot.source_sample_id]["gold_answer"]
            for s in res.samples:
                items.append((gold, s.text, s.finish_reason))
                owners.append(k)
        t0 = time.perf_counter()
        verdicts = verify_batch(items, **verify_kwargs(verify))
        out["verify_s"] = time.perf_counter() - t0
        per_request: dict[int, list] = defaultdict(list)
        for k, v in zip(owners, verdicts, strict=True):
            per_request[k].append(v)
        for k, ((slot, _), req, res) in enumerate(zip(work, requests, results, strict=True)):
            rows.extend(attempt_rows(slot, req, res.samples, per_request[k], round_index))
        out.update(_prompt_token_counts(results))
    write_shard(Path(run_dir) / stage, index, make_table(rows, ATTEMPTS))
    return out


def _prompt_token_counts(results: list) -> dict[str, int]:
    """Prompt tokens the continuations asked for and the ones the backend actually computed (prefix reuse)."""
    requested = sum(r.prompt_tokens_requested for r in results)
    computed = sum(r.prompt_tokens_computed for r in results)
    return {"prompt_tokens_requested": requested, "prompt_tokens_computed": computed} if requested else {}


@planning.shard_task("build_pairs", "pairs-shard-{shard.index}")
def pairs_shard(
    shard: Shard,
    rounds: int,
    resample: ResampleConfig,
    backend: BackendConfig,
    failure_budget: int = 0,
) -> dict[str, Any]:
    """r2w / w2r pairs of one shard from all rounds' attempts."""
    run_dir, index = shard.run_dir, shard.index
    if planning.shard_exists(run_dir, PAIRS_STAGE, index):
        return {}
    trajectories = load_trajectories(run_dir, index)
    attempts = [a for r in range(1, rounds + 1) for a in planning.read_rows(run_dir, round_dir(r), index)]
    with backend_session(backend) as b:
        pairs, dropped = build_pairs(trajectories, attempts, resample, b.count_tokens, model=b.model_id)
    write_shard(Path(run_dir) / PAIRS_STAGE, index, make_table(pairs, PAIRS))
    return {"dropped": dropped}


class Resample(Stage):
    """Rounds of resampling from checkpoints -> r2w / w2r pairs."""

    name = NAME
    settings = ("verify", "values")
    reads = {
        "problems": ["problem_id", "answer"],
        "generate": ["sample_id", "problem_id", "prompt", "completion"],
        "verify": ["sample_id", "status", "extracted_from"],
        "checkpoints": ["sample_id", "checkpoint_chars"],
    }
    writes = {"resample/round-*": ATTEMPTS, PAIRS_STAGE: PAIRS, NAME: None}
    pairs = PAIRS_STAGE
    lineage = True
    report = (ReportSection("rounds", "Resampling yield per round", lambda r: sections.section_rounds(r.stats)),)

    def plan(self, ctx: RunContext) -> planning.StagePlan:
        """The whole stage: keyed by its inputs, its whole config and the model."""
        cfg, backend = ctx.recipe.resample, ctx.recipe.backend
        inputs = planning.fingerprints(ctx.run_dir, *inputs_of(ctx))
        key = [cfg.model_dump(mode="json"), planning.backend_key(backend), ctx.fingerprint(backend)]
        return planning.plan_stage(ctx.run_dir, NAME, inputs, *key, shards_of=None)

    def steps(self, ctx: RunContext, plan: planning.StagePlan) -> Steps:
        """Rounds until the round or token budget is spent (or a round has nothing left to draw), then the pairs."""
        cfg, recipe = ctx.recipe.resample, ctx.recipe
        spent = rounds = 0
        for r in range(1, cfg.max_rounds + 1):
            params = {"round_index": r, "resample": cfg, "backend": recipe.backend, "verify": recipe.verify}
            params["value_threshold"] = recipe.values.threshold
            budget = recipe.failure_budget.resample
            stats = yield ShardStep(plan_round(ctx, r), resample_shard, params, budget, summarize=summarize_round)
            rounds, spent = r, spent + stats["tokens"]
            if stats["attempts"] == 0 or (cfg.token_budget and spent >= cfg.token_budget):
                break
        params = {"rounds": rounds, "resample": cfg, "backend": recipe.backend}
        yield ShardStep(plan_pairs(ctx, rounds), pairs_shard, params, summarize=summarize_pair_shards)

    def summarize(self, ctx: RunContext, plan: planning.StagePlan, outcomes: list[Any]) -> dict[str, Any]:
        """Every round's outcomes, pairs by type, yield per 1k generated tokens (generation and resampling)."""
        *round_stats, pair_stats = outcomes
        rounds = [{"round": i, **s} for i, s in enumerate(round_stats, 1)]
        generated = sum(r["tokens"] for r in rounds)
        base = (read_manifest(Path(ctx.run_dir) / "generate") or {}).get("stats", {}).get("generated_tokens", 0)
        rows = read_stage(Path(ctx.run_dir) / PAIRS_STAGE, _PAIR_COLUMNS)
        stats = {
            "rounds": rounds,
            "generated_tokens": generated,
            "dropped": pair_stats.get("dropped", {}),
            "pairs": summary.summarize_pairs(rows, generated + base),
        }
        for name in ("generate_s", "verify_s", "prompt_tokens_requested", "prompt_tokens_computed"):
            stats[name] = round(sum(r.get(name, 0) for r in rounds), 3)
        return stats

    def preflight(self, ctx: RunContext) -> None:
        """`policy: value` needs the values stage: run in this run, or done in the run directory."""
        if ctx.recipe.resample.policy != "value" or "values" in ctx.recipe.stages:
            return
        if read_manifest(Path(ctx.run_dir) / "values") is None:
            raise UserError(
                "resample.policy is 'value' but the recipe's stages leave out values and the run directory has none; "
                "add values to stages (before resample) or choose another resample.policy."
            )

    def headline(self, s: Mapping[str, Any]) -> str:
        p = s.get("pairs", {})
        return (
            f"{len(s.get('rounds', []))} rounds, {fmt(s.get('generated_tokens'))} tokens; pairs "
            f"{format_counts(p.get('by_type'))} "
            f"({fmt(p.get('pairs_per_1k_generated_tokens'))} per 1k generated tokens)"
        )


STAGE = Resample()

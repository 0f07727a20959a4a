"""The values stage: a Monte-Carlo value for checkpoints of each trajectory, its first error, pairs there, step labels.

Layout: `values/` (VALUES: one row per probed checkpoint), `values/trajectories/` (VALUE_TRAJECTORIES), `values/pairs/`
(PAIRS of type `critical`, gathered into `pairs/`) and `prm/` (PRM_STEPS, TRL's stepwise-supervision format): one shard
each per generate shard, written by the same task, each with its manifest.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ckptdpo.configs import BackendConfig, ValuesConfig, VerifyConfig
from ckptdpo.report import ReportSection
from ckptdpo.report.values import section_values
from ckptdpo.schemas import PAIRS, PRM_STEPS, VALUE_TRAJECTORIES, VALUES, make_table
from ckptdpo.shards import read_manifest, read_stage, shard_path, write_shard
from ckptdpo.values import compare_schedules, estimate_values, summarize_values, values_headline
from ckptdpo.verify import verify_batch
from tasks import planning
from tasks.backends import backend_session
from tasks.resample import INPUTS, load_trajectories
from tasks.stage import RunContext, Shard, ShardStep, Stage, Steps
from tasks.verify import verify_key, verify_kwargs

NAME = "values"
TRAJECTORIES = "values/trajectories"
PAIRS_DIR = "values/pairs"
PRM = "prm"
_OUTPUTS = {NAME: VALUES, TRAJECTORIES: VALUE_TRAJECTORIES, PAIRS_DIR: PAIRS, PRM: PRM_STEPS}
_COUNTERS = ("generated_tokens", "requests", "rollouts", "rounds")
STATS_METADATA = b"ckptdpo.values_stats"


@planning.shard_task("estimate_values", "values-shard-{shard.index}")
def values_shard(
    shard: Shard,
    values: ValuesConfig,
    backend: BackendConfig,
    verify: VerifyConfig,
    failure_budget: int = 0,
) -> dict[str, Any]:
    """Search the trajectories of one shard for their first error; write its four shards (or fail, retried)."""
    run_dir, index = shard.run_dir, shard.index
    path = shard_path(Path(run_dir) / NAME, index)
    if all(planning.shard_exists(run_dir, d, index) for d in _OUTPUTS):
        return json.loads((pq.read_schema(path).metadata or {}).get(STATS_METADATA, b"{}"))
    trajectories = load_trajectories(run_dir, index).values()
    with backend_session(backend) as b:
        result = estimate_values(trajectories, values, b, functools.partial(verify_batch, **verify_kwargs(verify)))
    # A failed request fails the shard (its retry, then the next run, redo it): it never counts as a wrong rollout.
    planning.check_requests(NAME, index, result.failed, result.errors, 0)
    stats = {k: v for k, v in result.stats.items() if isinstance(v, int) and not isinstance(v, bool)}
    stats["dropped"] = result.stats.get("pairs_dropped") or {}
    rows = {NAME: result.values, TRAJECTORIES: result.trajectories, PAIRS_DIR: result.pairs, PRM: result.prm}
    # The values shard is written last, with the shard's counters in its metadata (a resumed run still has them).
    for directory in [TRAJECTORIES, PAIRS_DIR, PRM, NAME]:
        table = make_table(rows[directory], _OUTPUTS[directory])
        if directory == NAME:
            table = table.replace_schema_metadata({STATS_METADATA: json.dumps(stats)})
        write_shard(Path(run_dir) / directory, index, table)
    return stats


def _table(run_dir: Path, directory: str):
    return read_stage(run_dir / directory) if read_manifest(run_dir / directory) is not None else None


class Values(Stage):
    """Checkpoint values by rollouts -> each trajectory's first error, critical pairs, step labels."""

    name = NAME
    settings = ("verify", "resample")
    reads = {
        "problems": ["problem_id", "answer"],
        "generate": ["sample_id", "problem_id", "prompt", "completion", "completion_tokens"],
        "verify": ["sample_id", "status"],
        "checkpoints": ["sample_id", "checkpoint_chars"],
    }
    writes = _OUTPUTS
    pairs = PAIRS_DIR
    lineage = True
    report = (
        ReportSection(
            "values",
            "Checkpoint values and first errors",
            lambda r: section_values(
                r.get("values", lambda: _table(r.run_dir, NAME)),
                r.get("value_trajectories", lambda: _table(r.run_dir, TRAJECTORIES)),
                r.pairs(),
                r.stats.get(NAME),
                threshold=(r.stats.get(NAME) or {}).get("threshold"),
            ),
        ),
    )

    def plan(self, ctx: RunContext) -> planning.StagePlan:
        """Keyed by its inputs, its whole config, the verifier settings and the model; all four outputs together."""
        recipe = ctx.recipe
        inputs = planning.fingerprints(ctx.run_dir, *INPUTS)
        key = [recipe.values, verify_key(recipe.verify), planning.backend_key(recipe.backend)]
        key.append(ctx.fingerprint(recipe.backend))
        outputs = [d for d in _OUTPUTS if d != NAME]
        return planning.plan_stage(ctx.run_dir, NAME, inputs, *key, shards_of="generate", outputs=outputs)

    def steps(self, ctx: RunContext, plan: planning.StagePlan) -> Steps:
        params = {"values": ctx.recipe.values, "backend": ctx.recipe.backend, "verify": ctx.recipe.verify}
        yield ShardStep(plan, values_shard, params)

    def summarize(self, ctx: RunContext, plan: planning.StagePlan, outcomes: list[Any]) -> dict[str, Any]:
        """Trajectories, rollouts used (and what probing everything would have cost), critical points, pairs."""
        (shard_results,) = outcomes
        rows = {d: planning.read_stage_rows(ctx.run_dir, d, None, plan.indices) for d in (NAME, TRAJECTORIES)}
        pairs = planning.read_stage_rows(ctx.run_dir, PAIRS_DIR, ["pair_type", "chosen_tokens", "rejected_tokens"],
                                         plan.indices)  # fmt: skip
        counters = {k: sum(r.get(k, 0) for r in shard_results) for k in _COUNTERS}
        stats = summarize_values(rows[NAME], rows[TRAJECTORIES], pairs, counters)
        return {**stats, "threshold": ctx.recipe.values.threshold, "schedules": self._schedules(ctx, plan)}

    def _schedules(self, ctx: RunContext, plan: planning.StagePlan) -> dict[str, Any]:
        """Expected first-round pairs per 1k generated tokens of the recipe's resampling schedule against the value
        schedule, priced from this stage's own rollouts (`compare_schedules`; only fully probed trajectories)."""
        resample, threshold = ctx.recipe.resample, ctx.recipe.values.threshold
        baseline = "seed" if resample.policy == "value" else resample.policy
        totals: dict[str, Any] = {"trajectories": 0, "skipped": 0}
        for i in plan.indices:
            trajectories = load_trajectories(ctx.run_dir, i).values()
            got = compare_schedules(
                trajectories, planning.read_rows(ctx.run_dir, NAME, i), resample, threshold, baseline
            )
            totals["trajectories"] += got["trajectories"]
            totals["skipped"] += got["skipped"]
            for name in (baseline, "value"):
                t = totals.setdefault(name, {"draws": 0, "expected_pairs": 0.0, "expected_tokens": 0.0})
                for k in t:
                    t[k] += got[name][k]
        for name in (baseline, "value"):
            t = totals[name]
            t["pairs_per_1k_tokens"] = (
                round(1000 * t["expected_pairs"] / t["expected_tokens"], 4) if t["expected_tokens"] else None
            )
        return totals

    def headline(self, s: Mapping[str, Any]) -> str:
        return values_headline(s)


STAGE = Values()

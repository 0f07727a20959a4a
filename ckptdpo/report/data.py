"""What the report reads from a run directory: stage columns, stats sections, eval rows, DTO figures, intervals.

Every reader returns None (or an empty mapping) when its stage has no manifest, so a report can be written after any
stage. The DTO and interval figures are defined here once and used by every section, the headline and `compare`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ckptdpo.metrics import paired_eval_intervals, problem_outcomes
from ckptdpo.shards import list_shards, read_manifest, read_stage

KINDS = ("math", "code", "choice")
DEFAULT_KIND = "math"
# The columns the intervals need from EVAL_SAMPLES; never `completion`.
EVAL_ROW_COLUMNS = ["problem_id", "sample_index", "completion_tokens", "finish_reason", "status"]
OPTIMIZED_STATUSES = ("pruned", "truncated")


def _stage(run_dir: Path, stage: str, columns: list[str]) -> pa.Table | None:
    """A completed stage's columns, or None when the stage has no manifest (not run, or not finished)."""
    d = run_dir / stage
    m = read_manifest(d)
    if m is None:
        return None
    if not m.get("num_shards"):
        return pa.table({c: [] for c in columns})
    return read_stage(d, columns=columns)


def _listed(stage_dir: Path) -> list[Path] | None:
    """The shard paths a stage's manifest lists (None without a manifest): readers never glob."""
    m = read_manifest(stage_dir)
    if m is None:
        return None
    return [stage_dir / s["name"] for s in m.get("shards") or []]


def load_trajectories(run_dir: Path) -> pa.Table | None:
    """completion_tokens, is_correct (and num_checkpoints when located) per generated trajectory."""
    cps = _stage(run_dir, "checkpoints", ["sample_id", "completion_tokens", "is_correct", "num_checkpoints"])
    if cps is not None:
        return cps
    gen = _stage(run_dir, "generate", ["sample_id", "completion_tokens"])
    ver = _stage(run_dir, "verify", ["sample_id", "is_correct"])
    if gen is None or ver is None:
        return None
    return gen.join(ver, "sample_id", join_type="left outer")


def load_pairs(run_dir: Path) -> pa.Table | None:
    cols = ["pair_type", "source_sample_id", "checkpoint_index", "chosen_tokens", "rejected_tokens", "round"]
    for stage in ("pairs", "resample/pairs"):
        t = _stage(run_dir, stage, cols)
        if t is not None:
            return t
    return None


def load_train_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "train" / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_grpo_summary(run_dir: Path) -> dict[str, Any] | None:
    """The GRPO baseline's summary.json (generated and trained tokens, budget, reward curve), None when not run."""
    path = Path(run_dir) / "grpo" / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_recipe(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        return {}
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    return data if isinstance(data, dict) else {}


def load_recipe_name(run_dir: Path) -> str | None:
    return load_recipe(run_dir).get("name")


def load_dto_results(run_dir: Path) -> pa.Table | None:
    """Per trajectory DTO looked at: status and token counts before, after truncation and after pruning."""
    if read_manifest(run_dir / "dto") is None:
        return None
    # The optimized shards are the dto stage's diagnostics (its manifest lists the pair shards).
    shards = list_shards(run_dir / "dto" / "optimized")
    if not shards:
        return None
    cols = ["status", "original_tokens", "truncated_tokens", "pruned_tokens"]
    return pa.concat_tables([pq.read_table(p, columns=cols) for p in shards])


# --- DTO figures: one definition -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DTOFigures:
    """Token figures over the trajectories DTO optimized (status pruned or truncated), never over all of them.

    Reductions are positive shares: `token_reduction` = 1 - tokens after / tokens before, summed over the optimized
    trajectories; `per_trajectory` holds the same ratio per trajectory (truncation alone, and the final text).
    """

    num_looked_at: int
    num_optimized: int
    tokens_before: int
    tokens_after_truncation: int
    tokens_after: int
    truncation_per_trajectory: np.ndarray
    per_trajectory: np.ndarray

    @property
    def token_reduction(self) -> float | None:
        return 1 - self.tokens_after / self.tokens_before if self.tokens_before else None

    @property
    def truncation_reduction(self) -> float | None:
        return 1 - self.tokens_after_truncation / self.tokens_before if self.tokens_before else None


def dto_figures(results: pa.Table) -> DTOFigures:
    """The DTO figures of the optimized-trajectory rows (status, original/truncated/pruned tokens)."""
    rows = [r for r in results.to_pylist() if r["status"] in OPTIMIZED_STATUSES and r["original_tokens"]]
    before = np.array([r["original_tokens"] for r in rows], dtype=float)
    cut = np.array([r["truncated_tokens"] for r in rows], dtype=float)
    final = np.array([r["pruned_tokens"] if r["status"] == "pruned" else r["truncated_tokens"] for r in rows], float)
    return DTOFigures(
        num_looked_at=results.num_rows,
        num_optimized=len(rows),
        tokens_before=int(before.sum()),
        tokens_after_truncation=int(cut.sum()),
        tokens_after=int(final.sum()),
        truncation_per_trajectory=1 - cut / before if len(rows) else cut,
        per_trajectory=1 - final / before if len(rows) else final,
    )


# --- eval ------------------------------------------------------------------------------------------------------------


def eval_section(stats: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """{benchmark: {model: metrics}} of stats.json, models in evaluation order (the first is the reference)."""
    section = stats.get("eval") or {}
    return {b: m for b, m in section.items() if isinstance(m, dict) and m}


def eval_manifest_stats(run_dir: Path) -> dict[str, Any]:
    return (read_manifest(run_dir / "eval") or {}).get("stats") or {}


def benchmark_kinds(run_dir: Path, section: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Each benchmark's kind (math / code / choice): from its metrics, the eval manifest or the recipe; else math."""
    listed = eval_manifest_stats(run_dir).get("benchmarks") or {}
    recipe = ((load_recipe(run_dir).get("eval") or {}).get("benchmarks")) or {}
    kinds = {}
    for bench, models in section.items():
        found = [m.get("kind") for m in models.values() if isinstance(m, dict)]
        found += [(listed.get(bench) or {}).get("kind"), (recipe.get(bench) or {}).get("kind")]
        kinds[bench] = next((k for k in found if isinstance(k, str) and k), DEFAULT_KIND)
    return kinds


def read_eval_rows(run_dir: Path, benchmark: str, model: str) -> list[dict[str, Any]] | None:
    """EVAL_ROW_COLUMNS of one (benchmark, model)'s eval shards, or None when that pair has not finished."""
    shards = _listed(Path(run_dir) / "eval" / benchmark / model)
    if shards is None:
        return None
    rows: list[dict[str, Any]] = []
    for path in shards:
        rows += pq.read_table(path, columns=EVAL_ROW_COLUMNS).to_pylist()
    return rows


def eval_intervals(
    run_dir: Path, section: Mapping[str, Mapping[str, Mapping[str, Any]]], seed: int = 0
) -> dict[str, dict[str, dict[str, Any]]]:
    """{benchmark: {model: intervals vs the reference}} for every non-reference model: from stats.json when the eval
    stage stored them (`intervals`), else computed here from both models' eval shards; absent where neither has."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for bench, models in section.items():
        names = list(models)
        for name in names[1:]:
            iv = pair_intervals(run_dir, {bench: models}, names[0], name, seed=seed).get(bench)
            if iv:
                out.setdefault(bench, {})[name] = iv
    return out


def pair_intervals(
    run_dir: Path, section: Mapping[str, Mapping[str, Mapping[str, Any]]], a: str, b: str, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """{benchmark: intervals of model b - model a} over the problems both were evaluated on, for every benchmark
    holding both: the eval stage's stored intervals when `a` is its reference, else from both models' eval shards."""
    out: dict[str, dict[str, Any]] = {}
    for bench, models in section.items():
        if a not in models or b not in models:
            continue
        stored = models[b].get("intervals")
        if stored and list(models)[0] == a:
            out[bench] = stored
            continue
        rows_a, rows_b = read_eval_rows(run_dir, bench, a), read_eval_rows(run_dir, bench, b)
        if rows_a is None or rows_b is None:
            continue
        ks = sorted({int(k) for m in (models[a], models[b]) for k in m.get("pass_at_k") or {}})
        iv = paired_eval_intervals(problem_outcomes(rows_a), problem_outcomes(rows_b), ks, seed=seed)
        if iv["num_problems"]:
            out[bench] = iv
    return out


def run_intervals(run_a: Path, run_b: Path, bench: str, model: str, ks: list[int]) -> dict[str, Any] | None:
    """Intervals of run B - run A for one (benchmark, model), paired by problem; None without both runs' shards."""
    a, b = read_eval_rows(run_a, bench, model), read_eval_rows(run_b, bench, model)
    if a is None or b is None:
        return None
    iv = paired_eval_intervals(problem_outcomes(a), problem_outcomes(b), ks)
    return iv if iv["num_problems"] else None

"""Prefect tasks for evaluation and the run report.

Layout: `<run_dir>/eval/<benchmark>/_problems/` (the benchmark's problems, sharded), `<run_dir>/eval/<benchmark>/
<model>/part-*.parquet` (EVAL_SAMPLES, one shard per problem shard) with a manifest holding that pair's metrics, and
`<run_dir>/eval/results.parquet` (EVAL_RESULTS) with `eval/_manifest.json` written last. Each (benchmark, model)
directory is a stage keyed by content like the factory's stages, so a rerun only evaluates what changed.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from ckptdpo import evaluate
from ckptdpo.backends.base import GenerationRequest
from ckptdpo.configs import BackendConfig, EvalConfig, ProblemsConfig, Recipe, VerifyConfig
from ckptdpo.evaluate import ModelSpec
from ckptdpo.report import eval_intervals
from ckptdpo.resample import stable_seed
from ckptdpo.schemas import EVAL_PROBLEMS, EVAL_RESULTS, EVAL_SAMPLES, SCHEMA_VERSION, make_table
from ckptdpo.shards import (
    MANIFEST,
    atomic_write_bytes,
    file_sha256,
    listed_shards,
    prepare_stage,
    read_manifest,
    read_shard,
    shard_path,
    update_stats,
    write_manifest,
    write_shard,
)
from ckptdpo.sources import load_eval_problems
from tasks.backends import backend_session, model_fingerprint
from tasks.common import content_cache_key, content_key
from tasks.environment import hub_offline
from tasks.planning import (
    RETRY,
    StagePlan,
    artifact_key,
    backend_key,
    check_failures,
    check_requests,
    fingerprints,
    plan_stage,
    shard_exists,
)

RESULTS_FILE = "results.parquet"


def problems_stage(benchmark: str) -> str:
    return f"eval/{benchmark}/_problems"


def samples_stage(benchmark: str, model_name: str) -> str:
    return f"eval/{benchmark}/{model_name}"


@task(name="load_benchmark", task_run_name="load-benchmark-{benchmark}", **RETRY)
def load_benchmark(
    run_dir: str, benchmark: str, problems: ProblemsConfig, shard_size: int, base_dir: str, exclude_training: bool
) -> dict[str, Any]:
    """Load one benchmark's problems, drop those the run trained on, and shard them (when their content changed)."""
    cfg = problems
    rows, excluded = load_eval_problems(cfg, base_dir=Path(base_dir), offline=hub_offline()), 0
    training = Path(run_dir) / "problems"
    if exclude_training and read_manifest(training) is not None:
        shards = listed_shards(training)
        texts = [t for p in shards for t in read_shard(p, ["problem"]).column("problem").to_pylist()]
        rows, excluded = evaluate.exclude_problems(rows, texts)
    if excluded:
        get_run_logger().info("%s: %d problems also in the training set left out", benchmark, excluded)
    key = content_key("eval-problems", rows)[:16]
    stage = Path(run_dir) / problems_stage(benchmark)
    if not prepare_stage(stage, key):
        for i in range(0, len(rows), shard_size):
            write_shard(stage, i // shard_size, make_table(rows[i : i + shard_size], EVAL_PROBLEMS))
        source = rows[0]["source"] if rows else cfg.source
        stats = {"num_problems": len(rows), "num_excluded": excluded, "source": source, "kind": cfg.kind}
        write_manifest(stage, config_hash=key, stats=stats)
    return read_manifest(stage)["stats"]


def plan_eval(run_dir: str, recipe: Recipe, model: ModelSpec, bench: str, kind: str) -> StagePlan:
    """One (benchmark, model): keyed by the benchmark's problems, the sampling settings (and the sandbox limits for
    code), the backend and the model's content fingerprint (the same one for a base and a freshly trained model)."""
    cfg = recipe.eval
    sampling = cfg.model_dump(mode="json", include={"num_samples", "temperature", "top_p", "max_tokens", "seed"})
    if kind == "math" and recipe.generate.few_shot:
        sampling["few_shot"] = recipe.generate.few_shot_pairs()
    if kind == "code":
        limits = {"code_wall_s", "code_cpu_s", "code_memory_mb", "code_max_processes"}
        sampling = {**sampling, **cfg.model_dump(mode="json", include=limits)}
    return plan_stage(
        run_dir,
        samples_stage(bench, model.name),
        fingerprints(run_dir, problems_stage(bench)),
        sampling,
        backend_key(model.backend),
        model_fingerprint(model.backend),
        shards_of=problems_stage(bench),
    )


@task(name="evaluate_samples", task_run_name="eval-{benchmark}-{model_name}-shard-{index}",
      cache_key_fn=content_cache_key, persist_result=True, **RETRY)  # fmt: skip
def evaluate_shard(
    run_dir: str,
    index: int,
    stage_key: str,
    benchmark: str,
    model_name: str,
    eval: EvalConfig,
    backend: BackendConfig,
    verify: VerifyConfig,
    failure_budget: int = 0,
    few_shot: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """Sample `num_samples` completions per problem of one benchmark shard with one model, verify, write the shard.

    `few_shot`: the recipe's worked examples (math problems), put before math benchmarks' problems as in generation.
    """
    stage = samples_stage(benchmark, model_name)
    if shard_exists(run_dir, stage, index):
        return {"generate_s": 0.0, "verify_s": 0.0}
    cfg, bcfg = eval, backend
    timeout_s, workers = verify.timeout_s, verify.workers
    problems = read_shard(shard_path(Path(run_dir) / problems_stage(benchmark), index)).to_pylist()
    with backend_session(bcfg) as b:
        requests = [
            GenerationRequest(
                prompt=evaluate.kind_prompt(
                    b.chat_prompt(p["problem"], (few_shot or []) if (p.get("kind") or "math") == "math" else []),
                    p["problem"],
                    p.get("kind") or "math",
                ),
                n=cfg.num_samples,
                seed=stable_seed(p["problem_id"], cfg.seed),
                max_tokens=cfg.max_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                route_key=p["problem_id"],
            )
            for p in problems
        ]
        t0 = time.perf_counter()
        results = b.generate(requests)
        generate_s = time.perf_counter() - t0
        model = b.model_id
    failed = [p["problem_id"] for p, r in zip(problems, results, strict=True) if r.error]
    errors = [r.error for r in results if r.error]
    outcome = check_requests(f"eval {benchmark}/{model_name}", index, failed, errors, failure_budget)
    completions = [[s.text for s in r.samples[: cfg.num_samples]] for r in results]
    t0 = time.perf_counter()
    verdicts = evaluate.verify_samples(problems, completions, cfg, timeout_s=timeout_s, workers=workers)
    verify_s = time.perf_counter() - t0
    rows = evaluate.sample_rows(
        benchmark, model_name, model, [p["problem_id"] for p in problems], results, verdicts, cfg.num_samples
    )
    write_shard(Path(run_dir) / stage, index, make_table(rows, EVAL_SAMPLES))
    return {"generate_s": generate_s, "verify_s": verify_s, "failed_requests": len(failed), **outcome}


@task(name="aggregate_eval", **RETRY)
def finalize_eval_model(
    plan: StagePlan, shard_results: list[dict[str, Any]], eval: EvalConfig, failure_budget: int = 0
) -> dict[str, Any]:
    """One (benchmark, model)'s metrics, streamed shard by shard; its manifest is written last.

    A stage already done is re-aggregated only when the k list changed (its shards do not depend on k).
    """
    cfg = eval
    failed = [] if plan.done else check_failures(plan.stage, shard_results, failure_budget)
    old = (read_manifest(plan.directory) or {}).get("stats", {}) if plan.done else {}
    if plan.done and old.get("k") == cfg.k:
        return old
    stats = evaluate.aggregate_shards(evaluate.iter_eval_shards(plan.directory), cfg.num_samples, cfg.k)
    stats["k"] = cfg.k
    for name in ("generate_s", "verify_s", "failed_requests", "wall_s"):
        stats[name] = old.get(name, 0) if plan.done else round(sum(r.get(name, 0) for r in shard_results), 3)
    if not plan.done:
        stats["wall_s"] = round(time.time() - plan.started, 3)
    if plan.done:
        failed = (read_manifest(plan.directory) or {}).get("failed", [])
    write_manifest(plan.directory, config_hash=plan.key, stats=stats, inputs=plan.inputs, failed=failed)
    return stats


@task(name="finalize_eval", **RETRY)
def finalize_eval(
    run_dir: str,
    benchmarks: dict[str, dict[str, Any]],
    models: list[str],
    skipped: dict[str, str],
    eval: EvalConfig,
    started: float,
) -> dict[str, Any]:
    """eta and AES against the reference model, `eval/results.parquet`, the eval manifest (last) and stats.json."""
    cfg = eval
    reference = models[0] if models else ""
    section: dict[str, dict[str, Any]] = {}
    for bench in benchmarks:
        metrics = {}
        for name in models:
            m = read_manifest(Path(run_dir) / samples_stage(bench, name))
            if m is not None:
                metrics[name] = {k: v for k, v in m["stats"].items() if not k.endswith("_s")}
                # The report groups benchmarks by kind; every model's entry carries its benchmark's.
                metrics[name]["kind"] = (benchmarks.get(bench) or {}).get("kind") or "math"
        scores = evaluate.compare_to_reference(metrics, reference, cfg.aes_alpha, cfg.aes_beta, cfg.aes_gamma)
        section[bench] = {name: {**m, **scores[name]} for name, m in metrics.items()}
    rows = evaluate.results_rows(section, reference)
    stage = Path(run_dir) / "eval"
    stage.mkdir(parents=True, exist_ok=True)
    (stage / MANIFEST).unlink(missing_ok=True)
    buf = io.BytesIO()
    pq.write_table(make_table(rows, EVAL_RESULTS), buf)
    atomic_write_bytes(stage / RESULTS_FILE, buf.getvalue())
    sha = file_sha256(stage / RESULTS_FILE)
    manifest = {
        "num_rows": len(rows),
        "num_shards": 1,
        "shards": [
            {
                "name": RESULTS_FILE,
                "num_rows": len(rows),
                "num_bytes": (stage / RESULTS_FILE).stat().st_size,
                "sha256": sha,
            }
        ],
        "schema_version": SCHEMA_VERSION,
        "config_hash": content_key("eval", cfg)[:16],
        "code_version": _code_version(),
        "inputs": {},
        "stats": {
            "reference": reference,
            "models": models,
            "skipped_models": skipped,
            "benchmarks": benchmarks,
            "wall_s": round(time.time() - started, 3),
        },
    }
    atomic_write_bytes(stage / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    # Paired bootstrap intervals over problems for every difference to the reference, so stats.json, the report and
    # `ckptdpo compare` quote the same ones.
    for bench, by_model in eval_intervals(Path(run_dir), section).items():
        for name, iv in by_model.items():
            section[bench][name]["intervals"] = iv
    update_stats(run_dir, "eval", section)
    table = [
        {"benchmark": r["benchmark"], "model": r["model_name"], **{k: _fmt(r[k]) for k in _ARTIFACT_COLUMNS}}
        for r in rows
    ]
    if table:
        create_table_artifact(
            table=table, key=artifact_key(run_dir, "eval-results"), description="ckptdpo eval: per benchmark and model"
        )
    return section


_ARTIFACT_COLUMNS = ("pass_at_1", "mean_tokens", "mean_tokens_incorrect", "length_share", "loop_share", "eta", "aes")


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _code_version() -> str:
    from ckptdpo import __version__

    return __version__

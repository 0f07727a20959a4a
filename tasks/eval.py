"""Prefect tasks for evaluation and the run report.

Layout: `<run_dir>/eval/<benchmark>/_problems/` (the benchmark's problems, sharded), `<run_dir>/eval/<benchmark>/
<model>/part-*.parquet` (EVAL_SAMPLES, one shard per problem shard) with a manifest holding that pair's metrics, and
`<run_dir>/eval/part-00000.parquet` (EVAL_RESULTS: one row per benchmark and model) with `eval/_manifest.json`
written last. Each (benchmark, model) directory is a step keyed by content like the factory's stages, so a rerun only
evaluates what changed; the stage itself is re-aggregated on every run (cheap), since which models it holds follows
from the run (a retrained model is a new step).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from ckptdpo import evaluate, sandbox
from ckptdpo.backends.base import GenerationRequest
from ckptdpo.configs import BackendConfig, EvalConfig, ProblemsConfig, VerifyConfig
from ckptdpo.evaluate import ModelSpec
from ckptdpo.report import ReportSection, benchmark_kinds, eval_intervals, evaluation, skipped_notes
from ckptdpo.report import format_number as fmt
from ckptdpo.resample import stable_seed
from ckptdpo.schemas import EVAL_PROBLEMS, EVAL_RESULTS, EVAL_SAMPLES, make_table
from ckptdpo.shards import (
    MANIFEST,
    listed_shards,
    prepare_stage,
    read_manifest,
    read_shard,
    shard_path,
    write_manifest,
    write_shard,
)
from ckptdpo.sources import load_eval_problems
from tasks.backends import backend_session, close_backends
from tasks.common import content_key
from tasks.environment import hub_offline
from tasks.planning import (
    RETRY,
    StagePlan,
    artifact_key,
    backend_key,
    check_requests,
    fingerprints,
    plan_stage,
    shard_exists,
    shard_task,
)
from tasks.stage import JobStep, RunContext, Shard, ShardStep, Stage, Steps

NAME = "eval"


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


def plan_eval(ctx: RunContext, model: ModelSpec, bench: str, kind: str) -> StagePlan:
    """One (benchmark, model): keyed by the benchmark's problems, the sampling settings (and the sandbox limits for
    code), the backend and the model's content fingerprint (the same one for a base and a freshly trained model)."""
    recipe = ctx.recipe
    cfg = recipe.eval
    sampling = cfg.model_dump(mode="json", include={"num_samples", "temperature", "top_p", "max_tokens", "seed"})
    if kind == "math" and recipe.generate.few_shot:
        sampling["few_shot"] = recipe.generate.few_shot_pairs()
    if kind == "code":
        limits = {"code_wall_s", "code_cpu_s", "code_memory_mb", "code_max_processes"}
        sampling = {**sampling, **cfg.model_dump(mode="json", include=limits)}
    return plan_stage(
        ctx.run_dir,
        samples_stage(bench, model.name),
        fingerprints(ctx.run_dir, problems_stage(bench)),
        sampling,
        backend_key(model.backend),
        ctx.fingerprint(model.backend),
        shards_of=problems_stage(bench),
    )


def benchmarks_of(ctx: RunContext) -> dict[str, ProblemsConfig]:
    """The recipe's benchmarks (held-out demo problems for a demo recipe without any)."""
    return evaluate.resolve_benchmarks(ctx.recipe.eval, ctx.recipe.problems, source="recipe")


def check_eval(ctx: RunContext) -> None:
    """Benchmarks are named, and a machine that cannot sandbox model-written code says so before any model loads."""
    if any(b.kind == "code" for b in benchmarks_of(ctx).values()):
        sandbox.require_isolation(ctx.recipe.eval.allow_unsandboxed)


@shard_task("evaluate_samples", "eval-{benchmark}-{model_name}-shard-{shard.index}")
def evaluate_shard(
    shard: Shard,
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
    run_dir, index = shard.run_dir, shard.index
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


def summarize_eval_model(cfg: EvalConfig, plan: StagePlan) -> dict[str, Any]:
    """One (benchmark, model)'s metrics, streamed shard by shard (they do not depend on k, the metrics do)."""
    stats = evaluate.aggregate_shards(evaluate.iter_eval_shards(plan.directory), cfg.num_samples, cfg.k)
    return {**stats, "k": cfg.k}


@task(name="write_eval_results", **RETRY)
def write_eval_results(
    run_dir: str,
    benchmarks: dict[str, dict[str, Any]],
    models: list[str],
    skipped: dict[str, str],
    eval: EvalConfig,
) -> dict[str, Any]:
    """eta and AES against the reference model, the results table (the stage's shard) and the paired intervals."""
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
    stage = Path(run_dir) / NAME
    (stage / MANIFEST).unlink(missing_ok=True)  # the results change before the manifest says so
    write_shard(stage, 0, make_table(rows, EVAL_RESULTS))
    # Paired bootstrap intervals over problems for every difference to the reference, so stats.json, the report and
    # `ckptdpo compare` quote the same ones.
    for bench, by_model in eval_intervals(Path(run_dir), section).items():
        for name, iv in by_model.items():
            section[bench][name]["intervals"] = iv
    table = [
        {"benchmark": r["benchmark"], "model": r["model_name"], **{k: _fmt(r[k]) for k in _ARTIFACT_COLUMNS}}
        for r in rows
    ]
    if table:
        create_table_artifact(
            table=table, key=artifact_key(run_dir, "eval-results"), description="ckptdpo eval: per benchmark and model"
        )
    return {"reference": reference, "models": models, "skipped_models": skipped, "benchmarks": benchmarks,
            "by_benchmark": section}  # fmt: skip


_ARTIFACT_COLUMNS = ("pass_at_1", "mean_tokens", "mean_tokens_incorrect", "length_share", "loop_share", "eta", "aes")


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


class Eval(Stage):
    """pass@k, cons@k, tokens and efficiency of the base and trained models."""

    name = NAME
    settings = ("generate", "verify")
    writes = {NAME: EVAL_RESULTS, "eval/*/_problems": EVAL_PROBLEMS, "eval/*/*": EVAL_SAMPLES}
    report = (
        ReportSection(
            "passk",
            "pass@k: base vs trained",
            lambda r: r.eval_or(lambda: evaluation.section_pass_at_k(r.section) + skipped_notes(r)),
        ),
        ReportSection(
            "acctokens",
            "Accuracy vs tokens",
            lambda r: r.eval_or(lambda: evaluation.section_accuracy_tokens(r.section)),
        ),
        ReportSection(
            "metrics",
            "Metrics",
            lambda r: r.eval_or(
                lambda: evaluation.section_tables(
                    r.section, benchmark_kinds(r.run_dir, r.section), r.intervals(), skipped_notes(r), r.reference()
                )
            ),
        ),  # fmt: skip
    )

    def plan(self, ctx: RunContext) -> StagePlan:
        """Never done as a whole: each (benchmark, model) step is keyed and skipped on its own, and nothing is cleared
        here (a changed setting clears only the steps it changes)."""
        return StagePlan(stage=NAME, run_dir=ctx.run_dir, key=content_key(NAME, ctx.recipe.eval)[:16], done=False)

    def steps(self, ctx: RunContext, plan: StagePlan) -> Steps:
        """Every model on every benchmark, one model loaded at a time, then the results against the reference."""
        recipe, cfg = ctx.recipe, ctx.recipe.eval
        check_eval(ctx)
        benchmarks = benchmarks_of(ctx)
        models, skipped = evaluate.resolve_models(cfg, recipe.backend, Path(ctx.run_dir))
        for name, reason in skipped.items():
            get_run_logger().warning("model %s skipped: %s", name, reason)
        if models and models[0].backend != recipe.backend:
            close_backends()  # the pipeline's generation backend may still be loaded; one in-process model at a time
        bench_stats = {}
        for name, pcfg in benchmarks.items():
            params = {"run_dir": ctx.run_dir, "benchmark": name, "problems": pcfg, "shard_size": cfg.shard_size}
            params |= {"base_dir": ctx.base_dir, "exclude_training": cfg.exclude_training_problems}
            bench_stats[name] = yield JobStep(load_benchmark, params)
        for spec in models:
            for bench, pcfg in benchmarks.items():
                params = {"benchmark": bench, "model_name": spec.name, "eval": cfg, "backend": spec.backend}
                params |= {"verify": recipe.verify, "few_shot": recipe.generate.few_shot_pairs()}
                yield ShardStep(
                    plan_eval(ctx, spec, bench, pcfg.kind),
                    evaluate_shard,
                    params,
                    recipe.failure_budget.eval,
                    summarize=functools.partial(summarize_eval_model, cfg),
                    always_summarize=True,  # a changed k list re-aggregates the kept shards without generating again
                )
            close_backends()  # one loaded model at a time: two in-process engines would not fit on one GPU
        yield JobStep(
            write_eval_results,
            {"run_dir": ctx.run_dir, "benchmarks": bench_stats, "models": [m.name for m in models], "skipped": skipped,
             "eval": cfg},
        )  # fmt: skip

    def summarize(self, ctx: RunContext, plan: StagePlan, outcomes: list[Any]) -> dict[str, Any]:
        return outcomes[-1]

    def published(self, stats: dict[str, Any]) -> dict[str, Any]:
        return stats["by_benchmark"]

    def headline(self, s: Mapping[str, Any]) -> str:
        return "; ".join(
            f"{bench}: "
            + ", ".join(
                f"{model} {fmt(m.get('pass_at_1'))} ({fmt(m.get('mean_tokens'))} tok)"
                for model, m in models.items()
                if isinstance(m, dict) and "pass_at_1" in m
            )
            for bench, models in s.items()
            if isinstance(models, dict)
        )

    def preflight(self, ctx: RunContext) -> None:
        check_eval(ctx)


STAGE = Eval()

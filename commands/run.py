"""CLI handlers that run flows: `ckptdpo run`, `ckptdpo demo`, `ckptdpo status`.

Everything a user can get wrong (the recipe, the model reference, the problem file) is checked before the
first byte is written into the run directory, so a bad invocation leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ckptdpo.configs import STAGES, BackendConfig, Recipe, parse_override
from ckptdpo.errors import UserError
from ckptdpo.models import check_model_dir, resolve_model
from ckptdpo.problems import load_problems
from ckptdpo.shards import MANIFEST, check_shards_present, read_manifest, read_stats
from flows import progress
from tasks.environment import hub_offline
from tasks.rundir import run_dir_lock
from tasks.stopping import stop_on_signals

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "recipes" / "demo.yaml"
RECIPE_COPY = "recipe.yaml"


# What each stage reads, so `--stages` that skips a stage whose output is missing fails before anything is written.
STAGE_INPUTS = {
    "verify": ("generate",),
    "checkpoints": ("generate", "verify"),
    "resample": ("generate", "verify", "checkpoints"),
    "dto": ("generate", "verify", "checkpoints"),
}


def check_backend(cfg: BackendConfig, where: str, home: Path) -> None:
    """Load what the backend will need (model config and tokenizer, a fake script), not just check a path."""
    if cfg.kind in ("hf", "vllm"):
        path = resolve_model(cfg.model, home, offline=hub_offline())
        check_model_dir(path, f"{where}.model")
    elif cfg.kind == "fake":
        from ckptdpo.backends.fake import FakeBackend

        FakeBackend.from_config(cfg)  # parses the script: a malformed one is one sentence, now


def check_run_dir_files(run_dir: Path) -> None:
    """Every manifest and the stats file a run would read parse (a damaged one is a sentence naming it, now)."""
    if run_dir.is_dir():
        read_stats(run_dir)
        for manifest in sorted(run_dir.rglob(MANIFEST)):
            read_manifest(manifest.parent)


def check_stage_inputs(run_dir: Path, wanted: list[str]) -> None:
    """Each stage's inputs are run too, or are finished in `run_dir` with their shards present (a cheap size check;
    the stage that wrote them rewrites damaged ones when it runs)."""
    for stage in wanted:
        for needed in STAGE_INPUTS.get(stage, ()):
            if needed in wanted:
                continue
            if read_manifest(run_dir / needed) is None:
                raise UserError(
                    f"--stages {','.join(wanted)}: stage {stage} reads {needed}, which {run_dir} does not have; "
                    f"add it (--stages {needed},{','.join(wanted)}) or run the whole recipe."
                )
            check_shards_present(run_dir / needed, f"add {needed} to --stages to rewrite it")


def preflight(recipe: Recipe, recipe_path: Path, run_dir: Path, home: Path, stages: list[str]) -> None:
    """Fail fast, with one sentence and before anything is written, on what would fail minutes into a run."""
    check_run_dir_files(run_dir)
    check_stage_inputs(run_dir, stages)
    check_backend(recipe.backend, "backend", home)
    if recipe.dto.judge.backend is not None and "dto" in stages and recipe.dto.prune:
        check_backend(recipe.dto.judge.backend, "dto.judge.backend", home)
    if "generate" in stages:
        load_problems(recipe.problems, base_dir=recipe_path.resolve().parent, offline=hub_offline())
    from flows.runners import check_task_runner

    check_task_runner(recipe)  # a cluster runner with an in-process model, or a missing package: before any write


def run_recipe(
    recipe_path: Path, run_dir: Path, overrides: dict[str, Any], stages: list[str] | None, home: Path
) -> dict:
    recipe = Recipe.from_yaml(recipe_path, overrides)
    wanted = stages or list(recipe.stages)
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise UserError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}.")
    with run_dir_lock(run_dir, create=False):
        preflight(recipe, recipe_path, run_dir, home, wanted)
        return _run_locked(recipe, recipe_path, run_dir, overrides, wanted)


def _run_locked(recipe: Recipe, recipe_path: Path, run_dir: Path, overrides: dict[str, Any], wanted: list[str]):
    from flows.pipeline import pipeline_flow

    with run_dir_lock(run_dir), stop_on_signals():
        return _run_with_progress(recipe, recipe_path, run_dir, overrides, wanted, pipeline_flow)


def _run_with_progress(recipe, recipe_path, run_dir, overrides, wanted, pipeline_flow) -> dict:
    """The pipeline flow with rich progress bars per stage, then the summary table."""
    (run_dir / RECIPE_COPY).write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    t0 = time.time()
    with Progress(
        TextColumn("{task.description:<20}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("shards"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as bars:
        ids: dict[str, Any] = {}

        def show(stage: str, done: int, total: int) -> None:
            if stage not in ids:
                ids[stage] = bars.add_task(stage, total=total)
            bars.update(ids[stage], completed=done, total=total)

        unsubscribe = progress.subscribe(show)
        try:
            result = pipeline_flow(str(recipe_path.resolve()), str(run_dir.resolve()), overrides, wanted)
        finally:
            unsubscribe()
    print_summary(run_dir, time.time() - t0)
    return result


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return dict(parse_override(o) for o in args.overrides)


def run_command(args: argparse.Namespace, home: Path) -> int:
    stages = None
    if args.stages is not None:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        if not stages:
            raise UserError(f"--stages {args.stages!r} names no stage; list stages like generate,verify.")
        twice = sorted({s for s in stages if stages.count(s) > 1})
        if twice:
            raise UserError(f"--stages names {', '.join(twice)} more than once; name each stage once.")
    run_recipe(Path(args.recipe), Path(args.run_dir), _overrides(args), stages, home)
    return 0


def demo_command(args: argparse.Namespace, home: Path) -> int:
    """The demo recipe; its DTO judge is the demo model behind a real `transformers serve` process on loopback
    (started here, stopped at the end), reached through the openai backend the way production reaches vLLM."""
    overrides = _overrides(args)
    recipe = Recipe.from_yaml(DEMO_RECIPE, overrides)
    served_judge = "dto" in recipe.stages and recipe.dto.prune and recipe.dto.judge.backend is None
    if not served_judge or recipe.backend.kind != "hf":
        run_recipe(DEMO_RECIPE, Path(args.run_dir), overrides, None, home)
        return 0
    from commands.localserver import transformers_server

    model = resolve_model(recipe.backend.model, home, offline=hub_offline())
    with transformers_server(model, home / "logs" / "demo-judge-server.log") as url:
        judge = {"kind": "openai", "model": str(model), "base_urls": [url], "max_concurrency": 1}
        run_recipe(DEMO_RECIPE, Path(args.run_dir), {**overrides, "dto.judge.backend": judge}, None, home)
    return 0


def print_summary(run_dir: Path, wall_s: float) -> None:
    stats = read_stats(run_dir)
    console = Console()
    table = Table(title=f"ckptdpo run {run_dir} ({wall_s:.0f} s)")
    table.add_column("stage")
    table.add_column("summary")
    for stage, s in stats.items():
        table.add_row(stage, _headline(stage, s))
    console.print(table)
    pairs = run_dir / "pairs"
    if pairs.exists():
        console.print(f"pairs: {pairs}")


def _headline(stage: str, s: dict[str, Any]) -> str:
    if stage == "problems":
        return f"{s.get('num_problems')} problems ({s.get('num_invalid', 0)} invalid skipped)"
    if stage == "generate":
        return f"{s.get('num_samples')} samples, {s.get('completion_tokens')} tokens, finish {s.get('finish_reasons')}"
    if stage == "verify":
        return f"accuracy {s.get('accuracy')}, {s.get('by_status')}"
    if stage == "checkpoints":
        by = s.get("by_correctness", {})
        return ", ".join(f"{k}: {v['checkpoints']['mean']} ckpt/traj" for k, v in by.items() if v.get("count"))
    if stage == "resample":
        p = s.get("pairs", {})
        per_1k = p.get("pairs_per_1k_generated_tokens")
        return f"{len(s.get('rounds', []))} rounds, pairs {p.get('by_type')}, {per_1k} per 1k generated tokens"
    if stage == "eval":
        return "; ".join(
            f"{bench}/{model}: pass@1 {m.get('pass_at_1')}, {m.get('mean_tokens')} tokens"
            for bench, models in s.items()
            if isinstance(models, dict)
            for model, m in models.items()
            if isinstance(m, dict) and "pass_at_1" in m
        )
    keys = [k for k, v in s.items() if not isinstance(v, (dict, list))][:6]
    return ", ".join(f"{k}={s[k]}" for k in keys)


def status_command(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory; pass the --run-dir of a run.")
    recipe_file = run_dir / RECIPE_COPY
    wanted = yaml.safe_load(recipe_file.read_text()).get("stages", []) if recipe_file.exists() else list(STAGES)
    table = Table(title=f"status of {run_dir}")
    for col in ("stage", "state", "rows", "shards", "wall_s"):
        table.add_column(col)
    for stage in ["problems", *wanted, "pairs"]:
        d = run_dir / stage
        m = read_manifest(d)
        if m:
            table.add_row(stage, "done", str(m["num_rows"]), str(m["num_shards"]), str(m["stats"].get("wall_s", "")))
        elif d.exists():
            partial = len(list(d.rglob("part-*.parquet")))
            table.add_row(stage, "[yellow]partial[/]", "", f"{partial} written", "")
        else:
            table.add_row(stage, "[dim]to do[/]", "", "", "")
    Console().print(table)
    stats = read_stats(run_dir)
    if stats:
        Console().print_json(json.dumps({k: _headline(k, v) for k, v in stats.items()}))
    return 0

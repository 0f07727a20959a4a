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

from ckptdpo.configs import STAGES, Recipe, parse_override
from ckptdpo.errors import UserError
from ckptdpo.shards import MANIFEST, check_shards_present, read_manifest, read_stats
from flows import progress
from tasks import registry
from tasks.backends import check_backend
from tasks.rundir import run_dir_lock
from tasks.stage import RunContext
from tasks.stopping import stop_on_signals

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "recipes" / "demo.yaml"
RECIPE_COPY = "recipe.yaml"


def check_run_dir_files(run_dir: Path) -> None:
    """Every manifest and the stats file a run would read parse (a damaged one is a sentence naming it, now)."""
    if run_dir.is_dir():
        read_stats(run_dir)
        for manifest in sorted(run_dir.rglob(MANIFEST)):
            read_manifest(manifest.parent)


def check_stage_inputs(run_dir: Path, wanted: list[str]) -> None:
    """Each stage's inputs are run too, or are finished in `run_dir` with their shards present (a cheap size check;
    the stage that wrote them rewrites damaged ones when it runs). The inputs are the registry's declarations."""
    running = [s.name for s in registry.stages_to_run(wanted)]
    for spec in registry.stages_to_run(wanted):
        if spec.implicit:
            continue  # it reads what the stages before it made, whichever of them ran
        for directory in spec.reads:
            producer = registry.producer_of(directory)
            if producer in running or any(ch in directory for ch in "*?["):
                continue
            if read_manifest(run_dir / directory) is None:
                makers = _named_producers(producer)
                raise UserError(
                    f"--stages {','.join(wanted)}: stage {spec.name} reads {directory}, which {run_dir} does not "
                    f"have; add {' or '.join(makers)} (--stages {makers[0]},{','.join(wanted)}) or run the whole "
                    "recipe."
                )
            check_shards_present(run_dir / directory, f"add {producer} to --stages to rewrite it")


def _named_producers(producer: str | None) -> list[str]:
    """The recipe stages that make a directory: its producer, or for an implicit one the stages it gathers from."""
    spec = registry.registry().get(producer or "")
    if spec is None or not spec.implicit:
        return [producer or "?"]
    return [registry.producer_of(d) or d for d in spec.reads]


def preflight(ctx: RunContext, stages: list[str]) -> None:
    """Fail fast, with one sentence and before anything is written, on what would fail minutes into a run."""
    run_dir = Path(ctx.run_dir)
    check_run_dir_files(run_dir)
    check_stage_inputs(run_dir, stages)
    check_backend(ctx.recipe.backend, "backend", ctx.model_path)
    for spec in registry.stages_to_run(stages):
        if spec.preflight is not None:
            spec.preflight(ctx)
    from flows.runners import check_task_runner

    check_task_runner(ctx.recipe)  # a cluster runner with an in-process model, or a missing package: before any write


def run_recipe(recipe: Recipe, recipe_path: Path, run_dir: Path, stages: list[str] | None) -> dict:
    """Run a recipe that was loaded (and validated) once, by the caller."""
    wanted = stages or list(recipe.stages)
    try:
        from ckptdpo.configs.recipe import check_stage_names

        check_stage_names(wanted, "--stages")
    except ValueError as e:
        raise UserError(f"{e}.") from None
    ctx = RunContext(recipe=recipe, run_dir=str(run_dir), base_dir=str(recipe_path.resolve().parent))
    with run_dir_lock(run_dir, create=False):
        preflight(ctx, wanted)
    with run_dir_lock(run_dir), stop_on_signals():
        return _run_with_progress(ctx, wanted)


def _run_with_progress(ctx: RunContext, wanted: list[str]) -> dict:
    """The pipeline flow with rich progress bars per stage, then the summary table."""
    from flows.pipeline import pipeline_flow

    run_dir = Path(ctx.run_dir)
    (run_dir / RECIPE_COPY).write_text(yaml.safe_dump(ctx.recipe.model_dump(mode="json"), sort_keys=False))
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
            result = pipeline_flow(run_dir=str(run_dir.resolve()), stages_to_run=wanted, ctx=ctx)
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
    recipe = Recipe.from_yaml(args.recipe, _overrides(args))
    run_recipe(recipe, Path(args.recipe), Path(args.run_dir), stages)
    return 0


def demo_command(args: argparse.Namespace, home: Path) -> int:
    """The demo recipe; its DTO judge is the demo model behind a real `transformers serve` process on loopback
    (started here, stopped at the end), reached through the openai backend the way production reaches vLLM."""
    recipe = Recipe.from_yaml(DEMO_RECIPE, _overrides(args))
    served_judge = "dto" in recipe.stages and recipe.dto.prune and recipe.dto.judge.backend is None
    if not served_judge or recipe.backend.kind != "hf":
        run_recipe(recipe, DEMO_RECIPE, Path(args.run_dir), None)
        return 0
    from commands.localserver import transformers_server
    from tasks.backends import resolve_local_model

    model = resolve_local_model(recipe.backend.model)
    with transformers_server(Path(model), home / "logs" / "demo-judge-server.log") as url:
        judge = {"kind": "openai", "model": str(model), "base_urls": [url], "max_concurrency": 1}
        dump = recipe.model_dump(mode="json")
        dump["dto"]["judge"]["backend"] = judge
        run_recipe(Recipe.from_dict(dump, source=str(DEMO_RECIPE)), DEMO_RECIPE, Path(args.run_dir), None)
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
    """A stage's one line (its declaration's headline); sections that are no stage's show their plain figures."""
    spec = registry.registry().get(stage)
    if spec is not None:
        return spec.headline(s)
    if stage == "problems":
        return f"{s.get('num_problems')} problems ({s.get('num_invalid', 0)} invalid skipped)"
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
    for spec in registry.stages_to_run(wanted):
        for directory in spec.directories:
            d = run_dir / directory
            m = read_manifest(d)
            if m:
                wall = str(m["stats"].get("wall_s", ""))
                table.add_row(directory, "done", str(m["num_rows"]), str(m["num_shards"]), wall)
            elif d.exists():
                partial = len(list(d.rglob("part-*.parquet")))
                table.add_row(directory, "[yellow]partial[/]", "", f"{partial} written", "")
            else:
                table.add_row(directory, "[dim]to do[/]", "", "", "")
    Console().print(table)
    stats = read_stats(run_dir)
    if stats:
        Console().print_json(json.dumps({k: _headline(k, v) for k, v in stats.items()}))
    return 0

"""CLI handlers that run flows: `ckptdpo run`, `ckptdpo demo`, `ckptdpo status`.

Everything a user can get wrong (the recipe, the model reference, the problem file) is checked before the
first byte is written into the run directory, so a bad invocation leaves nothing behind.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import time
import warnings
from contextlib import contextmanager
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
            makers = _named_producers(producer)
            if read_manifest(run_dir / directory) is None:
                raise UserError(
                    f"--stages {','.join(wanted)}: stage {spec.name} reads {directory}, which {run_dir} does not "
                    f"have; add {' or '.join(makers)} (--stages {makers[0]},{','.join(wanted)}) or run the whole "
                    "recipe."
                )
            check_shards_present(
                run_dir / directory, f"add {makers[0]} to --stages to rewrite it", schema=registry.schema_of(directory)
            )


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


def run_recipe(
    recipe: Recipe,
    recipe_path: Path,
    run_dir: Path,
    stages: list[str] | None,
    verbose: bool = False,
    overrides: dict[str, Any] | None = None,
) -> dict:
    """Run a recipe that was loaded (and validated) once, by the caller, with its `--set` `overrides`; `verbose`
    keeps every log line in the terminal (else Prefect's per-task lines and library warnings go only to the Prefect
    UI's logs)."""
    wanted = stages or list(recipe.stages)
    try:
        from ckptdpo.configs.recipe import check_stage_names

        check_stage_names(wanted, "--stages")
    except ValueError as e:
        raise UserError(f"{e}.") from None
    check_overrides_used(overrides or {}, wanted)
    ctx = RunContext(recipe=recipe, run_dir=str(run_dir), base_dir=str(recipe_path.resolve().parent))
    with run_dir_lock(run_dir, create=False):
        preflight(ctx, wanted)
    with run_dir_lock(run_dir), stop_on_signals(), quiet_console(verbose):
        return _run_with_progress(ctx, wanted)


_MUTED_AT_EXIT: set[logging.Handler] = set()


def _mute_at_exit() -> None:
    """Prefect's console handlers above INFO for the interpreter's exit (its temporary API stops then)."""
    for h in _MUTED_AT_EXIT:
        h.setLevel(max(h.level, logging.WARNING))


@contextmanager
def quiet_console(verbose: bool):
    """Prefect's console lines below WARNING and library warnings stay out of the terminal: the Prefect API still
    gets every line (its handler is apart), and `-v` keeps them all."""
    if verbose:
        yield
        return
    import transformers
    from prefect.logging.handlers import PrefectConsoleHandler

    # Prefect's console handlers, and the root's stream handler that Prefect's records propagate to.
    loggers = [logging.getLogger(), *[logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict)]]
    handlers = {h for lg in loggers for h in getattr(lg, "handlers", []) if isinstance(h, PrefectConsoleHandler)}
    handlers |= {h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler}
    levels = {h: h.level for h in handlers}
    verbosity = transformers.logging.get_verbosity()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        transformers.logging.set_verbosity_error()
        for h in handlers:
            h.setLevel(max(h.level, logging.WARNING))
        try:
            yield
        finally:
            for h, level in levels.items():
                h.setLevel(level)
            transformers.logging.set_verbosity(verbosity)
            # Prefect stops its temporary API at exit, with an INFO line under the last screen: our exit hook,
            # registered after its own, runs first and keeps that line in the logs only.
            if not _MUTED_AT_EXIT:
                atexit.register(_mute_at_exit)
            _MUTED_AT_EXIT.update(handlers)


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
    overrides = _overrides(args)
    recipe = Recipe.from_yaml(args.recipe, overrides)
    run_recipe(recipe, Path(args.recipe), Path(args.run_dir), stages, verbose=args.verbose, overrides=overrides)
    return 0


def check_overrides_used(overrides: dict[str, Any], stages: list[str]) -> None:
    """A `--set` on a stage's section that no stage of this run reads would do nothing: refused."""
    running = registry.stages_to_run(stages)
    read = registry.sections_read(running)
    for key, value in overrides.items():
        section = key.split(".")[0]
        if section in STAGES and section not in read:
            raise UserError(
                f"--set {key}={value} does nothing: no stage of this run ({', '.join(s.name for s in running)}) "
                f"reads the {section} section; add {section} to --stages or drop the --set."
            )


def demo_command(args: argparse.Namespace, home: Path) -> int:
    """The demo recipe; its DTO judge is the demo model behind a real `transformers serve` process on loopback
    (started here, stopped at the end), reached through the openai backend the way production reaches vLLM."""
    recipe = Recipe.from_yaml(DEMO_RECIPE, _overrides(args))
    served_judge = "dto" in recipe.stages and recipe.dto.prune and recipe.dto.judge.backend is None
    if not served_judge or recipe.backend.kind != "hf":
        run_recipe(recipe, DEMO_RECIPE, Path(args.run_dir), None, verbose=args.verbose)
        return 0
    from commands.localserver import transformers_server
    from tasks.backends import resolve_local_model

    model = resolve_local_model(recipe.backend.model)
    with transformers_server(Path(model), home / "logs" / "demo-judge-server.log") as url:
        judge = {"kind": "openai", "model": str(model), "base_urls": [url], "max_concurrency": 1}
        dump = recipe.model_dump(mode="json")
        dump["dto"]["judge"]["backend"] = judge
        demo = Recipe.from_dict(dump, source=str(DEMO_RECIPE))
        run_recipe(demo, DEMO_RECIPE, Path(args.run_dir), None, verbose=args.verbose)
    return 0


def print_summary(run_dir: Path, wall_s: float) -> None:
    """The run's last screen: the answer first (did pass@1 close on pass@k, did tokens fall, is it significant, and
    against GRPO at the same cost), then where its outputs are, then one line per stage in pipeline order."""
    from ckptdpo.report import ReportRun, cost_matched_view

    console = Console()
    stats = read_stats(run_dir)
    console.print(f"\n[bold]ckptdpo run {run_dir}[/] finished in {wall_s:,.0f} s")
    lines = ReportRun(run_dir).headline() if stats.get("eval") else []
    view = cost_matched_view(run_dir, stats)
    lines += (view or {}).get("headline") or []
    if lines:
        console.print("\n[bold]Headline[/] (paired 95% intervals over problems)")
        for line in lines:
            console.print(f"  • {line}", highlight=False)
    outputs = _outputs(run_dir)
    if outputs:
        console.print("\n[bold]Outputs[/]")
        width = max(len(k) for k, _ in outputs)
        for name, where in outputs:
            console.print(f"  {name:<{width}}  {where}", highlight=False)
    table = Table(title="Stages", title_justify="left", show_edge=False, pad_edge=False)
    for col, justify in (("stage", "left"), ("time", "right"), ("summary", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for stage in ["problems", *registry.registry()]:
        s = stats.get(stage)
        if not s:
            continue  # a stage this run did not reach has no row
        wall = (read_manifest(run_dir / stage) or {}).get("stats", {}).get("wall_s")
        table.add_row(stage, f"{wall:,.0f} s" if isinstance(wall, (int, float)) else "", _headline(stage, s))
    console.print()
    console.print(table)


def _outputs(run_dir: Path) -> list[tuple[str, str]]:
    """Where the report, the pairs and the trained models are (those that exist)."""
    out = []
    report = run_dir / "report" / "index.html"
    if report.exists():
        out.append(("report", str(report)))
    pairs = read_manifest(run_dir / "pairs")
    if pairs is not None:
        by_type = ", ".join(f"{k} {v:,}" for k, v in (pairs["stats"].get("by_type") or {}).items()) or "none"
        out.append(("pairs", f"{run_dir / 'pairs'} ({pairs['num_rows']:,} pairs: {by_type})"))
    for name, directory in (("trained model", "train"), ("GRPO model", "grpo")):
        if (run_dir / directory / "model").is_dir():
            out.append((name, str(run_dir / directory / "model")))
    return out


def _headline(stage: str, s: dict[str, Any]) -> str:
    """A stage's one line (its declaration's headline); sections that are no stage's show their plain figures."""
    spec = registry.registry().get(stage)
    if spec is not None:
        return spec.headline(s)
    if stage == "problems":
        return f"{s.get('num_problems'):,} problems from {s.get('source')} ({s.get('num_invalid', 0)} invalid skipped)"
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

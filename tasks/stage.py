"""A pipeline stage, declared once: what it reads and writes, how it is keyed, run, summarized and shown.

Each stage's module in tasks/ (named like its recipe section: tasks/<name>.py) declares `STAGE`, an instance of its
`Stage` subclass (its inputs, outputs, plan, steps, summary, headline, report sections); the
registry (tasks/registry.py) collects them in the recipe's section order. Pipeline order, preflight's "inputs present"
check, `ckptdpo status`, lineage, report sections and deployments are all derived from these declarations.

Every stage runs the same way (flows/stage.py): plan it (its content key; a stage done under its key is skipped), run
its steps, then finalize it (one shared task writes its manifest last, its stats.json section and a table artifact).
A step is a `ShardStep` (one task run per shard of a directory, then that directory's manifest) or a `JobStep` (one
task run). `steps` is a generator: it yields a step and is sent that step's outcome, so a stage with rounds
(resample) decides from one round's outcome whether to run the next.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from ckptdpo.configs import BackendConfig, Recipe
from ckptdpo.report import ReportSection
from tasks.backends import model_fingerprint, resolve_local_model


@dataclass
class StagePlan:
    """What a stage has to do: its directory, content key, and one job per shard still to write."""

    stage: str
    run_dir: str
    key: str
    done: bool
    indices: list[int] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    outputs: list[str] = field(default_factory=list)

    @property
    def directory(self) -> Path:
        return Path(self.run_dir) / self.stage

    @property
    def directories(self) -> list[str]:
        """Every directory its shard tasks write: its own and its outputs (each shard i in all of them)."""
        return [self.stage, *self.outputs]


class RunContext(BaseModel):
    """What every stage of one run shares: the validated recipe (loaded once, at the entry point), the run directory,
    the recipe's folder (relative paths in the recipe are relative to it), and the model fingerprints and paths,
    resolved once per run."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    recipe: Recipe
    run_dir: str
    base_dir: str = Field(".", description="the recipe's folder")
    resolved: dict[str, str] = Field(default_factory=dict, description="model reference -> local path or name")
    fingerprints: dict[str, str] = Field(default_factory=dict, description="backend config -> model fingerprint")

    def model_path(self, model: str) -> str:
        """A backend's `model` as a local path (a hub name is resolved once per run)."""
        if model not in self.resolved:
            self.resolved[model] = resolve_local_model(model)
        return self.resolved[model]

    def fingerprint(self, cfg: BackendConfig) -> str:
        """The model revision of a backend for cache keys, computed once per run and backend."""
        key = cfg.model_dump_json()
        if key not in self.fingerprints:
            self.fingerprints[key] = model_fingerprint(cfg, self.model_path)
        return self.fingerprints[key]


class Shard(NamedTuple):
    """One shard of a step, as its task gets it: the run directory, the shard's index (shard i of every stage comes
    from problem shard i) and the step's content key (so the task's cache key follows the step's)."""

    run_dir: str
    index: int
    key: str


@dataclass
class ShardStep:
    """One task run per shard still to write in `plan`'s directory (and in `outputs`, written by the same task).

    `summarize` (rows of the finished shards -> stats) gives the directory its own manifest; without it the step
    writes the stage's own directory, whose manifest the stage's finalize writes. `always_summarize` re-summarizes a
    step that is already done (eval: a changed k list changes the metrics, not the samples).
    """

    plan: StagePlan
    task: Any
    params: dict[str, Any]
    failure_budget: int = 0
    summarize: Callable[[StagePlan], dict[str, Any]] | None = None
    outputs: tuple[str, ...] = ()
    always_summarize: bool = False


@dataclass
class JobStep:
    """One task run (training, building a stage's pairs from all its shards); its return value is the outcome."""

    task: Any
    params: dict[str, Any] = field(default_factory=dict)


Step = ShardStep | JobStep
Steps = Generator[Step, Any, None]


class Stage:
    """One stage of the pipeline, declared once as a subclass (see the module docstring); its docstring's first line
    describes it (status, deployments).

    `reads`: input directory -> the columns it reads there (checked against earlier stages' `writes` when the registry
    loads). `writes`: directory -> the schema of its shards (None: no shards, e.g. a trained model; `*` matches one
    path component). `pool`: the work pool of its deployment. `pairs`: the directory of the preference pairs it makes
    (gathered into `pairs/`). `lineage`: its settings decide which pairs come out (a change starts a new lineage in
    the refresh). `implicit`: no recipe section; it runs when a stage it reads from runs. `gathers_pairs`: it reads
    every other stage's `pairs` directory (its `reads` are derived from them). `report`: its sections of the report.
    `settings`: the other recipe sections it reads besides its own (a `--set` on a section no running stage reads
    is refused).
    """

    name: str = ""
    reads: Mapping[str, Sequence[str]] = {}
    writes: Mapping[str, pa.Schema | None] = {}
    pool: Literal["cpu", "gpu", "gpu_train"] = "gpu"
    pairs: str | None = None
    lineage: bool = False
    implicit: bool = False
    gathers_pairs: bool = False
    report: tuple[ReportSection, ...] = ()
    settings: tuple[str, ...] = ()

    @property
    def description(self) -> str:
        return (self.__doc__ or self.name).strip().splitlines()[0]

    def plan(self, ctx: RunContext) -> StagePlan:
        """Its content key, and whether it is done under that key (then it is skipped)."""
        raise NotImplementedError

    def steps(self, ctx: RunContext, plan: StagePlan) -> Steps:
        """Its steps, in order; each yield gets that step's outcome back."""
        raise NotImplementedError

    def summarize(self, ctx: RunContext, plan: StagePlan, outcomes: list[Any]) -> dict[str, Any]:
        """Its statistics (manifest and stats.json), from what it wrote and its steps' outcomes."""
        return {}

    def published(self, stats: dict[str, Any]) -> dict[str, Any]:
        """The part of its statistics that goes into stats.json (the manifest keeps them all)."""
        return stats

    def headline(self, stats: Mapping[str, Any]) -> str:
        """One line for the terminal and `ckptdpo status`."""
        keys = [k for k, v in stats.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)][:6]
        return ", ".join(f"{k}={stats[k]}" for k in keys)

    def preflight(self, ctx: RunContext) -> None:
        """What would fail minutes into a run, checked before anything is written (one sentence when it fails)."""

    @property
    def directories(self) -> list[str]:
        """The top-level directories it writes, for status and preflight."""
        tops = [d.split("/")[0] for d in self.writes]
        return list(dict.fromkeys(tops))

    def writes_directory(self, directory: str) -> pa.Schema | None | Literal[False]:
        """The schema this stage writes in `directory` (a `*` in a declared name matches one path component)."""
        for pattern, schema in self.writes.items():
            if Path(directory).match(pattern) and directory.count("/") == pattern.count("/"):
                return schema
        return False


def columns_of(schema: pa.Schema | None) -> set[str]:
    return set(schema.names) if schema is not None else set()

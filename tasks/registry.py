"""The stage registry: every stage's declaration, in pipeline order, with its inputs checked when it loads.

A stage is named by its recipe section (`ckptdpo.configs.STAGES`, in the order the sections are declared) and
declared once, as `STAGE` in tasks/<name>.py. Implicit stages (no recipe section: the pair collection) are declared
in `IMPLICIT` modules and placed right before the first stage that reads what they write. Loading checks, like a DAG
built from step connections, that every column a stage reads is written by an earlier stage: a stage reading a column
nobody writes before it is an error at load time, naming both.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa

from ckptdpo.configs import STAGES
from tasks.stage import Stage, columns_of

IMPLICIT = ("pairs",)


class RegistryError(RuntimeError):
    """A stage declaration contradicts the others (a programming error, caught when the registry loads)."""


def _load(name: str) -> Stage:
    try:
        module = importlib.import_module(f"tasks.{name}")
    except ModuleNotFoundError as e:
        raise RegistryError(f"stage {name}: no module tasks/{name}.py declaring its STAGE ({e})") from None
    spec = getattr(module, "STAGE", None)
    if not isinstance(spec, Stage) or spec.name != name:
        raise RegistryError(
            f"stage {name}: tasks/{name}.py must declare STAGE, a Stage subclass instance named {name!r}"
        )
    return spec


def order_stages(named: Sequence[Stage], implicit: Iterable[Stage]) -> list[Stage]:
    """The named stages in their order, each implicit one right before the first stage reading what it writes."""
    ordered = list(named)
    for spec in implicit:
        readers = [i for i, s in enumerate(ordered) if any(spec.writes_directory(d) is not False for d in s.reads)]
        ordered.insert(readers[0] if readers else len(ordered), spec)
    return ordered


def check_inputs(stages: Sequence[Stage]) -> None:
    """Every directory a stage reads is written by an earlier stage, with every column it reads."""
    for i, spec in enumerate(stages):
        for directory, columns in spec.reads.items():
            writers = [(s, s.writes_directory(directory)) for s in stages[:i]]
            writers = [(s, schema) for s, schema in writers if schema is not False]
            if not writers:
                later = [s.name for s in stages[i:] if s.writes_directory(directory) is not False]
                where = f" (stage {later[0]} writes it, but runs later)" if later else " (no stage writes it)"
                raise RegistryError(f"stage {spec.name} reads {directory}, which no earlier stage writes{where}.")
            writer, schema = writers[-1]
            missing = sorted(set(columns) - columns_of(schema))
            if missing:
                raise RegistryError(
                    f"stage {spec.name} reads column(s) {', '.join(missing)} of {directory}, which stage "
                    f"{writer.name} does not write (it writes {', '.join(sorted(columns_of(schema))) or 'no table'})."
                )


# What a stage gathering pairs reads of each pair directory (the columns every pair table has).
PAIR_COLUMNS = ("pair_id", "pair_type", "problem_id", "prompt", "chosen", "rejected")


def build_registry(names: Sequence[str] = STAGES, implicit: Sequence[str] = IMPLICIT) -> dict[str, Stage]:
    """Load and check the declarations of `names` (pipeline order) and the implicit stages."""
    named = [_load(n) for n in names]
    gatherers = []
    for spec in (_load(n) for n in implicit):
        if spec.gathers_pairs:
            spec.reads = {s.pairs: PAIR_COLUMNS for s in named if s.pairs}
        gatherers.append(spec)
    stages = order_stages(named, gatherers)
    check_inputs(stages)
    return {s.name: s for s in stages}


@functools.cache
def registry() -> dict[str, Stage]:
    """Every stage, in pipeline order (loaded and checked once per process)."""
    return build_registry()


def stage(name: str) -> Stage:
    return registry()[name]


def stages_to_run(wanted: Iterable[str]) -> list[Stage]:
    """The stages to run for the `wanted` recipe stages, in pipeline order: implicit stages run when a stage they
    read from runs."""
    wanted = set(wanted)
    out = []
    for spec in registry().values():
        if spec.name in wanted:
            out.append(spec)
        elif spec.implicit and any(producer_of(d) in wanted for d in spec.reads):
            out.append(spec)
    return out


def sections_read(stages: Iterable[Stage]) -> set[str]:
    """The recipe sections that these stages read: each its own, and the `settings` it borrows."""
    return {section for spec in stages for section in (spec.name, *spec.settings)}


def producer_of(directory: str) -> str | None:
    """The first stage in pipeline order that writes `directory` (the problems: generate, though grpo can too)."""
    writers = [s.name for s in registry().values() if s.writes_directory(directory) is not False]
    return writers[0] if writers else None


def schema_of(directory: str) -> pa.Schema | None:
    """The schema of the shards in `directory`, as the stage writing it declares (None: no shards or no writer)."""
    for spec in registry().values():
        schema = spec.writes_directory(directory)
        if schema is not False:
            return schema
    return None


def data_stages() -> list[Stage]:
    """The named stages that run before the pairs are gathered: the part of the pipeline that makes the data."""
    out = []
    for spec in registry().values():
        if spec.gathers_pairs:
            break
        out.append(spec)
    return out


def lineage_sections() -> tuple[str, ...]:
    """Recipe sections whose settings decide which pairs come out."""
    return tuple(s.name for s in registry().values() if s.lineage)


def report_sections() -> list:
    """The report's sections, in pipeline order of the stages that draw them."""
    return [section for s in registry().values() for section in s.report]


STAGE_ENTRYPOINT = "flows/stage.py:stage_flow"
_POOL_ANCHORS = {"cpu": "cpu_pool", "gpu": "gpu_pool", "gpu_train": "gpu_train_pool"}


def deployment_entries() -> str:
    """The stage deployments of deployments/prefect.yaml, one per named stage, as that file writes them."""
    out = []
    for spec in registry().values():
        if spec.implicit:
            continue
        out.append(
            f"  - name: {spec.name}\n"
            f"    description: {spec.description}\n"
            f"    entrypoint: {STAGE_ENTRYPOINT}\n"
            "    tags: [ckptdpo, stage]\n"
            f"    parameters: {{<<: *run_params, stage: {spec.name}}}\n"
            f"    work_pool: *{_POOL_ANCHORS[spec.pool]}\n"
            "    schedules: []\n"
        )
    return "\n".join(out)


BEGIN = "  # --- stage deployments: written by `python -m tasks.registry --write` from the stage registry ---\n"
END = "  # --- end of stage deployments ---\n"


def write_deployments(path: Path) -> bool:
    """Rewrite the stage deployments between the markers of a deployments file; returns whether it changed."""
    text = path.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + BEGIN + deployment_entries() + "\n" + END + tail
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write"]:
        target = Path(__file__).resolve().parents[1] / "deployments" / "prefect.yaml"
        print(f"{target}: {'rewritten' if write_deployments(target) else 'already up to date'}")
    else:
        print(deployment_entries())

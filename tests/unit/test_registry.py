"""The stage registry: one declaration per stage, and everything else derived from it (and checked against it)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from ckptdpo.configs import STAGES, Recipe
from ckptdpo.errors import UserError
from tasks import registry
from tasks.stage import Stage

REPO = Path(__file__).resolve().parents[2]


def named() -> list[Stage]:
    return [s for s in registry.registry().values() if not s.implicit]


def test_the_pipeline_order_is_the_recipe_sections_order_with_the_pair_collection_before_its_first_reader():
    order = list(registry.registry())
    assert [n for n in order if n in STAGES] == list(STAGES)
    assert set(order) - set(STAGES) == set(registry.IMPLICIT)
    first_reader = min(i for i, s in enumerate(registry.registry().values()) if "pairs" in s.reads)
    assert order.index("pairs") == first_reader - 1
    # Every stage that makes pairs runs before they are gathered, and the gatherer reads each of their directories.
    makers = [s for s in named() if s.pairs]
    assert makers and all(order.index(s.name) < order.index("pairs") for s in makers)
    assert set(registry.stage("pairs").reads) == {s.pairs for s in makers}


def test_every_stage_is_a_recipe_stage_name_and_a_recipe_section():
    recipe = Recipe()
    for spec in named():
        assert spec.name in STAGES and hasattr(recipe, spec.name)
        Recipe.from_dict({"stages": [spec.name]})  # a recipe may name it
    with pytest.raises(UserError, match="unknown stage"):
        Recipe.from_dict({"stages": ["generate", "bogus"]})
    with pytest.raises(UserError, match="more than once"):
        Recipe.from_dict({"stages": ["generate", "verify", "generate"]})


def test_preflight_checks_every_declared_input_of_every_stage(tmp_path: Path):
    from commands.run import check_stage_inputs

    for spec in named():
        inputs = [d for d in spec.reads if registry.producer_of(d) not in (None, spec.name)]
        if not inputs:
            check_stage_inputs(tmp_path, [spec.name])  # reads nothing another stage writes: nothing to miss
            continue
        with pytest.raises(UserError, match=f"stage {spec.name} reads ") as e:
            check_stage_inputs(tmp_path, [spec.name])
        assert any(d in str(e.value) for d in inputs)
        # With every stage before it running too, nothing is missing.
        check_stage_inputs(tmp_path, list(STAGES[: STAGES.index(spec.name) + 1]))


def test_status_lists_every_directory_of_every_stage(tmp_path: Path, capsys):
    from commands.cli import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"stages": list(STAGES)}))
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    for spec in registry.registry().values():
        for directory in spec.directories:
            assert directory in out, directory


def test_the_report_draws_every_registered_section(tmp_path: Path):
    from ckptdpo.report import render_report

    sections = registry.report_sections()
    declared = [sec.anchor for s in registry.registry().values() for sec in s.report]
    assert [s.anchor for s in sections] == declared and len(set(declared)) == len(declared)
    page = render_report(tmp_path, sections)
    for anchor in ["overview", *declared]:
        assert f'<section id="{anchor}">' in page


def test_deployments_file_agrees_with_the_registry():
    config = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    pools = config["definitions"]["work_pools"]
    stage_deployments = {d["name"]: d for d in config["deployments"] if d["entrypoint"] == registry.STAGE_ENTRYPOINT}
    assert list(stage_deployments) == [s.name for s in named()]
    for spec in named():
        d = stage_deployments[spec.name]
        assert d["parameters"]["stage"] == spec.name and d["description"] == spec.description
        assert d["work_pool"] == pools[spec.pool]
    text = (REPO / "deployments" / "prefect.yaml").read_text()
    # The file holds exactly what the registry renders (`python -m tasks.registry --write` brings it up to date).
    assert registry.BEGIN + registry.deployment_entries() + "\n" + registry.END in text


def _declare(reads: dict, writes: dict | None = None) -> None:
    """A stage `bogus` like verify but reading and writing what it is given, as the module tasks.bogus."""

    class Bogus(type(registry.stage("verify"))):
        name = "bogus"

    Bogus.reads, Bogus.writes = reads, writes or {"bogus": pa.schema([("x", pa.int8())])}
    module = types.ModuleType("tasks.bogus")
    module.STAGE = Bogus()
    sys.modules["tasks.bogus"] = module


def test_a_stage_reading_a_column_no_earlier_stage_writes_is_refused_at_load():
    try:
        _declare({"verify": ["sample_id", "confidence"]})
        with pytest.raises(registry.RegistryError, match="stage bogus reads column.s. confidence of verify, which "
                           "stage verify does not write"):  # fmt: skip
            registry.build_registry(("generate", "verify", "bogus"), ())
        # Reading a directory that only a later stage writes is refused too, naming both.
        _declare({"checkpoints": ["sample_id"]})
        with pytest.raises(registry.RegistryError, match="stage bogus reads checkpoints.*stage checkpoints writes it"):
            registry.build_registry(("generate", "bogus", "checkpoints"), ())
        # A declaration whose inputs are all written earlier loads.
        _declare({"generate": ["sample_id", "completion"]})
        assert list(registry.build_registry(("generate", "bogus"), ())) == ["generate", "bogus"]
    finally:
        sys.modules.pop("tasks.bogus", None)


def test_every_stage_module_declares_its_stage_under_its_own_name():
    for name in (*STAGES, *registry.IMPLICIT):
        module = __import__(f"tasks.{name}", fromlist=["STAGE"])
        assert module.STAGE.name == name


def test_a_set_on_a_section_no_running_stage_reads_is_refused_and_borrowed_sections_count():
    from commands.run import check_overrides_used

    check_overrides_used({"verify.timeout_s": 5, "backend.kind": "fake"}, ["generate", "verify"])
    check_overrides_used({"verify.timeout_s": 5, "generate.max_tokens": 8}, ["eval"])  # eval samples and verifies
    check_overrides_used({"resample.max_rounds": 2}, ["values"])  # values rolls out with resample's settings
    with pytest.raises(UserError, match=r"--set dto.threshold=0.5 does nothing: .*\(generate, verify\)"):
        check_overrides_used({"dto.threshold": 0.5}, ["generate", "verify"])
    with pytest.raises(UserError, match="grpo section"):
        check_overrides_used({"grpo.generation_budget": 8}, ["train", "eval"])

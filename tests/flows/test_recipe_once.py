"""The recipe is validated once per entry point and passed on typed; each model is fingerprinted once per run."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptdpo.configs import Recipe
from ckptdpo.shards import read_manifest
from tests.conftest import write_fake_recipe
from tests.flows.test_pipeline import PROBLEMS, SCRIPT

STAGES = ["generate", "verify", "checkpoints", "resample", "dto"]


@pytest.fixture()
def counted(monkeypatch):
    """Counts of the recipe loader's calls and of model fingerprints computed."""
    import tasks.stage

    calls = {"from_yaml": 0, "fingerprint": 0}
    load, fingerprint = Recipe.from_yaml.__func__, tasks.stage.model_fingerprint

    def counting_load(cls, *a, **kw):
        calls["from_yaml"] += 1
        return load(cls, *a, **kw)

    def counting_fingerprint(*a, **kw):
        calls["fingerprint"] += 1
        return fingerprint(*a, **kw)

    monkeypatch.setattr(Recipe, "from_yaml", classmethod(counting_load))
    monkeypatch.setattr(tasks.stage, "model_fingerprint", counting_fingerprint)
    return calls


def recipe_file(tmp_path: Path) -> Path:
    return write_fake_recipe(
        tmp_path, SCRIPT, PROBLEMS, stages=STAGES, resample={"max_rounds": 2, "max_tokens": 100},
        dto={"prune": False},
    )  # fmt: skip


def test_a_cli_run_loads_the_recipe_once_and_fingerprints_the_model_once(prefect_harness, tmp_path, counted):
    from commands.cli import main

    run_dir = tmp_path / "run"
    assert main(["run", str(recipe_file(tmp_path)), "--run-dir", str(run_dir)]) == 0
    assert all(read_manifest(run_dir / s) is not None for s in [*STAGES, "pairs"])
    assert counted == {"from_yaml": 1, "fingerprint": 1}


def test_a_deployment_entry_loads_the_recipe_once(prefect_harness, tmp_path, counted):
    from flows.pipeline import pipeline_flow
    from flows.stage import stage_flow

    recipe, run_dir = recipe_file(tmp_path), tmp_path / "run"
    result = pipeline_flow(str(recipe), str(run_dir))
    assert set(result) == {*STAGES, "pairs"} and counted["from_yaml"] == 1
    again = stage_flow("verify", str(run_dir), str(recipe))  # a stage's own deployment: its entry loads it
    assert again["skipped"] and counted["from_yaml"] == 2

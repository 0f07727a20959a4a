"""Fixtures shared across test files: the demo model (pulled once per machine) and one loaded hf backend."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest


def pytest_collection_finish(session: pytest.Session) -> None:
    """The extras' pip resolutions (minutes of waiting on the package index) start once the session has collected
    their tests, and wait beside the tests that run before them."""
    if session.config.option.collectonly:
        return
    for module in {item.module for item in session.items if item.module.__name__.endswith(".test_extras_resolve")}:
        module.start_all(Path(tempfile.mkdtemp(prefix="ckptdpo-resolve-")))


@pytest.fixture(scope="session")
def ckptdpo_home_dir() -> Path:
    """CKPTDPO_HOME when set, else the user cache: the demo model is pulled once per machine, not per test run."""
    return Path(os.environ.get("CKPTDPO_HOME", Path.home() / ".cache" / "ckptdpo")).expanduser()


@pytest.fixture(scope="session")
def demo_model_path(ckptdpo_home_dir: Path) -> Path:
    """The demo model's directory; pulls it when missing (an error, not a skip, when that fails)."""
    from ckptdpo.models import pull_demo

    return pull_demo(ckptdpo_home_dir)


@pytest.fixture(scope="session")
def hf_backend(demo_model_path: Path, ckptdpo_home_dir: Path):
    """The demo model in the hf backend on CPU, loaded once per session; tests must not leave settings changed."""
    from ckptdpo.backends.hf import HFBackend
    from ckptdpo.configs import backend_config

    backend = HFBackend(backend_config(kind="hf", model=str(demo_model_path), device="cpu"), home=ckptdpo_home_dir)
    yield backend
    backend.close()


def write_fake_recipe(
    tmp: Path, script: dict | None, problems: list[dict] | None, *, name: str = "fake", **sections
) -> Path:
    """A fake-backend recipe in `tmp`: `problems.jsonl` and `script.yaml` next to it (each written when given),
    one problem per shard, every other section from `sections` (a section given replaces the default one)."""
    import json

    import yaml

    if problems is not None:
        (tmp / "problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    if script is not None:
        (tmp / "script.yaml").write_text(yaml.safe_dump(script))
    recipe = {
        "name": name,
        "stages": ["generate", "verify", "checkpoints", "resample"],
        "problems": {"source": "file", "path": "problems.jsonl"},
        "backend": {"kind": "fake", "model": "fake", "script": str(tmp / "script.yaml")},
        "generate": {"num_samples": 2, "max_tokens": 100, "shard_size": 1},
        "verify": {"timeout_s": 5},
        **sections,
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture()
def fake_recipe():
    """The shared recipe factory: `fake_recipe(tmp, script, problems, **sections) -> recipe path`."""
    return write_fake_recipe

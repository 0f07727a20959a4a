"""Fixtures shared across test files: the demo model (pulled once per machine) and one loaded hf backend."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


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

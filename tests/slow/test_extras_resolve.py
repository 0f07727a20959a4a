"""Every extra of pyproject.toml resolves with pip against the real package index (`pip install --dry-run`, nothing
installed, nothing cached), and the vLLM that cannot share an environment with Prefect still cannot (the reason the
`gpu` extra pins an older vLLM and production runs `vllm serve` in its own image). Needs the package index (PyPI);
each resolution downloads metadata and, for packages without it, wheels: minutes per extra.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
EXTRAS = sorted(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
TIMEOUT_S = 1800


def _start(requirements: tuple[str, ...], report: Path) -> subprocess.Popen:
    # Niced: the resolutions run beside the session's other tests (see start_all) and must not slow them down.
    cmd = ["nice", "-n", "19", sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed"]
    cmd += ["--no-cache-dir", "--disable-pip-version-check", "--quiet", "--report", str(report), *requirements]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)


STARTED: dict[tuple[str, ...], tuple[subprocess.Popen, Path]] = {}


def start_all(tmp: Path) -> None:
    """Every resolution this module checks, started side by side (each is mostly waiting on the index): minutes in
    all, not minutes per extra. tests/conftest.py starts them once the session has collected this module, so they
    wait on the index while other tests run."""
    if not STARTED:
        wanted = [(f".[{extra}]",) for extra in EXTRAS] + [(".", "vllm==0.33.0")]
        for i, req in enumerate(wanted):
            STARTED[req] = (_start(req, tmp / f"report-{i}.json"), tmp / f"report-{i}.json")


@pytest.fixture(scope="module")
def resolutions(tmp_path_factory) -> dict[tuple[str, ...], tuple[int, str, dict]]:
    start_all(tmp_path_factory.mktemp("resolve"))  # unless the session started them already
    started = STARTED
    out = {}
    for req, (proc, report) in started.items():
        _, err = proc.communicate(timeout=TIMEOUT_S)
        data = json.loads(report.read_text()) if proc.returncode == 0 and report.exists() else {}
        # pip's warnings about extras may come early in a long log: kept whole, the rest only its tail.
        extras = [line for line in err.splitlines() if "does not provide the extra" in line]
        out[req] = (proc.returncode, "\n".join([*extras, err[-3000:]]), data)
    return out


def _versions(report: dict) -> dict[str, str]:
    # Names as PEP 503 normalizes them (liger_kernel and liger-kernel are one project).
    installs = report.get("install", [])
    return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in installs}


@pytest.mark.parametrize("extra", EXTRAS)
def test_extra_resolves(extra: str, resolutions) -> None:
    rc, err, report = resolutions[(f".[{extra}]",)]
    assert rc == 0, f"pip cannot resolve .[{extra}]: {err}"
    assert "does not provide the extra" not in err, err  # e.g. math-verify[antlr4_13_2] warned on every install
    versions = _versions(report)
    assert versions["ckptdpo"] and versions["prefect"].startswith("3.8.")
    if extra == "gpu":
        assert versions["vllm"] == "0.22.1" and "liger-kernel" in versions


def test_vllm_0_33_still_cannot_share_an_environment_with_prefect(resolutions) -> None:
    rc, err, _ = resolutions[(".", "vllm==0.33.0")]
    assert rc != 0 and "fastapi" in err, err  # vllm 0.33 pins fastapi<0.137; Prefect 3.8 needs >=0.139

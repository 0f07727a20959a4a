"""pyproject.toml's requirements against the installed packages' own metadata (issue 26).

pip 23 matches an extra exactly as the package's metadata spells it: `math-verify[antlr4_13_2]` (math-verify 0.9 calls
it `antlr4-13-2`) printed "does not provide the extra" on every install and was ignored. Every extra asked for must be
one the package provides under that name, and math-verify must still get the antlr4 runtime its `antlr4-13-2` extra
selects (math-verify's own metadata spells the nested extra the old way, so naming the extra would warn again).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, metadata, requires, version
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
REQUIREMENTS = [Requirement(r) for r in PROJECT["dependencies"]] + [
    Requirement(r) for extra in PROJECT["optional-dependencies"].values() for r in extra
]


@pytest.mark.parametrize("req", [r for r in REQUIREMENTS if r.extras], ids=str)
def test_every_extra_asked_for_is_provided_under_that_name(req: Requirement):
    try:
        provided = metadata(req.name).get_all("Provides-Extra") or []
    except PackageNotFoundError:
        pytest.skip(f"{req.name} is not installed here (an optional extra)")
    assert set(req.extras) <= set(provided), f"{req}: {req.name} provides {provided}"


def _selected_by(package: str, extra: str, name: str) -> Requirement:
    """The requirement on `name` that `package`'s extra `extra` adds (from the installed metadata)."""
    reqs = [Requirement(r) for r in requires(package) or []]
    named = [r for r in reqs if r.name.replace("_", "-") == name]
    (found,) = [r for r in named if r.marker and r.marker.evaluate({"extra": extra})]
    return found


def test_math_verify_gets_the_antlr4_runtime_its_antlr4_13_2_extra_selects():
    (math_verify,) = [r for r in REQUIREMENTS if r.name == "math-verify"]
    assert version("math-verify") in math_verify.specifier
    latex = _selected_by("math-verify", "antlr4-13-2", "latex2sympy2-extended")
    runtime = _selected_by("latex2sympy2_extended", "antlr4-13-2", "antlr4-python3-runtime")
    (pinned,) = [r for r in REQUIREMENTS if r.name == "antlr4-python3-runtime"]
    assert latex.name and str(pinned.specifier) == str(runtime.specifier) == "==4.13.2"
    assert version("antlr4-python3-runtime") in pinned.specifier

"""A recipe: the problem source, the policy backend and one config per stage, loaded from YAML."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

import ckptdpo.configs.stages as st
from ckptdpo.configs.backend import BACKEND_CLASSES, BACKEND_KINDS, BackendConfig, HFBackendConfig
from ckptdpo.configs.base import ConfigError


class Recipe(st.StageSections):
    """A whole pipeline: problem source, policy backend, one config per stage (inherited) and the run's settings."""

    name: str = "recipe"
    stages: list[str] = Field(
        default_factory=lambda: ["generate", "verify", "checkpoints", "resample"],
        description=f"stages to run, in any order (they run in pipeline order): {', '.join(st.STAGES)}",
    )
    problems: st.ProblemsConfig = Field(default_factory=st.ProblemsConfig)
    backend: BackendConfig = Field(default_factory=HFBackendConfig)
    refresh: st.RefreshConfig = Field(default_factory=st.RefreshConfig)
    task_runner: st.TaskRunnerConfig = Field(default_factory=st.TaskRunnerConfig)
    failure_budget: st.FailureBudgetConfig = Field(default_factory=st.FailureBudgetConfig)

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, v: list[str]) -> list[str]:
        return check_stage_names(v, "stages")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
        """Load a recipe, apply dotted-key overrides, validate; errors are one ConfigError sentence."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: recipe file not found; pass the path of a recipe YAML file.") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the recipe ({e}); check the file.") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({_one_line(e)}); fix the syntax.") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe must be a YAML mapping of sections, got {type(data).__name__}.")
        if not data:
            raise ConfigError(
                f"{path}: the recipe is empty; give at least `name` and the sections you need "
                "(see recipes/demo.yaml), or run `ckptdpo demo` for the embedded defaults."
            )
        for key, value in (overrides or {}).items():
            _set_dotted(data, key, value, path)
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<recipe>") -> Recipe:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(describe_validation_error(e, source)) from None

    def config_hash(self, *sections: str) -> str:
        """Content hash of the named sections (all when none): part of every cache key and manifest."""
        dump = self.model_dump(mode="json")
        if sections:
            dump = {s: dump[s] for s in sections}
        return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]


def check_stage_names(names: list[str], what: str) -> list[str]:
    """Known stage names, each once (a stage named twice would run once and hide a typo); else one sentence."""
    unknown = [n for n in names if n not in st.STAGES]
    if unknown:
        raise ValueError(f"{what} names unknown stage(s) {', '.join(unknown)}; choose from {', '.join(st.STAGES)}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{what} names {', '.join(twice)} more than once; name each stage once")
    return names


def _field_path(loc: tuple) -> tuple[str, str | None]:
    """The dotted field of a pydantic error location, without the backend union's tag (which it returns apart)."""
    kept, kind = [], None
    for i, part in enumerate(loc):
        if isinstance(part, str) and part in BACKEND_KINDS and i < len(loc) - 1:
            kind = part
            continue
        kept.append(str(part))
    return ".".join(kept), kind


def describe_validation_error(e: ValidationError, source: str) -> str:
    """One sentence per pydantic error, naming the file and the dotted field."""
    parts = []
    for err in e.errors():
        loc, kind = _field_path(err["loc"])
        if not loc:
            parts.append(f"{source}: {err['msg']}; fix the recipe.")
        elif err["type"] == "extra_forbidden":
            where = f" (not a setting of backend kind '{kind}')" if kind else ""
            parts.append(f"{source}: unknown key '{loc}'{where}; remove it or check its spelling.")
        elif err["type"] == "missing":
            parts.append(f"{source}: required key '{loc}' is missing; add it.")
        elif err["type"] == "recipe":  # a model-level rule naming its fields as {at}name (configs.base.recipe_error)
            parts.append(f"{source}: {err['ctx']['template'].replace('{at}', f'{loc}.' if loc else '')}.")
        else:
            parts.append(f"{source}: field '{loc}' {err['msg'].lower()} (got {err.get('input')!r}); fix the value.")
    return " ".join(parts)


def parse_override(text: str) -> tuple[str, Any]:
    """`dotted.key=value` with the value parsed as YAML (so numbers, booleans and lists work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like dotted.key=value.")
    key, raw = text.split("=", 1)
    if not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"override {text!r} has no key before '='; use dotted.key=value, e.g. generate.seed=1.")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(data: dict[str, Any], key: str, value: Any, path: Path) -> None:
    node = data
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(
            f"override '{key}={value}' has no valid key; use dotted.key=value, e.g. generate.max_tokens=64."
        )
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{path}: override '{key}' goes through '{p}', which is not a section.")
        node = child
    if parts[-1] == "kind" and isinstance(value, str) and value in BACKEND_CLASSES and node.get("kind") != value:
        # Switching a backend's kind drops the settings the new kind does not have (a fake `script` on hf, say).
        fields = BACKEND_CLASSES[value].model_fields
        for name in [k for k in node if k not in fields]:
            del node[name]
    for rule in getattr(_model_at(parts[:-1]), "UNUSED", ()):
        if rule.option == parts[-1] and value == rule.value and node.get(rule.option) != value:
            # Likewise an option switched on the command line (a problem source, dto.prune): the settings the file made
            # for its other value would do nothing now, and refusing them would leave no way to run the switch.
            for name in rule.names:
                node.pop(name, None)
    node[parts[-1]] = value


def _model_at(parts: list[str]) -> type[BaseModel] | None:
    """The config class of the recipe section at `parts` (through dicts of sections); None if it is not one."""
    node: Any = Recipe
    for part in parts:
        if isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
            node = node.model_fields[part].annotation
        elif get_origin(node) is dict:
            node = get_args(node)[1]
        else:
            return None
        models = [a for a in (get_args(node) or (node,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        node = models[0] if len(models) == 1 else node
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())

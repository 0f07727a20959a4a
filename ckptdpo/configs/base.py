"""The base of every config model and the one error type a recipe can raise."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

from ckptdpo.errors import UserError

# Upper limits of sizes. A value past one is a typo or a unit slip (1e9 samples per problem grew a run to 16 GB
# without writing a shard): refused when the recipe loads, in one sentence, instead of failing hours later in memory.
MAX_SAMPLES = 4096  # samples per prompt (vLLM's n): pass@k studies go to 1024
MAX_TOKENS = 1 << 20  # new tokens per sample, tokens per training row: above any model's context
MAX_SHARD_ITEMS = 100_000  # problems per shard
MAX_SHARD_TOKENS = 1 << 30  # shard_size x num_samples x max_tokens: the text one shard task may have to hold
MAX_COUNT = 1_000_000  # other counts (rounds, probes, segments, generated problems, tasks in flight)
MAX_PROCESSES = 1024  # processes or threads one setting starts (verifier workers, requests in flight, ranks)


class ConfigError(UserError, ValueError):
    """A user error in a recipe or config: the message is one sentence naming the file, the field and the fix."""


@dataclass(frozen=True)
class Unused:
    """Settings (`names`) that do nothing while `option` holds `value`; `why` follows "option is value", `fix` names
    the way out (NAME: the refused setting). An override that sets `option` to `value` drops them from the recipe."""

    option: str
    value: Any
    names: tuple[str, ...]
    why: str
    fix: str


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    UNUSED: ClassVar[tuple[Unused, ...]] = ()

    @model_validator(mode="after")
    def _no_setting_unused(self) -> _Config:
        for rule in self.UNUSED:
            if getattr(self, rule.option) == rule.value:
                shown = str(rule.value).lower() if isinstance(rule.value, bool) else repr(rule.value)
                refuse_unused(self, rule.names, f"{{at}}{rule.option} is {shown}{rule.why}", rule.fix)
        return self


def recipe_error(template: str) -> PydanticCustomError:
    """A model-level validation error naming fields as `{at}name`: `describe_validation_error` puts the section's
    place in the recipe there (`problems.path`, `eval.benchmarks.math500.path`); elsewhere it reads `path`."""
    return PydanticCustomError("recipe", template, {"at": "", "template": template})


def refuse_unused(model: BaseModel, names: Iterable[str], when: str, fix: str) -> None:
    """Refuse each of `names` that holds a value other than its default while `when` holds: the setting would do
    nothing, silently (a default does nothing either way, so a dumped and reloaded config passes)."""
    for name in names:
        if getattr(model, name) != type(model).model_fields[name].get_default(call_default_factory=True):
            raise recipe_error(f"{{at}}{name} does nothing when {when}; {fix.replace('NAME', '{at}' + name)}")

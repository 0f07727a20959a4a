"""The base of every config model and the one error type a recipe can raise."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ckptdpo.errors import UserError


class ConfigError(UserError, ValueError):
    """A user error in a recipe or config: the message is one sentence naming the file, the field and the fix."""


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

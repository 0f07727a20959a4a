"""The environment edge: the only place that reads ckptdpo's environment variables. Imports nothing heavy, so the
CLI can use it without loading Prefect."""

from __future__ import annotations

import os
from pathlib import Path


def ckptdpo_home() -> Path:
    """CKPTDPO_HOME (model cache and other state), default ~/.cache/ckptdpo."""
    return Path(os.environ.get("CKPTDPO_HOME", Path.home() / ".cache" / "ckptdpo")).expanduser()


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as the hub client reads it: no hub look-ups, local paths and caches only."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")

"""Generation backends. Choosing one is an `if`, not a plugin registry."""

from __future__ import annotations

from pathlib import Path

from ckptdpo.backends.base import Backend, GenerationRequest, GenerationResult, Sample
from ckptdpo.configs import BackendConfig

__all__ = ["Backend", "GenerationRequest", "GenerationResult", "Sample", "make_backend"]


def make_backend(cfg: BackendConfig, *, home: str | Path, api_key: str | None = None) -> Backend:
    """Build the backend a recipe names. `home` is CKPTDPO_HOME (model cache); `api_key` for openai."""
    if cfg.kind == "hf":
        from ckptdpo.backends.hf import HFBackend

        return HFBackend(cfg, home=Path(home))
    if cfg.kind == "vllm":
        from ckptdpo.backends.vllm import VLLMBackend

        return VLLMBackend(cfg, home=Path(home))
    if cfg.kind == "openai":
        from ckptdpo.backends.openai import OpenAIBackend

        return OpenAIBackend(cfg, api_key=api_key)
    if cfg.kind == "fake":
        from ckptdpo.backends.fake import FakeBackend

        return FakeBackend.from_config(cfg)
    raise ValueError(f"unknown backend kind {cfg.kind!r}")

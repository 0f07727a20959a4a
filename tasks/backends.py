"""Backends are loaded once per process and shared by the tasks that run in it."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from ckptdpo.backends import Backend, make_backend
from ckptdpo.backends.base import CheckedBackend
from ckptdpo.configs import BackendConfig
from ckptdpo.models import check_model_dir, local_revision, resolve_model
from tasks.environment import ckptdpo_home, hub_offline

_BACKENDS: dict[str, Backend] = {}
_LOCKS: dict[str, threading.Lock] = {}
_GUARD = threading.Lock()


def _key(cfg: BackendConfig) -> str:
    return cfg.model_dump_json()


@contextmanager
def backend_session(cfg: BackendConfig):
    """Yield the shared backend for `cfg`, one caller at a time (an in-process model is not thread-safe)."""
    key = _key(cfg)
    with _GUARD:
        lock = _LOCKS.setdefault(key, threading.Lock())
    with lock:
        if key not in _BACKENDS:
            env = getattr(cfg, "api_key_env", None)
            api_key = os.environ.get(env) if env else None
            _BACKENDS[key] = make_backend(cfg, home=ckptdpo_home(), api_key=api_key)
        # Every stage's results are checked against their requests, whatever the backend (a short or null result
        # fails its request, naming why, instead of being stored as generated).
        yield CheckedBackend(_BACKENDS[key])


def close_backends() -> None:
    with _GUARD:
        for b in _BACKENDS.values():
            b.close()
        _BACKENDS.clear()


def resolve_local_model(model: str) -> str:
    return str(resolve_model(model, ckptdpo_home(), offline=hub_offline()))


def model_fingerprint(cfg: BackendConfig, resolve: Callable[[str], str] | None = None) -> str:
    """Revision of the model for cache keys, without loading it: the configured revision, else the same content
    fingerprint the backends report (`local_revision`: config, tokenizer, sampled weight bytes) for a local
    checkpoint, else the served model's name, else the fake backend's script. `resolve`: model reference -> local
    path (a run's context resolves each model once)."""
    if cfg.revision:
        return cfg.revision
    if cfg.kind == "fake":
        return hashlib.sha256(Path(cfg.script).read_bytes()).hexdigest()[:16] if cfg.script else "fake"
    if cfg.kind == "openai":
        return cfg.model
    path = Path((resolve or resolve_local_model)(cfg.model))
    return local_revision(path) if path.is_dir() else cfg.model


def check_backend(cfg: BackendConfig, where: str, resolve: Callable[[str], str] | None = None) -> None:
    """Load what the backend will need (model config and tokenizer, a fake script), not just check a path."""
    if cfg.kind in ("hf", "vllm"):
        check_model_dir(Path((resolve or resolve_local_model)(cfg.model)), f"{where}.model")
    elif cfg.kind == "fake":
        from ckptdpo.backends.fake import FakeBackend

        FakeBackend.from_config(cfg)  # parses the script: a malformed one is one sentence, now

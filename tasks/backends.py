"""Backends are loaded once per process and shared by the tasks that run in it."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path

from ckptdpo.backends import Backend, make_backend
from ckptdpo.configs import BackendConfig
from ckptdpo.models import resolve_model
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
            api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
            _BACKENDS[key] = make_backend(cfg, home=ckptdpo_home(), api_key=api_key)
        yield _BACKENDS[key]


def close_backends() -> None:
    with _GUARD:
        for b in _BACKENDS.values():
            b.close()
        _BACKENDS.clear()


def model_fingerprint(cfg: BackendConfig) -> str:
    """Revision of the model for cache keys, without loading it: the configured revision, or a hash of a local
    checkpoint's config and weight-file sizes, or the script of a fake backend."""
    if cfg.revision:
        return cfg.revision
    if cfg.kind == "fake":
        return hashlib.sha256(Path(cfg.script).read_bytes()).hexdigest()[:16] if cfg.script else "fake"
    if cfg.kind == "openai":
        return cfg.model
    path = Path(resolve_model(cfg.model, ckptdpo_home(), offline=hub_offline()))
    if not path.is_dir():
        return cfg.model
    h = hashlib.sha256()
    for p in sorted(path.iterdir()):
        if p.suffix in (".json", ".safetensors", ".bin", ".gguf", ".model"):
            h.update(json.dumps([p.name, p.stat().st_size]).encode())
            if p.name == "config.json":
                h.update(p.read_bytes())
    return h.hexdigest()[:16]

"""A real OpenAI-compatible server process on loopback: `transformers serve MODEL_DIR`, as the demo's DTO judge.

Production runs its judge behind `vllm serve`; the demo does the same with the server transformers ships, so the
judge's requests go through the openai backend and a real HTTP server, not through the policy in this process.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from ckptdpo.errors import UserError

STARTUP_S = 240


def server_binary() -> str | None:
    """The `transformers` console script next to this interpreter (the project's `serve` extra), else on PATH."""
    exe = Path(sys.executable).with_name("transformers")
    return str(exe) if exe.exists() else shutil.which("transformers")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def transformers_server(model_dir: str | Path, log_path: Path, *, startup_s: float = STARTUP_S):
    """Yield the `/v1` base URL of a `transformers serve` process for `model_dir`; stopped when the block ends."""
    binary = server_binary()
    if binary is None:
        raise UserError(
            "`transformers serve` is not installed; run `pip install 'ckptdpo[serve]'` (transformers[serving])."
        )
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [binary, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {proc.returncode}: {log_path.read_text()[-800:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve did not answer /health in {startup_s:.0f} s; see {log_path}")
            time.sleep(0.5)
        yield base + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

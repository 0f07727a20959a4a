"""Local server processes of a run: `transformers serve MODEL_DIR` as the demo's DTO judge, and a watch on the
ephemeral Prefect API.

Production runs its judge behind `vllm serve`; the demo does the same with the server transformers ships, so the
judge's requests go through the openai backend and a real HTTP server, not through the policy in this process.

Without `PREFECT_API_URL`, Prefect starts a temporary API server as a child of the run (uvicorn, in the run's process
group). When it dies mid-run (killed, out of memory, or by a signal to the group), Prefect's client retries it for
minutes and the run then ends on a bare `ConnectError`; `watch_prefect_api` notices the exit within a second and
stops the run at once, naming the API's URL and what to do.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from ckptdpo.errors import UserError
from tasks.stopping import descendants, interrupt_main, is_running, request_stop, stop_requested

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


EPHEMERAL_API_APP = "prefect.server.api.server:create_app"


def prefect_api_lost(url: str) -> str:
    """What to do when the Prefect API stopped answering, in one sentence (the CLI's last line)."""
    if os.environ.get("PREFECT_API_URL"):
        fix = "check that the server is up (`ckptdpo server status`, or start it again) and run the same command again"
    else:
        fix = "it is the temporary API this run starts, so run the same command again: it starts a new one"
    return f"error: the Prefect API at {url} stopped answering; {fix} (finished shards are kept)."


def _ephemeral_api() -> tuple[int, str] | None:
    """(pid, API URL) of the temporary Prefect API among this process's children, once it answers /health."""
    for pid in descendants(os.getpid()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if EPHEMERAL_API_APP.encode() not in argv or b"--port" not in argv:
            continue
        url = f"http://127.0.0.1:{argv[argv.index(b'--port') + 1].decode()}/api"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return pid, url
        except httpx.TransportError:
            pass
    return None


@contextmanager
def watch_prefect_api(poll_s: float = 1.0):
    """While the block runs, stop the run as soon as the temporary Prefect API it started exits (exit code 1)."""
    if os.environ.get("PREFECT_API_URL"):
        yield  # a server of its own: a short outage is Prefect's client's to retry; the CLI names a lasting one
        return
    done = threading.Event()

    def watch() -> None:
        api = None
        while not done.wait(poll_s) and not stop_requested():
            if api is None:
                api = _ephemeral_api()  # found once healthy: Prefect restarts it on a taken port before that
            elif not is_running(api[0]):
                reason = f"the Prefect API at {api[1]} (the temporary server this run started, pid {api[0]}) exited"
                if request_stop(reason, 1, prefect_api_lost(api[1])):
                    interrupt_main()
                return

    threading.Thread(target=watch, daemon=True, name="ckptdpo-api-watch").start()
    try:
        yield
    finally:
        done.set()

"""Local server processes of a run: `transformers serve MODEL_DIR` as the demo's DTO judge, and a watch on the
ephemeral Prefect API.

Production runs its judge behind `vllm serve`; the demo does the same with the server transformers ships, so the
judge's requests go through the openai backend and a real HTTP server, not through the policy in this process.

Without `PREFECT_API_URL`, Prefect starts a temporary API server as a child of the run (uvicorn, in the run's process
group). When it dies mid-run (killed, out of memory, or by a signal to the group), Prefect's client retries it for
minutes and the run then ends on a bare `ConnectError`; `watch_prefect_api` notices the exit within a second and
stops the run at once, naming the API's URL and what to do (a server of its own, `PREFECT_API_URL`, after a minute
without an answer).
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
SERVER_OUTAGE_S = 60.0


def server_outage_s() -> float:
    """How long a run waits for its own Prefect server to answer again: `CKPTDPO_SERVER_OUTAGE_S`, else 60 s."""
    raw = os.environ.get("CKPTDPO_SERVER_OUTAGE_S", "")
    try:
        value = float(raw) if raw else SERVER_OUTAGE_S
    except ValueError:
        raise UserError(f"CKPTDPO_SERVER_OUTAGE_S={raw!r} is not a number of seconds; set it like 60.") from None
    if value <= 0:
        raise UserError(f"CKPTDPO_SERVER_OUTAGE_S={raw!r} must be above 0 seconds; set it like 60.")
    return value


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
def watch_prefect_api(poll_s: float = 1.0, outage_s: float | None = None):
    """While the block runs, stop the run (exit code 1) once its Prefect API is gone: at once when the temporary API
    it started exits, after `outage_s` without an answer from a server of its own (`PREFECT_API_URL`: a restart is
    fine, a lasting outage would only fail the run later, after Prefect's client has retried each call; default
    `CKPTDPO_SERVER_OUTAGE_S` or SERVER_OUTAGE_S)."""
    if outage_s is None:
        outage_s = server_outage_s()
    configured = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    done = threading.Event()

    def lost(url: str, reason: str) -> None:
        if request_stop(reason, 1, prefect_api_lost(url)):
            interrupt_main()

    def watch_temporary() -> None:
        api = None
        while not done.wait(poll_s) and not stop_requested():
            if api is None:
                api = _ephemeral_api()  # found once healthy: Prefect restarts it on a taken port before that
            elif not is_running(api[0]):
                return lost(api[1], f"the Prefect API at {api[1]} (the temporary server this run started) exited")

    def watch_server() -> None:
        down_since = None
        while not done.wait(max(poll_s, 5.0)) and not stop_requested():
            if _healthy(configured):
                down_since = None
            elif down_since is None:
                down_since = time.monotonic()
            elif time.monotonic() - down_since >= outage_s:
                return lost(configured, f"the Prefect API at {configured} has not answered for {outage_s:.0f} s")

    target = watch_server if configured else watch_temporary
    threading.Thread(target=target, daemon=True, name="ckptdpo-api-watch").start()
    try:
        yield
    finally:
        done.set()


def _healthy(api_url: str) -> bool:
    try:
        return httpx.get(api_url + "/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False

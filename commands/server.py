"""`ckptdpo server up|down|status`: one machine, one command: a local Prefect server on SQLite, a worker per work
pool and every deployment of `deployments/prefect.yaml`.

What it starts is recorded in `<CKPTDPO_HOME>/server/server.json` (each process's pid with its kernel start time,
so a recycled pid is never mistaken for ours) and logged under `<CKPTDPO_HOME>/server/logs/`. `down` stops those
processes and their descendants (flow runs that workers started in sessions of their own), and nothing else.
The server listens on 127.0.0.1 only; CKPTDPO_SERVER_PORT picks the port (default 4200) and PREFECT_HOME, when
set, where Prefect keeps its SQLite database (default `<CKPTDPO_HOME>/prefect`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from rich.console import Console
from rich.table import Table

from ckptdpo.errors import UserError
from ckptdpo.shards import atomic_write_bytes
from commands.zombies import HEARTBEAT_S, crash_dead_runs, ensure_zombie_automation

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = Path("deployments") / "prefect.yaml"
HOST = "127.0.0.1"
DEFAULT_PORT = 4200
HEALTH_TIMEOUT_S = 240.0
CLI_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 20.0
# Concurrency leases (a deployment's `concurrency_limit` slot) on disk under PREFECT_HOME: with Prefect's default
# in-memory storage a server restart forgets the lease of a running flow run, its slot is never released and every
# later run of the deployment waits for it forever.
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"


@dataclass(frozen=True)
class ServerSettings:
    """Where the local server listens and keeps its state; read from the environment at the CLI edge."""

    port: int
    state_dir: Path
    prefect_home: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "server.json"


def server_settings(home: Path, environ: dict[str, str] | None = None) -> ServerSettings:
    env = os.environ if environ is None else environ
    raw = env.get("CKPTDPO_SERVER_PORT", str(DEFAULT_PORT))
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise UserError(f"CKPTDPO_SERVER_PORT={raw!r} is not a TCP port; set it to a number from 1 to 65535.")
    prefect_home = Path(env["PREFECT_HOME"]).expanduser() if env.get("PREFECT_HOME") else home / "prefect"
    return ServerSettings(port=int(raw), state_dir=home / "server", prefect_home=prefect_home)


def server_command(args: argparse.Namespace, home: Path) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health probe is noise
    s = server_settings(home)
    if args.action == "up":
        return server_up(s)
    if args.action == "down":
        return server_down(s)
    return server_status(s)


# --- processes: ours are recognised by pid and kernel start time ----------------------------------------------------


def _start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (None when gone or a zombie): a pid plus this is unique."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces and parentheses
    return None if fields[0] == "Z" else int(fields[19])


def _alive(rec: dict[str, Any]) -> bool:
    return _start_time(rec["pid"]) == rec["start"]


def _descendants(pids: set[int]) -> set[int]:
    """All processes below `pids`, from /proc (workers start flow runs in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(d.name))
    found: set[int] = set()
    todo = list(pids)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def _signal_all(pids: dict[int, int | None], sig: int) -> None:
    for pid, start in pids.items():
        if _start_time(pid) == start and start is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _stop(records: list[dict[str, Any]]) -> list[str]:
    """SIGTERM our live processes and their descendants, wait, then SIGKILL what is left; returns what was stopped."""
    ours = {r["pid"]: r["start"] for r in records if _alive(r)}
    if not ours:
        return []
    targets = {**{p: _start_time(p) for p in _descendants(set(ours))}, **ours}
    _signal_all(targets, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and any(_start_time(p) == s and s is not None for p, s in targets.items()):
        time.sleep(0.2)
    targets.update({p: _start_time(p) for p in _descendants(set(ours)) if p not in targets})
    _signal_all(targets, signal.SIGKILL)
    return [r["role"] for r in records if r["pid"] in ours]


# --- state ---------------------------------------------------------------------------------------------------------


def read_state(s: ServerSettings) -> dict[str, Any]:
    return json.loads(s.state_file.read_text()) if s.state_file.exists() else {}


def _write_state(s: ServerSettings, state: dict[str, Any]) -> None:
    atomic_write_bytes(s.state_file, json.dumps(state, indent=1).encode())


def server_environment(s: ServerSettings, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of everything `up` starts: the API on loopback, no analytics, flows run from this checkout."""
    return {
        **(os.environ if base is None else base),
        "PREFECT_HOME": str(s.prefect_home),
        "PREFECT_API_URL": s.api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
        # Read by the deployments' pull step on the worker when a flow run starts (never baked in at deploy time).
        "CKPTDPO_REPO": str(REPO),
    }


def _prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def _spawn(s: ServerSettings, state: dict[str, Any], role: str, argv: list[str], env: dict[str, str]) -> None:
    """Start a background process in a session of its own and record it at once, so `down` can always find it."""
    logs = s.state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{role}.log", "ab") as log:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    start = None
    for _ in range(50):  # /proc/<pid> appears as the process starts
        start = _start_time(proc.pid)
        if start is not None:
            break
        time.sleep(0.02)
    record = {"role": role, "pid": proc.pid, "start": start, "log": str(logs / f"{role}.log"), "argv": argv}
    state["processes"].append(record)
    _write_state(s, state)


def _log_tail(path: str | Path, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def deployment_plan(prefect_file: Path = REPO / PREFECT_FILE) -> tuple[list[str], list[str]]:
    """The work pools the deployments use and the deployments' names, from the prefect.yaml."""
    deployments = (yaml.safe_load(prefect_file.read_text()) or {}).get("deployments") or []
    pools = sorted({d["work_pool"]["name"] for d in deployments if (d.get("work_pool") or {}).get("name")})
    return pools, [d["name"] for d in deployments]


# --- up / down / status --------------------------------------------------------------------------------------------


def server_up(s: ServerSettings) -> int:
    state = read_state(s)
    records = state.get("processes", [])
    if records and all(_alive(r) for r in records):
        Console().print(f"already running: {state['url']}")
        return server_status(s)
    if any(_alive(r) for r in records):
        raise UserError(f"{s.state_file}: a previous server is partly running; run `ckptdpo server down` first.")
    with socket.socket() as probe:
        try:
            probe.bind((HOST, s.port))
        except OSError:
            raise UserError(
                f"port {s.port} on {HOST} is in use; set CKPTDPO_SERVER_PORT to a free port or stop what uses it."
            ) from None
    s.state_dir.mkdir(parents=True, exist_ok=True)
    s.prefect_home.mkdir(parents=True, exist_ok=True)
    pools, names = deployment_plan()
    env = server_environment(s)
    state = {"url": s.url, "api_url": s.api_url, "prefect_home": str(s.prefect_home), "pools": pools, "processes": []}
    _write_state(s, state)
    console = Console()
    try:
        _spawn(s, state, "server", _server_argv(s), env)
        console.print(f"prefect server starting on {s.url} (database under {s.prefect_home})")
        _wait_healthy(s, state["processes"][0])
        ensure_zombie_automation(s.api_url)
        for pool in pools:
            _create_pool(pool, env, s)
        console.print(f"deploying {len(names)} deployments from {PREFECT_FILE}")
        _run_cli(_prefect("deploy", "--all", "--prefect-file", str(PREFECT_FILE)), env, s, "deploy")
        for pool in pools:
            # One flow run at a time on a GPU machine; CPU work is spread over processes by the flows themselves.
            argv = _prefect("worker", "start", "--pool", pool, "--type", "process", "--name", f"ckptdpo-{pool}")
            _spawn(s, state, f"worker-{pool}", [*argv, "--limit", "1"] if pool == "gpu" else argv, env)
    except BaseException:
        _stop(state["processes"])
        raise
    console.print(f"Prefect UI: {s.url}")
    console.print(f"export PREFECT_API_URL={s.api_url}   # for `prefect deployment run 'pipeline/pipeline' ...`")
    return 0


def _server_argv(s: ServerSettings) -> list[str]:
    return _prefect("server", "start", "--host", HOST, "--port", str(s.port))


def restart_processes(s: ServerSettings, roles: list[str], base: dict[str, str] | None = None) -> None:
    """Stop and start some of what `up` started (the server after an upgrade, a worker that died), the rest untouched.

    Leases live on disk (LEASE_STORAGE), so a deployment's concurrency slot held by a run across a server restart is
    released when that run ends, or when its lease expires because the run's process died with its machine.
    """
    state = read_state(s)
    chosen = [r for r in state.get("processes", []) if r["role"] in roles]
    if sorted(r["role"] for r in chosen) != sorted(roles):
        raise UserError(f"{s.state_file}: no {', '.join(roles)} was started here; run `ckptdpo server up`.")
    _stop(chosen)
    state["processes"] = [r for r in state["processes"] if r["role"] not in roles]
    env = server_environment(s, base)
    for rec in sorted(chosen, key=lambda r: r["role"] != "server"):  # the server first: workers need its API
        _spawn(s, state, rec["role"], rec["argv"], env)
        if rec["role"] == "server":
            _wait_healthy(s, state["processes"][-1])
    crash_dead_runs(s.api_url, state.get("pools", []))  # runs whose process died with the old ones


def _wait_healthy(s: ServerSettings, server: dict[str, Any]) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _alive(server):
            raise UserError(f"the Prefect server exited at start; see {server['log']}:\n{_log_tail(server['log'])}")
        try:
            if httpx.get(f"{s.api_url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise UserError(f"the Prefect server did not answer on {s.url} in {HEALTH_TIMEOUT_S:.0f} s; see {server['log']}.")


def _run_cli(argv: list[str], env: dict[str, str], s: ServerSettings, what: str, ok_if: str | None = None) -> str:
    log = s.state_dir / "logs" / f"{what}.log"
    r = subprocess.run(
        argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CLI_TIMEOUT_S
    )
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(argv)}\n{r.stdout}{r.stderr}\n")
    if r.returncode != 0 and not (ok_if and ok_if in r.stdout + r.stderr):
        raise UserError(f"`prefect {' '.join(argv[3:])}` failed (exit {r.returncode}); see {log}:\n{_log_tail(log)}")
    return r.stdout


def _create_pool(pool: str, env: dict[str, str], s: ServerSettings) -> None:
    """A process work pool; one that exists already (from an earlier `up`) is kept as it is."""
    _run_cli(_prefect("work-pool", "create", pool, "--type", "process"), env, s, "pools", ok_if="already exists")


def server_down(s: ServerSettings) -> int:
    state = read_state(s)
    stopped = _stop(state.get("processes", []))
    if state:
        s.state_file.unlink(missing_ok=True)
    Console().print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def server_status(s: ServerSettings) -> int:
    state = read_state(s)
    records = state.get("processes", [])
    if not records:
        Console().print("not running (`ckptdpo server up` starts it)")
        return 1
    healthy = False
    try:
        healthy = httpx.get(f"{state['api_url']}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        pass
    table = Table(title=f"ckptdpo server: {state['url']} ({'healthy' if healthy else 'not answering'})")
    for col in ("process", "pid", "state", "log"):
        table.add_column(col)
    for r in records:
        table.add_row(r["role"], str(r["pid"]), "running" if _alive(r) else "[red]stopped[/]", r["log"])
    Console().print(table)
    if healthy:
        dead = crash_dead_runs(state["api_url"], state.get("pools", []))
        if dead:
            Console().print(f"marked {len(dead)} flow run(s) crashed whose process is gone: {', '.join(dead)}")
    return 0 if healthy and all(_alive(r) for r in records) else 1

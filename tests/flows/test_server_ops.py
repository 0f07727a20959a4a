"""Operations against one real Prefect 3.8.8 server, started by `ckptdpo server up` for the whole module: the
scheduler fires a deployment on its own, a cancelled run stops and resumes, a `kill -9`ed run retries and resumes,
a server restart mid-run leaves the next run of a concurrency-limited deployment unblocked, and `prefect deploy
--all` asks nothing with stdin closed.

The flow runs use the real `openai` backend against `tests/openai_server.py`'s server in this test process (the
fake backend behind it, with a settable per-request delay), so "mid-generation" is a state the test can wait for.
Deployments made here carry the pull steps of deployments/prefect.yaml, so every run resolves the checkout on the
worker at run time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import yaml

from ckptdpo.backends.fake import FakeBackend
from ckptdpo.shards import read_manifest, read_stage
from commands.zombies import pid_alive
from tests.flows.test_ops import QUESTIONS, REPO, Server, server_up, write_problems
from tests.flows.test_refresh_endpoint import fake_script, openai_recipe
from tests.openai_server import OpenAIServer

pytestmark = pytest.mark.slow
PROBLEMS = [*QUESTIONS, ("What is 4 + 4?", 8)]
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


class Stack(Server):
    """The module's server, its workers, and the generation endpoint the flow runs call."""

    endpoint: OpenAIServer
    recipe: Path
    reference: list[tuple] | None = None

    def api(self, method: str, path: str, **kw):
        for attempt in range(4):  # a server on a busy 2-core machine can miss a read timeout now and then
            try:
                r = httpx.request(method, f"{self.url}/api{path}", timeout=60, **kw)
                if r.status_code != 503 or attempt == 3:  # 503: SQLite busy under load, answered "try again"
                    break
            except httpx.TransportError:
                if attempt == 3:
                    raise
            time.sleep(2)
        r.raise_for_status()
        return r.json() if r.content else None

    def deployment(self, name: str, **fields) -> str:
        pull = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["pull"]
        flow = self.api("POST", "/flows/", json={"name": "pipeline"})
        body = {
            "name": name,
            "flow_id": flow["id"],
            "entrypoint": "flows/pipeline.py:pipeline_flow",
            "work_pool_name": "cpu",
            "pull_steps": pull,
            "parameters": {"recipe_path": str(self.recipe)},
            "enforce_parameter_schema": False,
            **fields,
        }
        return self.api("POST", "/deployments/", json=body)["id"]

    def start(self, deployment_id: str, run_dir: Path) -> str:
        body = {"parameters": {"recipe_path": str(self.recipe), "run_dir": str(run_dir)}}
        return self.api("POST", f"/deployments/{deployment_id}/create_flow_run", json=body)["id"]

    def wait_state(self, run_id: str, types: tuple[str, ...], timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.api("GET", f"/flow_runs/{run_id}")
            if run["state"] and run["state"]["type"] in types:
                return run
            time.sleep(0.5)
        raise AssertionError(f"flow run {run_id} not in {types} after {timeout} s: {run['state']}")

    def wait_for_shard(self, run_dir: Path, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not list((run_dir / "generate").glob("part-*.parquet")):
            assert time.monotonic() < deadline, f"no generate shard in {run_dir} after {timeout} s"
            time.sleep(0.2)

    def flow_run_pid(self, run_id: str) -> int:
        """The flow run's own process (the process worker records it as `host:pid`)."""
        deadline = time.monotonic() + 60
        while not (pid := self.api("GET", f"/flow_runs/{run_id}").get("infrastructure_pid")):
            assert time.monotonic() < deadline, "the worker never recorded the flow run's pid"
            time.sleep(0.2)
        return int(str(pid).rsplit(":", 1)[-1])

    def logs(self, run_id: str) -> str:
        body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC"}
        return "\n".join(entry["message"][:300] for entry in self.api("POST", "/logs/filter", json=body))[-4000:]

    def generation_requests(self) -> int:
        return sum(1 for b in self.endpoint.log if b["path"] == "/v1/completions")


def stack_round_requests(run_dir: Path) -> int:
    """Requests the resample rounds of a finished run made (one per attempt row)."""
    return sum(read_manifest(d)["num_rows"] for d in sorted((run_dir / "resample").glob("round-*")))


def pair_keys(run_dir: Path) -> list[tuple]:
    rows = read_stage(run_dir / "pairs").to_pylist()
    return sorted((p["pair_id"], p["prompt"], p["chosen"], p["rejected"]) for p in rows)


def assert_shards_intact(run_dir: Path) -> list[Path]:
    """Every generate shard on disk is a whole Parquet file (written to a temporary name, then renamed)."""
    shards = sorted((run_dir / "generate").glob("part-*.parquet"))
    assert shards and all(pq.read_table(p).num_rows > 0 for p in shards)
    assert read_manifest(run_dir / "generate") is None, "the interrupted stage must not be recorded as done"
    return shards


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops-server")
    srv = Stack(root)
    srv.env["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = "5"  # the scheduler looks for work every 5 s
    srv.cli_env = {**srv.env, "PREFECT_API_URL": f"{srv.url}/api"}
    write_problems(root / "problems.jsonl", PROBLEMS)
    with OpenAIServer(FakeBackend(fake_script(PROBLEMS))) as endpoint:
        srv.endpoint = endpoint
        # One request at a time, so a delay per request makes generation last long enough to interrupt.
        srv.recipe = openai_recipe(root, endpoint.base_url)
        raw = yaml.safe_load(srv.recipe.read_text())
        raw["backend"]["max_concurrency"] = 1
        srv.recipe.write_text(yaml.safe_dump(raw))
        with server_up(srv):
            yield srv


def test_server_up_sets_durable_leases_zombie_detection_and_deploys_without_prompts(stack: Stack):
    settings = stack.api("GET", "/admin/settings")
    assert settings["server"]["concurrency"]["lease_storage"].endswith("lease_storage.filesystem")
    (zombie,) = stack.api("POST", "/automations/filter", json={})
    assert zombie["trigger"]["posture"] == "Proactive" and zombie["actions"][0]["state"] == "CRASHED"
    # `prefect deploy --all` as a user runs it: no PREFECT_CLI_PROMPT, stdin closed. It must ask nothing.
    env = {k: v for k, v in stack.cli_env.items() if k not in ("PREFECT_CLI_PROMPT", "CKPTDPO_REPO")}
    r = subprocess.run(
        [sys.executable, "-m", "prefect", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
        env=env, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    deployments = stack.api("POST", "/deployments/filter", json={})
    assert len(deployments) == len(yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"])
    for d in deployments:  # no path of the deploying machine in what the worker will run
        assert str(REPO) not in str(d["pull_steps"]) and str(REPO) not in str(d["path"] or ""), d["name"]
    assert [s["schedule"]["cron"] for d in deployments if d["name"] == "nightly-refresh" for s in d["schedules"]]


def test_the_scheduler_creates_a_run_and_a_worker_completes_it(stack: Stack):
    run_dir = stack.root / "scheduled"
    anchor = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600 + 15))
    schedule = {"schedule": {"interval": 3600, "anchor_date": anchor}, "active": True}  # next run: ~15 s from now
    dep = stack.deployment("scheduled", schedules=[schedule], parameters={"recipe_path": str(stack.recipe),
                                                                          "run_dir": str(run_dir)})  # fmt: skip
    deadline = time.monotonic() + 90
    runs = []
    while not runs:
        assert time.monotonic() < deadline, "the scheduler created no run in 90 s"
        time.sleep(1)
        body = {"deployments": {"id": {"any_": [dep]}}, "sort": "EXPECTED_START_TIME_ASC"}
        runs = stack.api("POST", "/flow_runs/filter", json=body)
    assert runs[0]["auto_scheduled"] is True
    run = stack.wait_state(runs[0]["id"], TERMINAL, timeout=240)
    stack.api("PATCH", f"/deployments/{dep}", json={"paused": True})
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["name"] == f"pipeline {run_dir}"  # the flow's run name, not a random one
    stack.reference = pair_keys(run_dir)
    assert len(stack.reference) == 2 * len(PROBLEMS)
    # The report is in the UI itself: a markdown artifact of this run directory with the plots embedded.
    from tasks.planning import artifact_key

    body = {"artifacts": {"key": {"any_": [artifact_key(str(run_dir), "report")]}}}
    (report,) = stack.api("POST", "/artifacts/filter", json=body)
    assert report["type"] == "markdown" and "# ckptdpo report" in report["data"]
    assert "](data:image/png;base64," in report["data"] and "file://" not in report["data"]


def _reference(stack: Stack) -> list[tuple]:
    if stack.reference is None:
        pytest.skip("needs the scheduled run's pairs")
    return stack.reference


def start_slow_run(stack: Stack, deployment: str, name: str):
    """(reference pairs, deployment, run dir, flow run id, its process id) of a run slowed to 2 s per request, once its
    first shard is written: a run caught mid-generation."""
    reference = _reference(stack)
    dep = stack.deployment(deployment, schedules=[])
    run_dir = stack.root / name
    stack.endpoint.delay_s = 2.0
    run_id = stack.start(dep, run_dir)
    pid = stack.flow_run_pid(run_id)
    stack.wait_for_shard(run_dir)
    return reference, dep, run_dir, run_id, pid


def test_cancel_mid_generation_stops_the_run_within_30_s_and_the_next_run_resumes(stack: Stack):
    reference, dep, run_dir, run_id, pid = start_slow_run(stack, "manual", "cancelled")
    stack.api("POST", f"/flow_runs/{run_id}/set_state", json={"state": {"type": "CANCELLING"}})
    t0 = time.monotonic()
    while pid_alive(pid):
        assert time.monotonic() - t0 < 30, "the cancelled flow run's process is still running after 30 s"
        time.sleep(0.2)
    assert stack.wait_state(run_id, TERMINAL, timeout=60)["state"]["type"] == "CANCELLED"
    kept = {p.name: p.read_bytes() for p in assert_shards_intact(run_dir)}

    stack.endpoint.delay_s = 0.0
    before = stack.generation_requests()
    rerun = stack.wait_state(stack.start(dep, run_dir), TERMINAL)
    assert rerun["state"]["type"] == "COMPLETED", rerun["state"]
    assert pair_keys(run_dir) == reference
    # The shards the cancelled run wrote were kept: only the other problems were generated again.
    generated = stack.generation_requests() - before
    assert len(PROBLEMS) - len(kept) <= generated < len(PROBLEMS) + stack_round_requests(run_dir)
    assert all((run_dir / "generate" / name).read_bytes() == data for name, data in kept.items())
    assert read_manifest(run_dir / "generate")["num_rows"] == 2 * len(PROBLEMS)


def test_kill_9_of_the_flow_run_then_retry_resumes_and_gives_the_same_pairs(stack: Stack):
    reference, dep, run_dir, run_id, pid = start_slow_run(stack, "crashing", "killed")
    os.kill(pid, signal.SIGKILL)
    crashed = stack.wait_state(run_id, TERMINAL, timeout=90)
    assert crashed["state"]["type"] == "CRASHED", crashed["state"]
    kept = {p.name: p.read_bytes() for p in assert_shards_intact(run_dir)}
    # The worker can report the killed process's exit a second time a few seconds later; a retry started before
    # that report lands is marked crashed by it (seen here under load). Let the worker finish with the old process.
    time.sleep(10)

    stack.endpoint.delay_s = 0.0
    r = subprocess.run(
        [sys.executable, "-m", "prefect", "flow-run", "retry", run_id],
        env=stack.cli_env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    # The worker's report of the killed process can land after the retry started (a second `Crashed` while the
    # retried process runs on): what counts is that the retried run ends `Completed`.
    retried = stack.wait_state(run_id, ("COMPLETED", "FAILED", "CANCELLED"), timeout=240)
    if retried["state"]["type"] != "COMPLETED":
        print("STATE", retried["state"], "\nLOGS", stack.logs(run_id))
    assert retried["state"]["type"] == "COMPLETED", retried["state"]
    assert retried["run_count"] >= 2 and pair_keys(run_dir) == reference
    assert all((run_dir / "generate" / name).read_bytes() == data for name, data in kept.items())


def test_a_machine_loss_mid_run_does_not_block_the_next_run_of_a_limited_deployment(stack: Stack):
    """Server, worker and flow run die together (a host reboot); server and worker come back. The dead run stays
    `Running` for Prefect (nobody reported it) and holds the deployment's slot: the next run would wait forever.
    The restart marks it crashed (its recorded process is gone), which releases the slot.
    """
    from commands.server import restart_processes, server_settings

    _reference(stack)
    dep = stack.deployment("limited", schedules=[], concurrency_limit=1)
    stack.endpoint.delay_s = 2.0
    first = stack.start(dep, stack.root / "limited-1")
    pid = stack.flow_run_pid(first)
    stack.wait_state(first, ("RUNNING",), timeout=120)
    (worker,) = [p for p in stack.processes if p["role"] == "worker-cpu"]
    os.kill(worker["pid"], signal.SIGKILL)  # first, so nobody reports the flow run's death
    os.kill(pid, signal.SIGKILL)
    restart_processes(server_settings(stack.root / "home", stack.env), ["server", "worker-cpu"], base=stack.env)
    assert httpx.get(f"{stack.url}/api/health", timeout=10).status_code == 200
    # Nobody saw it die, but its recorded process is gone: the restart marked it crashed, which frees its slot.
    zombie = stack.api("GET", f"/flow_runs/{first}")["state"]
    assert zombie["type"] == "CRASHED" and "process is gone" in zombie["message"], zombie

    stack.endpoint.delay_s = 0.0
    second = stack.start(dep, stack.root / "limited-2")
    run = stack.wait_state(second, TERMINAL, timeout=240)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert pair_keys(stack.root / "limited-2") == stack.reference

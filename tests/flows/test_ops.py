"""Operations end to end: the incremental refresh, and a real Prefect server with workers, deployments and UI.

The refresh tests run in process under the session's temporary Prefect API. The server tests start one real server
on loopback through `ckptdpo server up` (once for the module: the server start is the cost), run the pipeline
deployment from the `prefect` CLI through a worker, look at the UI in headless Chromium and stop everything with
`ckptdpo server down`. Everything runs on the fake backend, so a flow run takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from ckptdpo.shards import read_manifest, read_stage
from commands.zombies import pid_alive
from tests.conftest import write_fake_recipe

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = "<|user|>\n{message}\n<|assistant|>\n"


def scripted(question: str, gold: int) -> tuple[dict, list[dict]]:
    """One problem whose right and wrong trajectory each have one checkpoint: exactly one r2w and one w2r pair."""
    right = f"Let me work out {question}\n\nWait, it is {gold}.\n\nSo the answer is \\boxed{{{gold}}}."
    wrong = f"I guess {question}\n\nBut maybe it is {gold + 1}.\n\nSo the answer is \\boxed{{{gold + 1}}}."
    continuations = [
        {"after": f"Let me work out {question}\n\n", "texts": [f"Wait, it is {gold + 2}, so \\boxed{{{gold + 2}}}."]},
        {"after": f"I guess {question}\n\n", "texts": [f"But no: it is {gold}, so \\boxed{{{gold}}}."]},
    ]
    return {question: {"samples": [right, wrong]}}, continuations


QUESTIONS = [("What is 2 + 3?", 5), ("What is 1 + 6?", 7), ("What is 3 * 3?", 9)]


def write_script(path: Path, questions=QUESTIONS, **extra) -> Path:
    script = {"template": TEMPLATE, "problems": {}, "continuations": [], **extra}
    for q, gold in questions:
        problems, continuations = scripted(q, gold)
        script["problems"].update(problems)
        script["continuations"].extend(continuations)
    path.write_text(yaml.safe_dump(script))
    return path


def write_problems(path: Path, questions) -> Path:
    rows = [{"id": f"q{i}", "problem": q, "answer": str(gold)} for i, (q, gold) in enumerate(questions)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_recipe(tmp: Path, **sections) -> Path:
    """A fake-backend recipe over `problems.jsonl` next to it; every problem is its own shard."""
    defaults = {
        "verify": {"timeout_s": 5, "workers": 1},
        "resample": {"max_rounds": 2, "max_attempts": 2, "max_tokens": 100},
    }
    return write_fake_recipe(tmp, None, None, name="ops", **{**defaults, **sections})


def hashes(root: Path) -> dict[str, str]:
    files = (p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# --- static: the deployments file, the task runner choice, the server settings ------------------------------------


def test_prefect_yaml_deployments_match_the_flows():
    import ast
    from zoneinfo import ZoneInfo

    from prefect.cli.deploy._models import PrefectYamlModel

    raw = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(raw)  # `prefect deploy` only warns and skips on an invalid file
    # The checkout is read from the worker's CKPTDPO_REPO when a run starts: nothing of the deploying machine's.
    shell, chdir = model.pull
    step = shell["prefect.deployments.steps.run_shell_script"]
    assert "$CKPTDPO_REPO" not in json.dumps(model.deployments and raw["deployments"])
    assert "{{ $" not in json.dumps(model.pull) and "${CKPTDPO_REPO:?" in step["script"]
    assert chdir == {
        "prefect.deployments.steps.set_working_directory": {"directory": f"{{{{ {step['id']}.stdout }}}}"}
    }
    # Every deployment states its schedules (an empty list for unscheduled ones): `prefect deploy --all` asks nothing.
    assert all("schedules" in d for d in raw["deployments"])
    by_name = {d.name: d for d in model.deployments}
    assert len(by_name) == len(model.deployments), "deployment names must be unique (`prefect deploy --name`)"
    flow_names = {}
    for d in model.deployments:
        path, func = d.entrypoint.split(":")
        tree = ast.parse((REPO / path).read_text())
        (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func]
        (deco,) = [x for x in fn.decorator_list if isinstance(x, ast.Call) and getattr(x.func, "id", "") == "flow"]
        flow_names[d.name] = next(k.value.value for k in deco.keywords if k.arg == "name")
        args = [a.arg for a in fn.args.args]
        # A deployment takes a recipe path and where to write (a stage's also names its stage).
        assert "recipe_path" in args and ("run_dir" in args or "data_dir" in args), d.name
        assert set(d.parameters) <= set(args) and (REPO / d.parameters["recipe_path"]).is_file(), d.name
        assert d.work_pool.name in ("cpu", "gpu"), d.name
    assert flow_names["pipeline"] == "pipeline" and flow_names["nightly-refresh"] == "refresh"
    assert {"generate", "verify", "checkpoints", "resample", "dto", "train", "eval"} <= set(by_name)
    assert by_name["verify"].work_pool.name == "cpu" and by_name["generate"].work_pool.name == "gpu"
    (nightly,) = by_name["nightly-refresh"].schedules
    assert len(nightly.cron.split()) == 5 and ZoneInfo(nightly.timezone) and nightly.active is True


def test_task_runner_choice(monkeypatch):
    import importlib.util

    from prefect.task_runners import ThreadPoolTaskRunner

    from ckptdpo.configs import TaskRunnerConfig
    from ckptdpo.errors import UserError
    from flows.runners import make_task_runner

    assert make_task_runner(TaskRunnerConfig()) is None
    assert isinstance(make_task_runner(TaskRunnerConfig(max_workers=3)), ThreadPoolTaskRunner)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "prefect_ray" else real(n, *a))
    with pytest.raises(UserError, match=r"prefect-ray is not installed.*ckptdpo\[ray\]"):
        make_task_runner(TaskRunnerConfig(kind="ray", address="ray://head:10001"))
    monkeypatch.undo()
    if real("prefect_dask"):
        runner = make_task_runner(TaskRunnerConfig(kind="dask", address="tcp://scheduler:8786"))
        assert type(runner).__name__ == "DaskTaskRunner" and runner.address == "tcp://scheduler:8786"


def test_cluster_runner_is_refused_with_an_in_process_model(tmp_path: Path):
    from ckptdpo.configs import Recipe
    from ckptdpo.errors import UserError
    from flows.runners import check_task_runner

    for runner in ("dask", "ray"):
        for kind in ("hf", "vllm"):
            recipe = Recipe.model_validate({"backend": {"kind": kind, "model": "m"}, "task_runner": {"kind": runner}})
            with pytest.raises(UserError, match=r"backend\.kind is .*use `backend\.kind: openai` with served models"):
                check_task_runner(recipe)
        served = {"kind": "openai", "model": "m", "base_urls": ["http://h:8000/v1"]}
        check_task_runner(Recipe.model_validate({"backend": served, "task_runner": {"kind": runner}}))
        # An in-process judge is refused too; the default judge is the (served) policy backend.
        judge = {"dto": {"judge": {"backend": {"kind": "hf", "model": "j"}}}, "stages": ["generate", "dto"]}
        with pytest.raises(UserError, match=r"dto\.judge\.backend\.kind is 'hf'"):
            check_task_runner(Recipe.model_validate({"backend": served, "task_runner": {"kind": runner}, **judge}))
    check_task_runner(Recipe.model_validate({"backend": {"kind": "hf", "model": "m"}}))  # threads: fine


def test_server_settings_from_the_environment(tmp_path: Path):
    from ckptdpo.errors import UserError
    from commands.server import server_settings

    s = server_settings(tmp_path, {"CKPTDPO_SERVER_PORT": "4321"})
    assert s.api_url == "http://127.0.0.1:4321/api" and s.prefect_home == tmp_path / "prefect"
    assert server_settings(tmp_path, {"PREFECT_HOME": "/x"}).prefect_home == Path("/x")
    assert server_settings(tmp_path, {}).port == 4200
    with pytest.raises(UserError, match="CKPTDPO_SERVER_PORT"):
        server_settings(tmp_path, {"CKPTDPO_SERVER_PORT": "http"})


# --- the refresh ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_refresh_processes_only_what_is_new_and_versions_the_pairs(prefect_harness, tmp_path: Path, monkeypatch):
    import flows.refresh
    from flows.refresh import refresh_flow

    trained = []
    monkeypatch.setattr(flows.refresh, "stage_flow", lambda *a, **kw: trained.append(kw) or {"trained": True})
    script = write_script(tmp_path / "script.yaml")
    recipe = write_recipe(tmp_path, refresh={"train_threshold": 3})
    problems = write_problems(tmp_path / "problems.jsonl", QUESTIONS[:1])
    data = tmp_path / "data"

    first = refresh_flow(str(recipe), str(data))
    v1 = data / "versions" / first["version"]
    assert first["new_problems"] == 1 and first["previous"] is None
    assert first["num_pairs"] == 2 and first["by_type"] == {"r2w": 1, "w2r": 1}
    assert (data / "latest").resolve() == v1.resolve() and not trained  # 2 new pairs < threshold 3
    before = hashes(v1)
    v1_ids = set(read_stage(v1 / "pairs").column("pair_id").to_pylist())

    write_problems(problems, QUESTIONS)  # the source grew by two problems
    second = refresh_flow(str(recipe), str(data))
    v2 = data / "versions" / second["version"]
    assert second["version"] > first["version"] and second["previous"] == first["version"]
    # Only the two new problems went through the pipeline: the run saw 2 problems and generated 2 x 2 samples.
    run2 = Path(second["run_dir"])
    assert sorted(read_stage(run2 / "problems").column("problem_id").to_pylist()) == ["q1", "q2"]
    assert read_manifest(run2 / "generate")["num_rows"] == 4
    pairs2 = read_stage(v2 / "pairs").to_pylist()
    assert len(pairs2) == 6 and second["new_pairs"] == 4 and second["carried_pairs"] == 2
    assert v1_ids < {p["pair_id"] for p in pairs2} and sorted({p["problem_id"] for p in pairs2}) == ["q0", "q1", "q2"]
    assert read_manifest(v2 / "pairs")["num_rows"] == 6
    assert (data / "latest").is_symlink() and (data / "latest").resolve() == v2.resolve()
    assert hashes(v1) == before, "the first version changed"
    # 6 new pairs since the last training >= 3: the refresh trained on the new version's pairs.
    assert len(trained) == 1 and trained[0]["run_dir"] == second["training"]["run_dir"]
    assert read_stage(Path(trained[0]["run_dir"]) / "pairs").num_rows == 6

    third = refresh_flow(str(recipe), str(data))  # nothing new: no version, `latest` stays
    assert third["version"] is None and third["latest"] == second["version"]
    assert sorted(p.name for p in (data / "versions").iterdir()) == sorted([first["version"], second["version"]])

    # q1's gold answer is corrected: only q1 is processed again, and its old pairs leave the dataset.
    rows = [json.loads(line) for line in problems.read_text().splitlines()]
    rows[1]["answer"] = "8"
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fourth = refresh_flow(str(recipe), str(data))
    assert fourth["new_problems"] == 1 and fourth["changed_problems"] == 1 and fourth["dropped_pairs"] == 2
    pairs4 = read_stage(data / "versions" / fourth["version"] / "pairs").to_pylist()
    assert [p["problem_id"] for p in pairs4].count("q0") == 2 and len(pairs4) == 4 + fourth["new_pairs"]
    assert all(p["gold_answer"] == "8" for p in pairs4 if p["problem_id"] == "q1")

    # A new model revision (here: another fake script) starts a new lineage: every problem again, nothing carried.
    write_script(script, default_logprob=-5.0)
    fifth = refresh_flow(str(recipe), str(data))
    assert fifth["new_problems"] == 3 and fifth["previous"] is None and fifth["carried_pairs"] == 0
    assert (data / "latest").resolve() == (data / "versions" / fifth["version"]).resolve()
    assert hashes(v1) == before


@pytest.mark.slow
def test_dask_cluster_runs_the_shard_tasks(prefect_harness, tmp_path: Path):
    pytest.importorskip("prefect_dask")
    import dask
    from distributed import Client, LocalCluster, get_task_stream

    from flows.pipeline import pipeline_flow

    write_script(tmp_path / "script.yaml", QUESTIONS[:2])
    recipe = write_recipe(tmp_path)
    write_problems(tmp_path / "problems.jsonl", QUESTIONS[:2])
    # A cluster as a user would run one: worker processes, non-daemonic so the verifier can start its own.
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, Client(cluster) as client:
        with get_task_stream(client) as stream:  # filled in when the block exits
            runner = {"task_runner": {"kind": "dask", "address": cluster.scheduler_address}}
            pipeline_flow(str(recipe), str(tmp_path / "dask"), runner)
        ran_on = {t["worker"] for t in stream.data}
        workers = set(client.scheduler_info()["workers"])
    pairs = read_stage(tmp_path / "dask" / "pairs").to_pylist()
    assert sorted((p["problem_id"], p["pair_type"]) for p in pairs) == [
        ("q0", "r2w"), ("q0", "w2r"), ("q1", "r2w"), ("q1", "w2r")
    ]  # fmt: skip
    # The shard tasks of all four stages ran on the cluster's workers, not in the flow's process.
    assert len(stream.data) >= 4 * 2 and ran_on and ran_on <= workers


@pytest.mark.slow
def test_ray_cluster_runs_the_shard_tasks_and_gives_the_thread_runners_pairs(prefect_harness, tmp_path: Path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("prefect_ray")
    from flows.pipeline import pipeline_flow

    write_script(tmp_path / "script.yaml", QUESTIONS[:2])
    recipe = write_recipe(tmp_path)
    write_problems(tmp_path / "problems.jsonl", QUESTIONS[:2])
    pipeline_flow(str(recipe), str(tmp_path / "thread"))
    # A local Ray cluster (its own raylet, object store and worker processes); the runner joins it ("auto").
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, namespace="prefect")
    try:
        pipeline_flow(str(recipe), str(tmp_path / "ray"), {"task_runner": {"kind": "ray", "address": "auto"}})
        events = ray.timeline()
    finally:
        ray.shutdown()

    def pairs(run: str) -> list[tuple]:
        rows = read_stage(tmp_path / run / "pairs").to_pylist()
        return sorted((p["pair_id"], p["prompt"], p["chosen"], p["rejected"]) for p in rows)

    assert pairs("ray") == pairs("thread") and len(pairs("ray")) == 4
    # The shard tasks of the four stages ran as Ray tasks in Ray's worker processes, not in this one.
    ran = [e for e in events if e.get("cat", "").startswith("task::") and e.get("ph") == "X"]
    assert len(ran) >= 4 * 2 and {e["pid"] for e in ran} - {os.getpid()}, ran[:3]


# --- a real server: `ckptdpo server up`, deployments, workers, the UI, `ckptdpo server down` -------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ckptdpo(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "commands", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Server:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Nothing of the test session's own Prefect settings (the temporary harness API) leaks into the server.
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.env = {
            **clean,
            "CKPTDPO_HOME": str(root / "home"),
            "PREFECT_HOME": str(root / "prefect"),
            "CKPTDPO_SERVER_PORT": str(self.port),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",  # workers pick runs up in about a second, not ten
        }
        self.cli_env = {**self.env, "PREFECT_API_URL": f"{self.url}/api"}

    @property
    def processes(self) -> list[dict]:
        state = self.root / "home" / "server" / "server.json"
        return json.loads(state.read_text())["processes"] if state.exists() else []

    def api(self, method: str, path: str, **kw):
        import httpx

        r = httpx.request(method, f"{self.url}/api{path}", timeout=30, **kw)
        r.raise_for_status()
        return r.json()

    def wait_for_run(self, run_id: str, timeout: float = 240) -> dict:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                run = self.api("GET", f"/flow_runs/{run_id}")
            except httpx.TimeoutException:  # SQLite under a busy flow run on 2 loaded cores: seen to stall > 30 s
                continue
            if run["state"] and run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            time.sleep(1)
        raise AssertionError(f"flow run {run_id} did not finish in {timeout} s; see {self.root}/home/server/logs")

    def wait_healthy(self, timeout: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/api/health", timeout=10).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(1)
        raise AssertionError(f"the server did not answer /health in {timeout} s; see {self.root}/home/server/logs")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    with server_up(Server(root)) as srv:
        yield srv


@pytest.mark.slow
def test_server_deploys_everything_and_runs_the_pipeline_deployment_from_the_cli(server: Server, tmp_path: Path):
    deployments = {d["name"]: d for d in server.api("POST", "/deployments/filter", json={})}
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    assert set(deployments) == {d["name"] for d in spec["deployments"]}
    assert {"pipeline", "generate", "verify", "checkpoints", "resample", "dto", "train", "eval"} < set(deployments)
    assert deployments["verify"]["work_pool_name"] == "cpu" and deployments["pipeline"]["work_pool_name"] == "gpu"
    nightly = deployments["nightly-refresh"]
    schedule = nightly["schedules"][0]["schedule"]
    assert schedule["cron"] == "0 3 * * *" and schedule["timezone"] == "UTC" and nightly["schedules"][0]["active"]
    assert nightly["entrypoint"] == "flows/refresh.py:refresh_flow"
    pools = {p["name"]: p for p in server.api("POST", "/work_pools/filter", json={})}
    assert {"cpu", "gpu"} <= set(pools) and all(pools[p]["type"] == "process" for p in ("cpu", "gpu"))

    write_script(tmp_path / "script.yaml")
    recipe = write_recipe(tmp_path)
    write_problems(tmp_path / "problems.jsonl", QUESTIONS)
    run_dir = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", "pipeline/pipeline",
         "--param", f"recipe_path={recipe}", "--param", f"run_dir={run_dir}"],
        env=server.cli_env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", r.stdout).group(1)
    run = server.wait_for_run(run_id)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["deployment_id"] == deployments["pipeline"]["id"] and run["work_pool_name"] == "gpu"
    pairs = read_stage(run_dir / "pairs").to_pylist()
    assert len(pairs) == 6 and {p["problem_id"] for p in pairs} == {"q0", "q1", "q2"}
    server.pipeline_run_id, server.pipeline_run_dir = run_id, str(run_dir)


@pytest.mark.slow
def test_ui_shows_deployments_schedule_and_the_finished_run_with_artifacts(server: Server, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    run_id = getattr(server, "pipeline_run_id", None)
    if run_id is None:
        pytest.skip("needs the pipeline run of the previous test")
    from tasks.planning import artifact_key

    # The pipeline's stage subflows carry the artifacts, keyed per run directory: find this run's resample subflow.
    pairs_key = artifact_key(server.pipeline_run_dir, "resample/pairs-summary")
    resample_key = artifact_key(server.pipeline_run_dir, "resample-summary")
    artifact = server.api("POST", "/artifacts/filter", json={"artifacts": {"key": {"any_": [pairs_key]}}})
    resample_run = server.api("GET", f"/flow_runs/{artifact[0]['flow_run_id']}")
    parent_task = server.api("GET", f"/task_runs/{resample_run['parent_task_run_id']}")
    assert parent_task["flow_run_id"] == run_id

    pages = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            for name, path, wait_for in [
                ("deployments", "/deployments", "nightly-refresh"),
                ("run", f"/runs/flow-run/{run_id}", "Completed"),
                ("resample", f"/runs/flow-run/{resample_run['id']}", "Completed"),
            ]:
                page.goto(server.url + path)
                page.get_by_text(wait_for).first.wait_for()
                if name == "resample":
                    page.get_by_text("Artifacts", exact=True).first.click()
                    page.get_by_text(pairs_key).first.wait_for()
                page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
                pages[name] = text = page.inner_text("body")
                # The deployments list shows 10 a page: turn its pages (the button after "Page k of n" is "next").
                while name == "deployments" and (at := re.search(r"Page (\d+) of (\d+)", text)):
                    if int(at[1]) == int(at[2]):
                        break
                    page.locator(".p-pager__context + button").first.click()
                    page.get_by_text(f"Page {int(at[1]) + 1} of {at[2]}").first.wait_for()
                    text = page.inner_text("body")
                    pages[name] += "\n" + text
        finally:
            browser.close()
    for name in (
        "pipeline",
        "generate",
        "verify",
        "checkpoints",
        "resample",
        "dto",
        "values",
        "train",
        "grpo",
        "eval",
        "nightly-refresh",
    ):
        assert name in pages["deployments"]
    assert "At 03:00 AM every day" in pages["deployments"]
    assert "Completed" in pages["run"] and "pipeline" in pages["run"] and "Subflow Runs" in pages["run"]
    assert pairs_key in pages["resample"] and resample_key in pages["resample"]
    assert all((tmp_path / f"{n}.png").stat().st_size > 10_000 for n in pages)


@pytest.mark.slow
def test_server_status_up_again_and_down_stops_only_what_it_started(server: Server, tmp_path: Path):
    server.wait_healthy()  # after the pipeline run of the tests before, a loaded server can be slow to answer
    assert ckptdpo(server.env, "server", "status").returncode == 0
    r = ckptdpo(server.env, "server", "up")  # idempotent while running
    assert r.returncode == 0 and "already running" in r.stdout
    other = {**server.env, "CKPTDPO_HOME": str(tmp_path / "other")}
    r = ckptdpo(other, "server", "up")  # the port is taken: one sentence, nothing started
    assert r.returncode == 2 and f"port {server.port}" in r.stderr and not (tmp_path / "other" / "server").exists()

    ours = [p["pid"] for p in server.processes]
    assert len(ours) == 3 and all(pid_alive(pid) for pid in ours)
    bystander = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        r = ckptdpo(server.env, "server", "down", timeout=120)
        assert r.returncode == 0 and "server" in r.stdout
        assert not any(pid_alive(pid) for pid in ours)
        assert bystander.poll() is None, "server down stopped a process it did not start"
        assert ckptdpo(server.env, "server", "status").returncode == 1
    finally:
        bystander.kill()
        bystander.wait()


@contextmanager
def server_up(srv):
    """`ckptdpo server up` for the block; everything stopped afterwards, whatever happened."""
    r = ckptdpo(srv.env, "server", "up")
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        yield srv
    finally:
        stop_server(srv)


def stop_server(srv) -> None:
    """`ckptdpo server down`, then SIGKILL for anything it left: a failed `down` must not leave processes behind."""
    ckptdpo(srv.env, "server", "down", timeout=120)
    for p in srv.processes:
        if pid_alive(p["pid"]):
            os.killpg(p["pid"], signal.SIGKILL)

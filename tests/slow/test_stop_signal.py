"""Stopping a run (issues 13 and 26), through the real CLI, on the fake backend and on the real model.

SIGTERM or SIGINT, to the run's process or to its whole process group (what a supervisor or `kill -- -PGID` sends),
ends the run and every process it started: the ephemeral Prefect API, verifier workers, the demo's `transformers
serve` judge. What was written is kept, and the same command then completes with the same output as a run never
interrupted. So does the temporary Prefect API dying under the run: the run stops at once, naming the API's URL.
How fast (within 10 s under load is the goal) is measured in benchmarks/stop_latency.py; here a run still going
after HANG_S fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptdpo.shards import read_manifest
from tasks.stopping import descendants, is_running

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
HANG_S = 90  # a stop that has not happened by then never will


class Run:
    """`python -m commands ARGS` in a session of its own (as under a supervisor: its process group is its pid)."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = tmp / f"out-{time.monotonic_ns()}.txt"
        env = {**(env or os.environ), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OMP_NUM_THREADS": "1"}
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "commands", *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.children: list[int] = []

    @property
    def output(self) -> str:
        return self.log.read_text()

    def wait_until(self, ready, what: str, timeout: float = 900) -> None:
        deadline = time.time() + timeout
        while not ready():
            assert self.proc.poll() is None, f"the run ended before {what}:\n{self.output[-3000:]}"
            assert time.time() < deadline, f"no {what} in {timeout:.0f} s"
            time.sleep(0.2)

    def stop(self, sig: signal.Signals, target: str) -> float:
        """Send `sig` to the run's process or its group; seconds until it exited (fails after HANG_S)."""
        self.children = descendants(self.proc.pid)
        t0 = time.time()
        if target == "group":
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        return self.wait_exit(t0)

    def wait_exit(self, t0: float, limit_s: float = HANG_S) -> float:
        try:
            self.proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            pytest.fail(f"the run was still going {limit_s:.0f} s later:\n{self.output[-3000:]}")
        return time.time() - t0

    def left_running(self) -> list[int]:
        """Processes of the run still running: its recorded children, and anything left in its process group."""
        time.sleep(1)
        group = [
            int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(int(p.name)) == self.proc.pid
        ]
        return sorted({pid for pid in [*self.children, *group] if is_running(pid)})


def _pgid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def finish(tmp: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "commands", *args], capture_output=True, text=True, timeout=1800,
                       env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


def shard_hashes(run_dir: Path, *stages: str) -> dict[str, list[str]]:
    return {s: [e["sha256"] for e in read_manifest(run_dir / s)["shards"]] for s in stages}


# --- the fake backend ------------------------------------------------------------------------------------------------

STAGES = ("generate", "verify")


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """(recipe, shard hashes of an uninterrupted run): 40 problems, one per shard, a backend that takes its time (1 s
    a request, two shards at a time: a stop 4-5 s into generation leaves most of it to do)."""
    from tests.conftest import write_fake_recipe
    from tests.flows.test_pipeline import PROBLEMS, SCRIPT, A, B

    tmp = tmp_path_factory.mktemp("stop-fake")
    script = {**SCRIPT, "problems": dict(SCRIPT["problems"]), "delay_s": 1.0}
    problems = list(PROBLEMS)
    for i in range(38):
        script["problems"][f"Copy {i}: what is 2 + 3?"] = {"samples": [A, B]}
        problems.append({"id": f"c{i}", "problem": f"Copy {i}: what is 2 + 3?", "answer": "5"})
    recipe = write_fake_recipe(tmp, script, problems, stages=list(STAGES))
    reference = tmp / "reference"
    finish(tmp, "run", str(recipe), "--run-dir", str(reference))
    return recipe, shard_hashes(reference, *STAGES)


def _shards(run_dir: Path, stage: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (run_dir / stage).glob("part-*.parquet")}


@pytest.mark.parametrize(
    "stops",
    [
        # the reported case first (the API dies with the group, the run went on), then the pid, then a stop while
        # the verifier's worker processes run
        (("SIGTERM", "group", "generate"), ("SIGINT", "pid", "generate"), ("SIGTERM", "group", "verify")),
        (("SIGINT", "group", "generate"), ("SIGTERM", "pid", "generate")),
    ],
    ids=["term-group,int-pid,term-group-verify", "int-group,term-pid"],
)
def test_stop_signals_end_the_run_and_its_children_and_the_rerun_completes_identically(
    fake, tmp_path: Path, stops: tuple[tuple[str, str, str], ...]
):
    """Each stop interrupts the same command run again in the same directory, once a shard of its stage is new."""
    recipe, reference = fake
    run_dir = tmp_path / "run"
    kept: dict[str, dict[str, int]] = {s: {} for s in STAGES}
    for name, target, stage in stops:
        sig = signal.Signals[name]
        before = _shards(run_dir, stage)
        run = Run(tmp_path, "run", str(recipe), "--run-dir", str(run_dir))
        run.wait_until(lambda: set(_shards(run_dir, stage)) - set(before), f"a new {stage} shard")  # noqa: B023
        stopped_s = run.stop(sig, target)
        out = run.output
        assert run.proc.returncode == 128 + sig and f"{sig.name} received" in out, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        assert run.left_running() == [], f"processes left running: {run.left_running()}"
        assert read_manifest(run_dir / stage) is None, f"the {name} came too late to test anything"
        for s in STAGES:  # a shard written before a stop is kept, never redone
            now = _shards(run_dir, s)
            assert all(now.get(shard) == mtime for shard, mtime in kept[s].items()), (name, target, s)
            kept[s] = now
        print(f"{name} to the {target} during {stage}: stopped {stopped_s:.1f} s later")

    out = finish(tmp_path, "run", str(recipe), "--run-dir", str(run_dir))
    assert "INFO" not in out, out[-3000:]  # Prefect's lines, "Stopping temporary server" at exit too, stay in its logs
    for s in STAGES:
        now = _shards(run_dir, s)
        assert all(now.get(shard) == mtime for shard, mtime in kept[s].items()), f"a kept {s} shard was redone"
    assert shard_hashes(run_dir, *STAGES) == reference
    assert not list(run_dir.rglob(".*.tmp-*"))


def test_a_prefect_api_that_dies_under_the_run_stops_it_at_once_naming_the_url(fake, tmp_path: Path):
    recipe, reference = fake
    run_dir = tmp_path / "run"
    run = Run(tmp_path, "run", str(recipe), "--run-dir", str(run_dir))
    run.wait_until((run_dir / "generate" / "part-00000.parquet").exists, "generate shard")
    (api,) = [pid for pid in descendants(run.proc.pid) if b"create_app" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    run.children = descendants(run.proc.pid)
    t0 = time.time()
    os.kill(api, signal.SIGKILL)
    stopped_s = run.wait_exit(t0)
    out = run.output
    assert run.proc.returncode == 1, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert "the Prefect API at http://127.0.0.1:" in last and "run the same command again" in last, out[-3000:]
    assert "Traceback" not in out and run.left_running() == []
    finish(tmp_path, "run", str(recipe), "--run-dir", str(run_dir))
    assert shard_hashes(run_dir, *STAGES) == reference
    print(f"Prefect API killed: the run stopped {stopped_s:.1f} s later")


def test_a_prefect_server_that_stays_down_stops_the_run_naming_it(fake, tmp_path: Path):
    """With PREFECT_API_URL, a server that stops answering for CKPTDPO_SERVER_OUTAGE_S (default a minute; 15 s here)
    ends the run the same way."""
    from tests.flows.test_ops import Server, server_up, stop_server

    outage_s = 15

    recipe, _ = fake
    run_dir = tmp_path / "run"
    srv = Server(tmp_path / "server")
    with server_up(srv):
        env = {**srv.cli_env, "CKPTDPO_SERVER_OUTAGE_S": str(outage_s)}
        run = Run(tmp_path, "run", str(recipe), "--run-dir", str(run_dir), env=env)
        run.wait_until((run_dir / "generate" / "part-00000.parquet").exists, "generate shard")
        run.children = descendants(run.proc.pid)
        t0 = time.time()
        stop_server(srv)
        stopped_s = run.wait_exit(t0, outage_s + HANG_S)
    out = run.output
    last = out.strip().splitlines()[-1]
    assert run.proc.returncode == 1, out[-3000:]
    assert f"the Prefect API at {srv.url}/api stopped answering" in last and "server status" in last, out[-3000:]
    assert run.left_running() == [] and stopped_s >= outage_s - 5  # a restart within the outage would be fine
    print(f"Prefect server stopped: the run stopped {stopped_s:.1f} s later")


# --- the real model --------------------------------------------------------------------------------------------------

DEMO_ARGS = ["--stages", "generate", "--set", "problems.num_problems=6", "--set", "generate.shard_size=1",
             "--set", "generate.num_samples=2", "--set", "generate.max_tokens=160"]  # fmt: skip


def test_the_real_model_stops_on_a_signal_to_its_group_or_its_pid_and_the_rerun_resumes(demo_model_path, tmp_path):
    run_dir = tmp_path / "run"
    args = ["run", str(REPO / "recipes" / "demo.yaml"), "--run-dir", str(run_dir), *DEMO_ARGS]
    kept: dict[str, int] = {}
    for target in ("group", "pid"):
        before = _shards(run_dir, "generate")
        run = Run(tmp_path, *args)
        run.wait_until(lambda: set(_shards(run_dir, "generate")) - set(before), "a new generate shard")  # noqa: B023
        stopped_s = run.stop(signal.SIGTERM, target)
        out = run.output
        assert run.proc.returncode == 128 + signal.SIGTERM and "SIGTERM received" in out, out[-3000:]
        assert run.left_running() == [], f"processes left running: {run.left_running()}"
        assert read_manifest(run_dir / "generate") is None  # interrupted: not recorded as done
        now = _shards(run_dir, "generate")
        assert all(now.get(shard) == mtime for shard, mtime in kept.items()), "a kept shard was redone"
        kept = now
        print(f"SIGTERM to the {target}: stopped {stopped_s:.1f} s later")

    finish(tmp_path, *args)
    now = _shards(run_dir, "generate")
    assert all(now.get(shard) == mtime for shard, mtime in kept.items()), "a shard written before a stop was redone"
    assert read_manifest(run_dir / "generate")["num_rows"] == 12


def test_the_demo_stops_with_its_served_judge(demo_model_path, tmp_path: Path):
    """`ckptdpo demo` runs its judge behind `transformers serve`: a signal to the group ends that server too."""
    from commands.localserver import server_binary

    if server_binary() is None:
        pytest.skip("transformers serve (the serve extra) is not installed")
    run_dir = tmp_path / "demo"
    small = ["--set", "problems.num_problems=2", "--set", "generate.shard_size=1", "--set", "generate.max_tokens=64"]
    run = Run(tmp_path, "demo", "--run-dir", str(run_dir), *small)

    def judge_and_shard() -> bool:
        serving = any(b"serve" in Path(f"/proc/{p}/cmdline").read_bytes() for p in descendants(run.proc.pid)
                      if Path(f"/proc/{p}/cmdline").exists())  # fmt: skip
        return serving and (run_dir / "generate" / "part-00000.parquet").exists()

    run.wait_until(judge_and_shard, "judge server and generate shard")
    stopped_s = run.stop(signal.SIGTERM, "group")
    assert run.proc.returncode == 128 + signal.SIGTERM, run.output[-3000:]
    assert run.left_running() == [], f"processes left running: {run.left_running()}"
    print(json.dumps({"demo_stopped_s": round(stopped_s, 1)}))

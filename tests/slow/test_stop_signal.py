"""SIGTERM stops a real run mid-generation within 30 s, leaves no process behind, and the next run resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptdpo.shards import read_manifest
from tasks.stopping import _children

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ARGS = ["--stages", "generate", "--set", "problems.num_problems=4", "--set", "generate.shard_size=1",
        "--set", "generate.num_samples=2", "--set", "generate.max_tokens=160"]  # fmt: skip


def start(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "commands", "run", str(REPO / "recipes" / "demo.yaml"), "--run-dir", str(run_dir)]
    return subprocess.Popen([*cmd, *ARGS], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_mid_generation_stops_within_30_s_and_the_rerun_resumes(demo_model_path, tmp_path: Path):
    run_dir = tmp_path / "run"
    first = run_dir / "generate" / "part-00000.parquet"
    proc = start(run_dir)
    deadline = time.time() + 600
    while not first.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no shard written in 10 minutes"
        time.sleep(0.5)
    children = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the run was still going 30 s after SIGTERM")
    stopped_s = time.time() - t0
    out = proc.stdout.read()
    assert proc.returncode != 0 and "SIGTERM" in out, out[-2000:]
    time.sleep(1)
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()]
    assert alive == [], f"child processes left running: {alive}"
    assert read_manifest(run_dir / "generate") is None  # interrupted: not recorded as done
    kept = first.stat().st_mtime_ns

    proc = start(run_dir)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    assert first.stat().st_mtime_ns == kept, "the shard written before the signal must be kept, not redone"
    assert read_manifest(run_dir / "generate")["num_rows"] == 8
    print(f"stopped {stopped_s:.1f} s after SIGTERM")

"""The demo recipe end to end on the real demo model (reduced sizes), through the CLI, as `make demo` runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckptdpo.shards import read_manifest, read_stage
from ckptdpo.verify import verify_batch

REPO = Path(__file__).resolve().parents[2]
SMALL = {
    "problems.num_problems": 4,
    "generate.num_samples": 3,
    # Labels come from boxed answers only: samples and continuations must be long enough to reach their box.
    "generate.max_tokens": 96,
    "generate.shard_size": 2,
    "resample.max_rounds": 2,
    "resample.max_tokens": 48,
    "dto.judge.max_tokens": 8,
    "dto.judge.max_segments": 2,
    "values.max_tokens": 24,
    "train.max_steps": 1,
    "train.pair_types": "[r2w, w2r, critical, dto]",
    "grpo.generation_budget": 160,
    "grpo.max_completion_length": 40,
    "eval.benchmarks.heldout.num_problems": 2,
    "eval.num_samples": 2,
    "eval.k": "[1, 2]",
    "eval.max_tokens": 24,
}


@pytest.mark.slow
def test_demo_recipe_on_the_real_model(demo_model_path, tmp_path: Path):
    run_dir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "commands", "demo", "--run-dir", str(run_dir)]
    for k, v in SMALL.items():
        cmd += ["--set", f"{k}={v}"]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]

    stats = json.loads((run_dir / "stats.json").read_text())
    for section in ("generate", "verify", "checkpoints", "values", "resample", "dto", "train", "grpo", "eval"):
        assert section in stats, section
    assert stats["generate"]["num_samples"] == 12
    assert sum(stats["verify"]["by_status"].values()) == 12
    assert read_manifest(run_dir / "pairs")["num_rows"] > 0
    pairs = read_stage(run_dir / "pairs").to_pylist()
    for p in pairs:
        assert p["pair_type"] in ("r2w", "w2r", "critical", "dto") and p["chosen"] != p["rejected"]
        if p["pair_type"] in ("r2w", "w2r", "critical"):
            assert p["prompt"].startswith("<|im_start|>")
    # Critical pairs hold up under a strict check of both sides: chosen verifies, rejected does not.
    gold = {r["problem_id"]: r["answer"] for r in read_stage(run_dir / "problems").to_pylist()}
    critical = [p for p in pairs if p["pair_type"] == "critical"]
    items = [(gold[p["problem_id"]], side, "stop") for p in critical for side in (p["chosen"], p["rejected"])]
    verdicts = verify_batch(items, timeout_s=20, workers=1, answer_format="boxed")
    assert [v.status == "correct" for v in verdicts] == [True, False] * len(critical)
    page = (run_dir / "report" / "index.html").read_text()
    assert len(page) > 10_000 and "could not be drawn" not in page
    assert '<section id="values">' in page and '<section id="grpo">' in page
    assert "heldout" in stats["eval"] and {"base", "trained", "grpo"} <= set(stats["eval"]["heldout"])
    assert abs(stats["grpo"]["generated_tokens"] - 160) <= 16

    # The same command again recomputes nothing.
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "stats.json").read_text())["generate"] == stats["generate"]

"""The grpo stage through the real CLI on a tiny model: a GRPO-only run with an explicit budget loads its problems,
trains within 10% of the budget, writes its summary and model, and the report shows the cost-matched section."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ckptdpo.shards import read_manifest, read_stats
from tests.flows.test_train import ROOT, _assert_all_changed, _weights
from tests.slow.test_grpo import BUDGET, PROBLEMS_ROWS, tiny_chat, tiny_tokenizer  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


def test_a_grpo_only_run_with_an_explicit_budget(tiny_chat, tmp_path: Path):  # noqa: F811
    rows = [{"id": p["problem_id"], "problem": p["problem"], "answer": p["answer"]} for p in PROBLEMS_ROWS]
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    grpo = {"generation_budget": BUDGET, "num_generations": 8, "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 1, "max_completion_length": 16, "learning_rate": 1e-3,
            "warmup_ratio": 0.0, "save_steps": 1}  # fmt: skip
    recipe = {
        "name": "grpo-only",
        "stages": ["grpo"],
        "problems": {"source": "file", "path": "problems.jsonl"},
        "backend": {"kind": "hf", "model": str(tiny_chat["model"]), "device": "cpu"},
        "verify": {"timeout_s": 20, "workers": 1, "answer_format": "boxed"},
        "grpo": grpo,
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "commands", "run", str(tmp_path / "recipe.yaml"), "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_stats(run_dir)["grpo"]
    assert summary["generation_budget"] == BUDGET and abs(summary["generated_tokens"] - BUDGET) <= 0.1 * BUDGET
    assert read_manifest(run_dir / "grpo") is not None and read_manifest(run_dir / "problems")["num_rows"] == 4
    _assert_all_changed(_weights(tiny_chat["model"]), _weights(run_dir / "grpo" / "model"))
    page = (run_dir / "report" / "index.html").read_text()
    assert '<section id="grpo">' in page and "could not be drawn" not in page
    # Again: the stage is done under the same key; nothing retrains.
    before = (run_dir / "grpo" / "model" / "model.safetensors").stat().st_mtime_ns
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and (run_dir / "grpo" / "model" / "model.safetensors").stat().st_mtime_ns == before

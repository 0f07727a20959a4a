"""Multi-process training on CPU: precomputed reference log-probs on two ranks, LoRA under ZeRO-3 with its merge."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ckptdpo.train import TrainJob, build_launch_command, build_merge_command, write_job
from tests.flows import test_train
from tests.flows.test_train import ROOT, _assert_all_changed, _weights, tiny_train_config

pytestmark = pytest.mark.slow
# The tiny random Llama, its tokenizer and a pair stage, built once per module (fixtures of the train tests).
tiny_tokenizer = test_train.tiny_tokenizer
tiny = test_train.tiny


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _job(tiny, out: Path, **train) -> TrainJob:
    cfg = tiny_train_config(**{"max_steps": 2, "save_steps": 2, **train})
    return TrainJob(train=cfg, pairs_dirs=[str(tiny["pairs"])], model=str(tiny["model"]), output_dir=str(out))


def test_precomputed_reference_log_probs_on_two_ranks(tiny, tmp_path):
    job = _job(tiny, tmp_path / "train", num_processes=2, precompute_ref_log_probs=True, group_by_length=True)
    cmd = build_launch_command(write_job(job, tmp_path / "job.yaml"), job.train)
    done = _run(cmd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 2
    ranks = summary["ranks"]
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-9)
    _assert_all_changed(_weights(tiny["model"]), _weights(tmp_path / "train" / "model"))
    # Padding figures summed over both ranks.
    per_step = summary["padding"]["per_step"]
    assert [p["step"] for p in per_step] == [1, 2]
    assert all(0 < p["real_tokens"] <= p["padded_tokens"] for p in per_step)
    # The Trainer's own count of non-padding tokens, gathered over ranks, agrees.
    assert summary["tokens"] == sum(p["real_tokens"] for p in per_step) == summary["num_input_tokens_seen"]
    # The reference log-probs were cached next to the train dataset every rank reads, for all 12 pairs (TRL's own
    # output, plus the copy `datasets` writes when it flattens an indices mapping: the same values).
    import datasets

    arrows = (tmp_path / "train" / "data").glob("train-*/cache-*.arrow")
    caches = [datasets.Dataset.from_file(str(f)) for f in arrows]
    refs = [c.to_dict() for c in caches if sorted(c.column_names) == ["ref_chosen_logps", "ref_rejected_logps"]]
    assert refs and all(r == refs[0] for r in refs)
    assert len(refs[0]["ref_chosen_logps"]) == 12
    assert all(x < 0 for x in refs[0]["ref_chosen_logps"] + refs[0]["ref_rejected_logps"])


def test_lora_under_zero3_on_two_ranks_merges_in_one_process_and_exits(tiny, tmp_path):
    out = tmp_path / "train"
    job = _job(tiny, out, num_processes=2, zero_stage=3, lora=True, lora_r=4, learning_rate=1e-2)
    job_path = write_job(job, tmp_path / "job.yaml")
    trained = _run(build_launch_command(job_path, job.train), timeout=240)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["zero_stage"] == 3 and summary["world_size"] == 2 and not summary["merged"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    merged = _run(build_merge_command(job_path), timeout=120)
    assert merged.returncode == 0, merged.stdout[-3000:] + merged.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["merged"]
    # Every projection LoRA was applied to moved: the adapter's update is folded into the saved weights.
    _assert_all_changed(
        {k: v for k, v in _weights(tiny["model"]).items() if "proj" in k},
        {k: v for k, v in _weights(out / "model").items() if "proj" in k},
    )


def test_accelerate_launch_runs_two_cpu_ranks(tiny, tmp_path):
    out = tmp_path / "train"
    config = str(ROOT / "recipes" / "accelerate" / "cpu_multi.yaml")
    job = _job(tiny, out, num_processes=2, accelerate_config=config)
    cmd = build_launch_command(write_job(job, tmp_path / "job.yaml"), job.train)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    done = _run(cmd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 2
    ranks = summary["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["backend"] == "gloo" and r["device"].startswith("cpu") for r in ranks)
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-9)
    _assert_all_changed(_weights(tiny["model"]), _weights(out / "model"))

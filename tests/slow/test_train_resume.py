"""Training killed at every checkpoint write and resumed: never past max_steps, and the summary (steps, tokens,
losses, padding) is the one an uninterrupted run writes, even when save_total_limit deletes the resumed checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from ckptdpo.train import FAULT_EXIT_CODE, TrainJob, build_launch_command, latest_checkpoint, write_job
from tests.flows import test_train
from tests.flows.test_train import ROOT

pytestmark = pytest.mark.slow
# The tiny random Llama, its tokenizer and a pair stage, built once per module (fixtures of the train tests).
tiny_tokenizer = test_train.tiny_tokenizer
tiny = test_train.tiny

# 12 training pairs, 2 per step: an epoch is 6 steps, so the last step (5) is not at an epoch's end. The last step
# writes a full checkpoint only with save_optimizer_at_end, and these tests kill the run around that checkpoint.
CFG = test_train.tiny_train_config(max_steps=5, save_steps=2, save_total_limit=1, save_optimizer_at_end=True)


def _train(tiny, out: Path, **faults) -> subprocess.CompletedProcess:
    job = TrainJob(train=CFG, pairs_dirs=[str(tiny["pairs"])], model=str(tiny["model"]), output_dir=str(out), **faults)
    path = write_job(job, out.parent / f"job-{out.name}.yaml")
    return subprocess.run(build_launch_command(path, CFG), cwd=ROOT, capture_output=True, text=True, timeout=300)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _assert_same_run(resumed: dict, straight: dict) -> None:
    assert resumed["global_step"] == straight["global_step"] == CFG.max_steps
    assert [s["step"] for s in resumed["steps"]] == [s["step"] for s in straight["steps"]] == [1, 2, 3, 4, 5]
    for a, b in zip(resumed["steps"], straight["steps"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a, b)
    assert resumed["final_loss"] == pytest.approx(straight["final_loss"], rel=1e-4)
    assert resumed["tokens"] == straight["tokens"] == straight["num_input_tokens_seen"] > 0
    assert resumed["num_input_tokens_seen"] == straight["num_input_tokens_seen"]
    assert resumed["padding"]["per_step"] == straight["padding"]["per_step"]
    assert [s["step"] for s in resumed["padding"]["per_step"]] == [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("straight") / "train"
    done = _train(tiny, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return _summary(out)


def test_killed_while_writing_each_checkpoint_resumes_to_the_same_summary(tiny, straight, tmp_path):
    out = tmp_path / "train"
    # SIGKILL while checkpoint-2, -4, then -5 (the last) is half written (weights, optimizer, no trainer_state).
    for step, newest, deleted in ((2, None, None), (4, "checkpoint-2", None), (5, "checkpoint-4", "checkpoint-2")):
        killed = _train(tiny, out, kill_in_save_step=step)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        half = out / f"checkpoint-{step}"
        assert half.is_dir() and not (half / "trainer_state.json").exists()
        assert not (out / "summary.json").exists()
        assert getattr(latest_checkpoint(out), "name", None) == newest
        if deleted:
            # save_total_limit=1: writing checkpoint-4 deleted checkpoint-2, the one this attempt resumed from.
            assert not (out / deleted).exists()
    done = _train(tiny, out)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = _summary(out)
    assert resumed["resumed_from"] == "checkpoint-4" and resumed["start_step"] == 4 and resumed["steps_run"] == 1
    assert not (out / "checkpoint-4").exists()  # deleted by the final save, before the summary was written
    _assert_same_run(resumed, straight)


def test_killed_after_the_last_checkpoint_trains_no_step_past_max_steps(tiny, straight, tmp_path):
    out = tmp_path / "train"
    first = _train(tiny, out, fail_after_step=CFG.max_steps)
    assert first.returncode == FAULT_EXIT_CODE, first.stderr[-3000:]
    assert latest_checkpoint(out) == out / "checkpoint-5" and not (out / "summary.json").exists()
    done = _train(tiny, out)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = _summary(out)
    assert resumed["resumed_from"] == "checkpoint-5" and resumed["steps_run"] == 0
    assert not (out / "checkpoint-6").exists()
    _assert_same_run(resumed, straight)
    assert any((out / "model").glob("*.safetensors"))

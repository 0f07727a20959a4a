"""A DPO run on pairs with long prefixes: long prompts are cut and kept, the summary's counts and rates agree with
what the run logged step by step and with the wall clock, and the final save leaves no optimizer state unless asked."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from ckptdpo.schemas import PAIRS, make_table
from ckptdpo.shards import write_manifest, write_shard
from ckptdpo.train import TrainJob, build_launch_command, write_job
from tests.flows import test_train
from tests.flows.test_train import ROOT, _pair, _rows

pytestmark = pytest.mark.slow
tiny_tokenizer = test_train.tiny_tokenizer
tiny = test_train.tiny

PROBLEM = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
STEP_LINE = re.compile(r"step (\d+)/(\d+): ([\d.]+) s, (\d+) pairs, (\d+) tokens, (\d+) computed")


@pytest.fixture(scope="module")
def long_pairs(tiny) -> Path:
    """The tiny pair stage plus three pairs whose prompt alone is over max_length."""
    prompts = [PROBLEM + "Let me add the numbers. " * (30 + 5 * i) + "So far" for i in range(3)]
    rows = _rows() + [_pair(200 + i, p, " Wait, 5.", " But 6.", "r2w", f"long-{i}") for i, p in enumerate(prompts)]
    where = tiny["run_dir"] / "long-pairs"
    write_shard(where, 0, make_table(rows, PAIRS))
    write_manifest(where, config_hash="long-pairs")
    return where


def _train(tiny, pairs: Path, out: Path, **fields) -> tuple[dict, list[tuple], float]:
    cfg = test_train.tiny_train_config(max_steps=4, save_steps=2, **fields)
    job = TrainJob(train=cfg, pairs_dirs=[str(pairs)], model=str(tiny["model"]), output_dir=str(out))
    began = time.monotonic()
    done = subprocess.run(build_launch_command(write_job(job, out.parent / f"{out.name}.yaml"), cfg), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    wall = time.monotonic() - began
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [tuple(float(x) for x in m.groups()) for m in STEP_LINE.finditer(done.stderr)]
    return json.loads((out / "summary.json").read_text()), steps, wall


def test_long_prefixes_are_cut_kept_and_counted_and_the_rates_are_the_logged_ones(tiny, long_pairs, tmp_path):
    out = tmp_path / "train"
    summary, steps, wall = _train(tiny, long_pairs, out)
    pairs = summary["pairs"]
    # 12 usable short pairs and the 3 long ones, cut to fit; the two rows no cut can save are dropped, by reason.
    assert pairs["num_kept"] == pairs["num_pairs_used"] == pairs["num_train"] == 15
    assert pairs["num_truncated"] == 3 and pairs["num_dropped"] == 2
    assert pairs["dropped"]["over_max_length"] == 1 and pairs["dropped"]["prompt_not_prefix"] == 1
    assert pairs["num_kept"] + pairs["num_dropped"] == pairs["num_pairs_selected"]

    # Each step logged what it trained and how long it took; the summary's figures are those lines' sums.
    assert [int(s[0]) for s in steps] == [1, 2, 3, 4] and all(int(s[1]) == 4 for s in steps)
    assert sum(s[4] for s in steps) == summary["tokens"] and sum(s[5] for s in steps) == summary["computed_tokens"]
    assert sum(s[3] for s in steps) == 8
    steady = steps[1:]  # the first step pays for warm-up
    logged_rate = sum(s[4] for s in steady) / sum(s[2] for s in steady)
    assert summary["tokens_per_s"] == pytest.approx(logged_rate, rel=0.05)
    assert summary["pairs_per_s"] == pytest.approx(sum(s[3] for s in steady) / sum(s[2] for s in steady), rel=0.05)
    assert summary["steady_state"]["num_steps"] == 3 and summary["steady_state"]["first_step"] == 2
    # The packed rows computed each prompt once: fewer tokens than the pairs' two sequences hold.
    assert summary["prefix_sharing"] and 0 < summary["computed_tokens"] < summary["tokens"]

    # Start-up, steps, logging and saves are timed apart and fit in the wall time the test measured.
    timing = summary["timing"]
    assert timing["startup_s"] > 0 and timing["final_save_s"] > 0 and timing["checkpoint_save_s"] > 0
    assert timing["train_steps_s"] == pytest.approx(sum(timing["step_seconds"]))
    parts = ("startup_s", "train_steps_s", "log_s", "checkpoint_save_s", "eval_s", "final_save_s")
    assert sum(timing[k] for k in parts) <= timing["wall_time_s"] <= wall
    assert summary["peak_memory"]["kind"] == "cpu_max_rss" and summary["peak_memory"]["bytes"] > 2**20
    assert summary["mfu"] is None  # no GPU

    # The mid-run checkpoint keeps what resuming needs; the end writes the model, not a checkpoint with optimizer.
    assert (out / "checkpoint-2" / "optimizer.pt").is_file()
    assert not (out / "checkpoint-4").exists() and any((out / "model").glob("*.safetensors"))


def test_save_optimizer_at_end_keeps_the_last_full_checkpoint(tiny, long_pairs, tmp_path):
    out = tmp_path / "train"
    _train(tiny, long_pairs, out, save_optimizer_at_end=True)
    last = out / "checkpoint-4"
    assert (last / "optimizer.pt").is_file() and (last / "trainer_state.json").is_file()

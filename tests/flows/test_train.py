"""Training: pair preparation, a 2-rank DeepSpeed ZeRO-2 DPO run with a kill and resume, SimPO through the flow.

Everything trains a tiny randomly initialised Llama with a byte-level BPE tokenizer trained here, so no test needs
the hub or the demo model. The tokenizer merges "\\n\\n" into one token, like SmolLM2's, so prompts that end in
a paragraph break exercise the prompt/completion boundary realignment.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from ckptdpo.configs import TrainConfig
from ckptdpo.schemas import PAIRS, make_table
from ckptdpo.shards import content_id, read_stats, write_manifest, write_shard
from ckptdpo.train import (
    FAULT_EXIT_CODE,
    TrainJob,
    build_launch_command,
    latest_checkpoint,
    prepare_pairs,
    split_pairs,
    write_job,
)

ROOT = Path(__file__).resolve().parents[2]
MAX_LENGTH = 128
CORPUS = [
    "What is 2+3? Let me add the numbers.\n\nWait, 2+3=5. The answer is \\boxed{5}.",
    "Alternatively 2+3=6, so \\boxed{6}.\n\nBut that is wrong. Hmm, I think this is enough.",
    "user assistant system 0 1 2 3 4 5 6 7 8 9 + = ?",
    # Text ending in a paragraph break is where the byte-level pre-tokenizer keeps "\n\n" whole, so BPE learns it.
    "Let me add the numbers.\n\n",
] * 20


def _prompt(a: int, b: int) -> str:
    return f"<|im_start|>user\nWhat is {a}+{b}?<|im_end|>\n<|im_start|>assistant\nLet me add the numbers.\n\n"


def tiny_train_config(**fields) -> TrainConfig:
    """The training settings the tiny-model tests share (both pair types, 2 pairs a step, no eval split)."""
    base = dict(pair_types=["r2w", "w2r"], per_device_train_batch_size=2, learning_rate=1e-3, max_length=MAX_LENGTH,
                eval_fraction=0.0)  # fmt: skip
    return TrainConfig(**{**base, **fields})


def _pair(i: int, prompt: str, chosen: str, rejected: str, pair_type: str, problem_id: str) -> dict:
    return {
        "pair_id": content_id("pair", i, prompt, chosen, rejected),
        "pair_type": pair_type,
        "problem_id": problem_id,
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "gold_answer": "0",
        "source_sample_id": f"s{i}",
        "checkpoint_index": 0,
        "prompt_tokens": 0,
        "chosen_tokens": 0,
        "rejected_tokens": 0,
        "round": 1,
        "attempt_id": f"a{i}",
        "model": "tiny",
    }


def _rows() -> list[dict]:
    rows = []
    for i in range(18):
        a, b = i % 7, (i * 3) % 5
        chosen = f"Wait, {a}+{b}={a + b}. The answer is \\boxed{{{a + b}}}."
        rejected = f"Alternatively {a}+{b}={a + b + 1}, so \\boxed{{{a + b + 1}}}."
        rows.append(_pair(i, _prompt(a, b), chosen, rejected, ("r2w", "w2r", "dto")[i % 3], f"problem-{i % 9}"))
    # "Wai" + "t, ..." merges into one token across the boundary: no token boundary inside the prompt is left.
    rows.append(_pair(100, "Wai", "t, 2+3=5.", "t, 2+3=6.", "r2w", "problem-x"))
    # Longer than MAX_LENGTH even without its prompt.
    rows.append(_pair(101, _prompt(1, 1), "Wait, " + "1+1=2. " * 60, "But 1+1=3.", "w2r", "problem-y"))
    return rows


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer trained here on a few lines (no hub), saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    # Large enough that "Wait" is one token, so the "Wai" + "t, ..." row cannot be realigned.
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    model_dir = tmp_path_factory.mktemp("tiny") / "model"
    tokenizer.save_pretrained(model_dir)
    return {"dir": model_dir, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer) -> dict[str, Path]:
    """A tiny random Llama next to the tokenizer, and one pair stage."""
    from ckptdpo.models import save_random_llama

    model_dir, tokenizer = tiny_tokenizer["dir"], tiny_tokenizer["tokenizer"]
    save_random_llama(tokenizer, model_dir, hidden_size=32, intermediate_size=64, max_positions=256, bos_token_id=None)
    run_dir = model_dir.parent / "run"
    write_shard(run_dir / "pairs", 0, make_table(_rows(), PAIRS))
    write_manifest(run_dir / "pairs", config_hash="test-pairs")
    return {"model": model_dir, "run_dir": run_dir, "pairs": run_dir / "pairs"}


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _assert_all_changed(before: dict, after: dict) -> None:
    import torch

    # A DeepSpeed save writes the tied lm_head as its own tensor too; every initial tensor must be there.
    assert set(before) <= set(after)
    same = [k for k in before if torch.equal(before[k].float(), after[k].float())]
    assert not same, f"parameters left unchanged by training: {same}"


# --- pair preparation ----------------------------------------------------------------------------------------------


def test_prepare_counts_unalignable_and_overlong_rows_and_realigns_the_rest(tiny_tokenizer):
    tok = tiny_tokenizer["tokenizer"]
    rows = _rows()
    # The paragraph break before "Wait" encodes alone as one token but as two before the completion.
    prompt, chosen = rows[0]["prompt"], rows[0]["chosen"]
    alone, joint = tok(prompt)["input_ids"], tok(prompt + chosen)["input_ids"]
    assert joint[: len(alone)] != alone

    for loss in ("dpo", "simpo"):
        kept, report = prepare_pairs(
            rows, tok, TrainConfig(loss=loss, pair_types=["r2w", "w2r"], max_length=MAX_LENGTH)
        )
        assert report["dropped"]["prompt_not_prefix"] == 1
        assert report["dropped"]["over_max_length"] == 1
        assert report["not_selected"] == {"dto": 6}
        assert report["num_pairs_used"] == len(kept) == 12
        assert report["num_realigned"] == 12
        for row in kept:
            # Only whole tokens moved: the text is unchanged, the prompt is now a token prefix of both sides.
            original = next(r for r in rows if r["pair_id"] == row["pair_id"])
            assert row["prompt"] + row["chosen"] == original["prompt"] + original["chosen"] + tok.eos_token
            assert row["prompt"] + row["rejected"] == original["prompt"] + original["rejected"] + tok.eos_token
            p = tok(row["prompt"])["input_ids"]
            assert tok(row["prompt"] + row["chosen"])["input_ids"][: len(p)] == p
            assert tok(row["prompt"] + row["rejected"])["input_ids"][: len(p)] == p
            assert row["num_tokens"] <= 2 * MAX_LENGTH


def test_keep_end_cuts_the_prompt_start_and_says_so(tiny_tokenizer):
    tok = tiny_tokenizer["tokenizer"]
    long_prompt = _prompt(2, 3).replace("Let me add the numbers.", "Let me add the numbers. " * 30)
    row = _pair(7, long_prompt, "Wait, 2+3=5.", "But 2+3=6.", "r2w", "p")
    cfg = TrainConfig(max_length=64, pair_types=["r2w"], truncation="drop")
    assert prepare_pairs([row], tok, cfg)[1]["dropped"]["over_max_length"] == 1
    kept, report = prepare_pairs([row], tok, cfg.model_copy(update={"truncation": "keep_end"}))
    assert report["num_cut_keep_end"] == 1 and len(kept) == 1
    (cut,) = kept
    # The start of the prompt is gone; the rest of the text, completion included, is untouched.
    assert (long_prompt + "Wait, 2+3=5." + tok.eos_token).endswith(cut["prompt"] + cut["chosen"])
    assert len(cut["prompt"]) < len(long_prompt) - 100
    assert len(tok(cut["prompt"] + cut["chosen"])["input_ids"]) <= 64


def test_a_bos_written_by_the_template_is_not_doubled(tiny_tokenizer):
    import copy

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    # A Llama-style tokenizer: encoding prepends BOS, and the chat template writes it into the text as well.
    backend = copy.deepcopy(tiny_tokenizer["tokenizer"].backend_tokenizer)
    bos = "<|endoftext|>"
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token="<|im_end|>", pad_token=bos)
    row = _pair(8, bos + _prompt(2, 3), "Wait, 2+3=5.", "But 2+3=6.", "r2w", "p")
    (kept,), report = prepare_pairs([row], tok, TrainConfig(pair_types=["r2w"], max_length=MAX_LENGTH))
    assert report["num_bos_deduplicated"] == 1
    ids = tok(kept["prompt"] + kept["chosen"])["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    # SimPO (CPOTrainer) encodes without special tokens and adds BOS only when missing: the text keeps its BOS.
    (kept,), report = prepare_pairs([row], tok, TrainConfig(loss="simpo", pair_types=["r2w"], max_length=MAX_LENGTH))
    assert report["num_bos_deduplicated"] == 0 and kept["prompt"].startswith(bos)


def test_split_is_deterministic_and_keeps_problems_together():
    rows = [{"pair_id": str(i), "problem_id": f"p{i % 40}"} for i in range(400)]
    train, evals = split_pairs(rows, 0.25)
    assert (train, evals) == split_pairs(list(rows), 0.25)
    assert {r["problem_id"] for r in train}.isdisjoint({r["problem_id"] for r in evals})
    assert 0 < len(evals) < len(rows)
    assert split_pairs(rows, 0.0) == (rows, [])


def test_launch_commands():
    job = Path("/runs/x/train/job.yaml")
    assert build_launch_command(job, TrainConfig(), python="py") == ["py", "-m", "ckptdpo.train", "--config", str(job)]
    torchrun = build_launch_command(job, TrainConfig(num_processes=2, zero_stage=2), python="py")
    assert torchrun[:7] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    acc = build_launch_command(job, TrainConfig(accelerate_config="z3.yaml", num_processes=8, bf16=True), python="py")
    assert acc[:5] == ["py", "-m", "accelerate.commands.launch", "--config_file", "z3.yaml"]
    assert acc[5:9] == ["--num_processes", "8", "--mixed_precision", "bf16"]
    assert acc[9:] == ["-m", "ckptdpo.train", "--config", str(job)]
    with pytest.raises(ValueError):
        TrainConfig(accelerate_config="z2.yaml", zero_stage=2)


def test_accelerate_recipes_are_valid_configs():
    import yaml

    folder = ROOT / "recipes" / "accelerate"
    zero2, zero3, cpu = (
        yaml.safe_load((folder / n).read_text()) for n in ("zero2.yaml", "zero3.yaml", "cpu_multi.yaml")
    )
    assert zero2["distributed_type"] == zero3["distributed_type"] == "DEEPSPEED"
    assert zero2["deepspeed_config"]["zero_stage"] == 2
    assert zero3["deepspeed_config"]["zero_stage"] == 3 and zero3["deepspeed_config"]["zero3_save_16bit_model"]
    # accelerate's MULTI_CPU type needs mpirun to start more than one process.
    assert cpu["distributed_type"] == "MULTI_GPU" and cpu["num_processes"] == 2


# --- training runs -------------------------------------------------------------------------------------------------


def _launch(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_zero2_dpo_on_two_cpu_ranks_resumes_after_a_kill(tiny, tmp_path):
    out = tmp_path / "train"
    cfg = tiny_train_config(num_processes=2, zero_stage=2, max_steps=4, save_steps=2)
    job = TrainJob(train=cfg, pairs_dirs=[str(tiny["pairs"])], model=str(tiny["model"]), output_dir=str(out))
    job_path = write_job(job.model_copy(update={"fail_after_step": 2}), tmp_path / "job.yaml")
    cmd = build_launch_command(job_path, cfg)
    assert "torch.distributed.run" in cmd

    # First attempt dies right after checkpoint-2 is on disk, like a job killed mid-run.
    first = _launch(cmd)
    assert first.returncode != 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"exitcode  : {FAULT_EXIT_CODE}" in first.stderr or "fault injection" in first.stderr + first.stdout
    assert latest_checkpoint(out) == out / "checkpoint-2"
    assert not (out / "summary.json").exists() and not (out / "checkpoint-4").exists()

    # The retry runs the same job and continues from that checkpoint.
    second = _launch(cmd)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == "checkpoint-2" and summary["start_step"] == 2
    assert summary["global_step"] == 4 and summary["steps_run"] == 2
    assert [s["step"] for s in summary["steps"]] == [1, 2, 3, 4]
    assert all(math.isfinite(s["loss"]) for s in summary["steps"])
    assert summary["steps"][-1]["rewards_margins"] is not None
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2
    ranks = summary["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["steps_run"] == 2 and r["deepspeed"] and r["backend"] == "gloo" for r in ranks)
    # Both ranks hold the same weights after the synchronized steps.
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-9)
    assert summary["pairs"]["num_train"] == 12 and summary["tokens"] > 0 and summary["tokens_per_s"] > 0
    _assert_all_changed(_weights(tiny["model"]), _weights(out / "model"))
    assert (out / "model" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_train_flow_simpo_lora_counts_drops_and_skips_when_done(prefect_harness, tiny, tmp_path, monkeypatch):
    import yaml

    from flows.stage import stage_flow

    # One thread for the tiny model: on a shared 2-core machine, spinning OpenMP threads make it 20x slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    run_dir = tmp_path / "run"
    (run_dir / "pairs").mkdir(parents=True)
    for f in tiny["pairs"].iterdir():
        (run_dir / "pairs" / f.name).write_bytes(f.read_bytes())
    recipe = tmp_path / "recipe.yaml"
    train = {
        "loss": "simpo",
        "pair_types": ["dto", "r2w", "w2r"],
        "lora": True,
        "lora_r": 4,
        "beta": 2.0,
        "gamma_beta_ratio": 0.5,
        "max_steps": 3,
        "save_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "max_length": MAX_LENGTH,
        "eval_fraction": 0.2,
        "group_by_length": True,
    }
    recipe.write_text(yaml.safe_dump({"name": "tiny", "backend": {"model": str(tiny["model"])}, "train": train}))

    summary = stage_flow("train", str(run_dir), str(recipe))
    assert summary["loss"] == "simpo" and summary["global_step"] == 3 and summary["lora"] and summary["merged"]
    assert summary["pairs"]["dropped"]["prompt_not_prefix"] == 1
    assert summary["pairs"]["dropped"]["over_max_length"] == 1
    assert summary["pairs"]["num_realigned"] == 18
    assert summary["pairs"]["num_train"] + summary["pairs"]["num_eval"] == 18 and summary["pairs"]["num_eval"] > 0
    assert "eval_loss" in summary["eval"]
    losses = [s["loss"] for s in summary["steps"]]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # Tokens are counted from the batches CPOTrainer saw (chosen and rejected padded to the longer), not estimated.
    padding = summary["padding"]
    assert [p["step"] for p in padding["per_step"]] == [1, 2, 3] and summary["group_by_length"]
    assert all(0 < p["real_tokens"] <= p["padded_tokens"] for p in padding["per_step"])
    assert summary["tokens"] == padding["real_tokens"] and not summary["tokens_estimated"]
    # The LoRA adapter is merged into a full safetensors model next to its tokenizer.
    _assert_all_changed(
        {k: v for k, v in _weights(tiny["model"]).items() if "proj" in k},
        {k: v for k, v in _weights(run_dir / "train" / "model").items() if "proj" in k},
    )
    stats = read_stats(run_dir)["train"]
    assert stats["global_step"] == 3 and stats["pairs"] == summary["pairs"]
    manifest = json.loads((run_dir / "train" / "_manifest.json").read_text())
    assert set(manifest["inputs"]) == {"pairs"}
    log = (run_dir / "train" / "train.log").read_text()
    assert "'rewards/margins'" in log

    # Same recipe again: the stage is done, nothing is retrained.
    before = (run_dir / "train" / "model" / "model.safetensors").stat().st_mtime_ns
    again = stage_flow("train", str(run_dir), str(recipe))
    assert again["global_step"] == 3
    assert (run_dir / "train" / "model" / "model.safetensors").stat().st_mtime_ns == before
    # TRL got the absolute SimPO margin gamma = gamma_beta_ratio * beta = 1.0: loss = log(1 + e^-(margin - gamma)).
    first_margin = summary["steps"][0]["rewards_margins"]
    assert losses[0] == pytest.approx(math.log1p(math.exp(-(first_margin - 0.5 * 2.0))), rel=0.05)

"""DPO at the real shape on one GPU through the project's training path: the standard path and shared prefixes.

    python benchmarks/gpu_train.py [--budget-s 270] [--steps 8] [--batch 2]   # on the GPU machine
    python benchmarks/gpu_train.py --tiny                                      # the same code on CPU, a tiny model

A random-initialized Qwen2 of the R1-Distill-Qwen-1.5B shape (hidden 1536, 28 layers, 12 heads, 2 KV heads,
intermediate 8960, vocabulary 151,936; sdpa, gradient checkpointing, bf16) trains DPO on pairs of 8,192 tokens per
sequence at a 60% prefix share: a prompt of 6,144 tokens and two completions of 2,048, so the prompt is 60% of the
pair's prompt + chosen + rejected tokens. Each run is `ckptdpo.train.run_job` in this process: the entry point's own
steps (pairs, arguments, datasets, trainer, training, summary), without writing `model/`. Runs, in this order, while
the budget lasts:

- today: the standard path with TRL's reference, loaded like the policy (float32): training as it was before;
- shared: `train.prefix_sharing`, the reference in bf16;
- standard: the standard path, the reference in bf16 (so shared/standard is the sharing alone);
- shared_liger: shared with Liger's kernels (RMSNorm, RoPE, SwiGLU), when liger-kernel is installed.

Prints JSON and writes `$OUT/gpu_train.json` when OUT is set (after every run, so a cut-off run leaves the finished
ones): per run the steady-state pairs/s, tokens/s (the pairs' two sequences), computed tokens/s (what the model
ran), MFU with its formula, peak GPU memory, start-up seconds and losses; the ratios between runs. Pairs come from
`train_prefix.make_tokenizer` (one word, one token), so no tokenizer files are needed.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from train_prefix import make_pairs, make_tokenizer, split_tokens, write_pairs  # noqa: E402

# R1-Distill-Qwen-1.5B's shape; --tiny shrinks it to run on a CPU in well under two minutes.
REAL = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
            intermediate_size=8960, vocab_size=151936, max_position_embeddings=131072, rope_theta=10000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=False)  # fmt: skip
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            max_position_embeddings=1024, tie_word_embeddings=False)  # fmt: skip
SHARE = 0.6
RUNS = ("today", "shared", "standard", "shared_liger")


def build_model(where: Path, tokenizer, tiny: bool) -> dict:
    """Save a random Qwen2 (bf16 weights) with the tokenizer; returns its shape."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = dict(TINY, vocab_size=len(tokenizer)) if tiny else REAL
    config = Qwen2Config(**shape, use_sliding_window=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(where)
    tokenizer.save_pretrained(where)
    del model
    return shape


def train_config(name: str, args, sequence: int):
    """The run's train section: the same pairs and steps for every run; what differs is in the name."""
    import torch

    from ckptdpo.configs import TrainConfig

    gpu = torch.cuda.is_available()
    return TrainConfig(
        pair_types=["r2w"],
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-6,
        max_length=sequence,
        eval_fraction=0.0,
        bf16=gpu,
        gradient_checkpointing=True,
        save_steps=100_000,  # no mid-run checkpoint: at 1.5B one holds ~21 GB of optimizer state
        prefix_sharing=name.startswith("shared"),
        use_liger_kernel=name == "shared_liger",
    )


def run_one(name: str, work: Path, pairs: Path, args, sequence: int) -> dict:
    """One training run in this process; the figures of its summary."""
    import torch

    from ckptdpo.train import TrainJob, run_job
    from ckptdpo.train import run as run_module

    cfg = train_config(name, args, sequence)
    job = TrainJob(train=cfg, pairs_dirs=[str(pairs)], model=str(work / "model"), output_dir=str(work / name))
    load_reference = run_module.load_reference
    if name == "today":  # TRL's own reference: a copy in the policy's dtype (float32 under bf16 autocast)
        run_module.load_reference = lambda job, args: None
    try:
        summary = run_job(job, started=time.monotonic(), save_model=False)
    finally:
        run_module.load_reference = load_reference
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    steady = summary["steady_state"] or {}
    return {
        "pairs_per_s": summary["pairs_per_s"],
        "tokens_per_s": summary["tokens_per_s"],
        "computed_tokens_per_s": summary["computed_tokens_per_s"],
        "seconds_per_step": steady.get("seconds_per_step"),
        "steady_steps": steady.get("num_steps"),
        "step_seconds": summary["timing"]["step_seconds"],
        "mfu": summary["mfu"],
        "peak_memory_gib": summary["peak_memory"]["bytes"] / 2**30,
        "peak_memory_kind": summary["peak_memory"]["kind"],
        "startup_s": summary["timing"]["startup_s"],
        "losses": [s["loss"] for s in summary["steps"]],
        "prefix_sharing": summary["prefix_sharing"],
        "prefix_sharing_off": summary["prefix_sharing_off"],
        "policy_dtype": summary["policy_dtype"],
        "reference_dtype": summary["reference_dtype"],
        "liger_kernel": summary["liger_kernel"],
        "computed_tokens": summary["computed_tokens"],
        "tokens": summary["tokens"],
    }


def ratios(runs: dict) -> dict:
    def ratio(a: str, b: str) -> float | None:
        x, y = runs.get(a, {}).get("pairs_per_s"), runs.get(b, {}).get("pairs_per_s")
        return x / y if x and y else None

    return {
        "shared_vs_today": ratio("shared", "today"),
        "shared_vs_standard": ratio("shared", "standard"),
        "standard_vs_today": ratio("standard", "today"),
        "shared_liger_vs_today": ratio("shared_liger", "today"),
        "shared_liger_vs_shared": ratio("shared_liger", "shared"),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budget-s", type=float, default=270.0, help="wall-clock limit of the whole script")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is warm-up)")
    p.add_argument("--batch", type=int, default=2, help="pairs per step")
    p.add_argument("--tiny", action="store_true", help="a tiny model on CPU: the same code, in under two minutes")
    args = p.parse_args()
    started = time.monotonic()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    sequence = 256 if args.tiny else 8192
    # prompt + completion = sequence, and the prompt is SHARE of prompt + chosen + rejected.
    prompt, completion = split_tokens(round(2 * sequence / (1 + SHARE)), SHARE)
    results: dict = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "tiny": args.tiny,
        "budget_s": args.budget_s,
        "pairs": {
            "sequence_tokens": sequence,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "prefix_share": prompt / (prompt + 2 * completion),
            "pairs_per_step": args.batch,
            "steps": args.steps,
        },
        "runs": {},
        "skipped": {},
        "complete": False,
    }
    out_file = Path(os.environ["OUT"]) / "gpu_train.json" if os.environ.get("OUT") else None

    def emit() -> None:
        results["elapsed_s"] = time.monotonic() - started
        results["ratios"] = ratios(results["runs"])
        text = json.dumps(results, indent=2)
        if out_file is not None:
            out_file.write_text(text)
        print(text, flush=True)

    def out_of_time(signum, frame) -> None:
        results["timed_out"] = True
        emit()
        os._exit(0)

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(int(args.budget_s))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer = make_tokenizer(work / "model")
        results["model"] = build_model(work / "model", tokenizer, args.tiny)
        rows = make_pairs(args.steps * args.batch, prompt, completion, seed=0)
        pairs = write_pairs(rows, work / "pairs")
        results["setup_s"] = time.monotonic() - started
        longest = 0.0
        for name in RUNS:
            left = args.budget_s - (time.monotonic() - started)
            if name == "shared_liger" and importlib.util.find_spec("liger_kernel") is None:
                results["skipped"][name] = "liger-kernel is not installed"
                continue
            if name == "shared_liger" and not torch.cuda.is_available():
                results["skipped"][name] = "Liger's kernels need a GPU"
                continue
            if longest * 1.2 > left:
                results["skipped"][name] = f"{left:.0f} s left, the longest run took {longest:.0f} s"
                continue
            begun = time.monotonic()
            try:
                results["runs"][name] = run_one(name, work, pairs, args, sequence + 8)
            except Exception as e:  # a failed run is reported, the others still run
                results["runs"][name] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"}
            results["runs"][name]["run_s"] = time.monotonic() - begun
            longest = max(longest, time.monotonic() - begun)
            emit()
    signal.alarm(0)
    results["complete"] = True
    emit()


if __name__ == "__main__":
    main()

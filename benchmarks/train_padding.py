"""Padding in DPO batches with and without `train.group_by_length`: real vs padded tokens per step and tokens/s.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_padding.py [--pairs 128] [--steps 6] [--batch 4]

DPOTrainer stacks each pair's chosen and rejected rows into one batch padded to the longest row, so a batch that
mixes a 40-token and a 400-token completion is mostly padding. Pairs here are synthetic with completion lengths
drawn log-uniform from 16 to 256 words (wrong R1-style trajectories are far longer than right ones), tokenized by
the demo model's real tokenizer; the policy is a small random Llama (2 layers, hidden 128) with that vocabulary, so
the run measures batching, not a model. Both settings train the same pairs through `python -m ckptdpo.train`, one
after the other in one run; the figures come from each run's summary.json (`padding`, `tokens_per_s`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckptdpo.configs import TrainConfig  # noqa: E402
from ckptdpo.schemas import PAIRS, make_table  # noqa: E402
from ckptdpo.shards import content_id, write_manifest, write_shard  # noqa: E402
from ckptdpo.train import TrainJob, build_launch_command, write_job  # noqa: E402

WORDS = "so the sum is then we get x equals wait let me check again the area of the triangle is".split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def make_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = f"<|im_start|>user\nProblem {i}: {_text(rng, 20)}<|im_end|>\n<|im_start|>assistant\n"
        lengths = [int(math.exp(rng.uniform(math.log(16), math.log(256)))) for _ in range(2)]
        chosen, rejected = (f"{_text(rng, k)} \\boxed{{{i}}}" for k in lengths)
        # Only what training reads is set; the lineage columns stay empty.
        pair = dict.fromkeys(PAIRS.names) | {"pair_id": content_id("bench", i), "pair_type": "r2w"}
        rows.append(pair | {"problem_id": f"p{i}", "prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def make_model(tokenizer_dir: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    from ckptdpo.models import save_random_llama

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    save_random_llama(tok, out, hidden_size=128, intermediate_size=256, max_positions=1024)
    tok.save_pretrained(out)


def run(work: Path, model: Path, pairs: Path, group: bool, args) -> dict:
    cfg = TrainConfig(
        pair_types=["r2w"],
        max_steps=args.steps,
        save_steps=10_000,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-4,
        max_length=512,
        eval_fraction=0.0,
        group_by_length=group,
    )
    out = work / f"train-{'grouped' if group else 'plain'}"
    job = TrainJob(train=cfg, pairs_dirs=[str(pairs)], model=str(model), output_dir=str(out))
    cmd = build_launch_command(write_job(job, work / f"{out.name}.yaml"), cfg)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    from ckptdpo.models import pull_demo

    tokenizer_dir = pull_demo(Path(os.environ.get("CKPTDPO_HOME", Path.home() / ".cache" / "ckptdpo")).expanduser())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_model(tokenizer_dir, work / "model")
        write_shard(work / "pairs", 0, make_table(make_pairs(args.pairs, seed=0), PAIRS))
        write_manifest(work / "pairs", config_hash="bench")
        results = {group: run(work, work / "model", work / "pairs", group, args) for group in (False, True)}
    print(
        f"cores {os.cpu_count()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, {args.pairs} pairs, "
        f"{args.steps} steps of {args.batch} pairs"
    )
    print("group_by_length | real tokens | padded tokens | padding | train s | real tokens/s")
    for group, s in results.items():
        pad = s["padding"]
        print(
            f"{group!s:>15} | {pad['real_tokens']:>11} | {pad['padded_tokens']:>13} | "
            f"{pad['padding_fraction']:>7.1%} | {s['train_runtime_s']:>7.1f} | {s['tokens_per_s']:>13.0f}"
        )
    plain, grouped = results[False], results[True]
    ratio = plain["padding"]["padded_tokens"] / grouped["padding"]["padded_tokens"]
    speed = grouped["tokens_per_s"] / plain["tokens_per_s"]
    print(f"padded tokens plain/grouped: {ratio:.2f}x; real tokens/s grouped/plain: {speed:.2f}x")


if __name__ == "__main__":
    main()

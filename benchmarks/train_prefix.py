"""Shared-prefix DPO vs the standard path on the same pairs, at prefix shares of 30%, 60% and 90% of a pair's tokens.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_prefix.py [--pair-tokens 1024] [--steps 5] [--batch 2]

A checkpoint pair's prompt (problem plus trajectory prefix) is most of its tokens. TRL's DPO computes it twice for
the policy and twice for the reference; `train.prefix_sharing` packs `[prompt | chosen | rejected]` into one row.
Pairs here are synthetic with exact token counts: a tokenizer built here (one word, one token), a prompt of
`share * pair_tokens` words and two completions of the rest split evenly, so the standard path computes
`(1 + share) * pair_tokens` tokens per pair and the shared path `pair_tokens`. The policy is a random Llama (4 layers,
hidden 256, vocabulary 2,143). Each share trains the same pairs through `python -m ckptdpo.train` four times,
standard, shared, shared, standard (so a load change on a shared machine hits both paths alike); the figures come
from each run's `summary.json`: pairs/s from the median step time over the steps after each run's first (start-up,
logging and saves apart), in wall-clock time and in the process's CPU time (one thread: on a machine other work
shares, wall time measures the load as much as the work), the tokens the model computed, the process's peak RSS,
and each step's loss (the two paths must agree).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckptdpo.configs import TrainConfig  # noqa: E402
from ckptdpo.schemas import PAIRS, make_table  # noqa: E402
from ckptdpo.shards import content_id, write_manifest, write_shard  # noqa: E402
from ckptdpo.train import TrainJob, build_launch_command, write_job  # noqa: E402

SHARES = (0.3, 0.6, 0.9)
# Every word of one to three of these letters is one token of the tokenizer built here: 1,884 words.
LETTERS = "abcdefghijkl"
WORDS = ["".join(w) for n in (1, 2, 3) for w in itertools.product(LETTERS, repeat=n)]


def make_tokenizer(out: Path):
    """A byte-level BPE whose vocabulary is the bytes, ChatML markers and " " + each of WORDS, saved to `out`.

    Each word preceded by a space is exactly one token, under this tokenizer and under the ones transformers
    rebuilds from its files for a model type (Qwen2's, for one), so pairs have exact token counts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate([*specials, *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    merges = []
    for word in WORDS:  # "Ġab" + "c" -> "Ġabc", after "Ġa" + "b" -> "Ġab" (shorter words come first)
        merges.append(("Ġ" + word[:-1], word[-1]))
        vocab["Ġ" + word] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    tok.save_pretrained(out)
    return tok


def make_pairs(n: int, prompt_tokens: int, completion_tokens: int, seed: int) -> list[dict]:
    """Pair rows whose prompt is `prompt_tokens` tokens and each completion `completion_tokens` (EOS included)."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return "".join(" " + rng.choice(WORDS) for _ in range(k))

    rows = []
    for i in range(n):
        # <|im_start|> problem <|im_end|> \n <|im_start|> prefix: 4 tokens of markup.
        problem = max(prompt_tokens // 10, 1)
        prompt = f"<|im_start|>{text(problem)}<|im_end|>\n<|im_start|>{text(prompt_tokens - problem - 4)}"
        chosen, rejected = (text(completion_tokens - 1) for _ in range(2))
        pair = dict.fromkeys(PAIRS.names) | {"pair_id": content_id("bench", i), "pair_type": "r2w"}
        rows.append(pair | {"problem_id": f"p{i}", "prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def split_tokens(pair_tokens: int, share: float) -> tuple[int, int]:
    """(prompt tokens, tokens of each completion) of a pair of `pair_tokens` with the given prefix share."""
    prompt = round(share * pair_tokens)
    return prompt, (pair_tokens - prompt) // 2


def write_pairs(rows: list[dict], where: Path) -> Path:
    write_shard(where, 0, make_table(rows, PAIRS))
    write_manifest(where, config_hash="bench")
    return where


def run(work: Path, pairs: Path, cfg: TrainConfig, attempt: int) -> dict:
    """One training run through `python -m ckptdpo.train`; its summary."""
    out = work / f"{pairs.name}-{'shared' if cfg.prefix_sharing else 'standard'}-{attempt}"
    job = TrainJob(train=cfg, pairs_dirs=[str(pairs)], model=str(work / "model"), output_dir=str(out))
    cmd = build_launch_command(write_job(job, out.with_suffix(".yaml")), cfg)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stdout[-2000:] + done.stderr[-3000:])
    return json.loads((out / "summary.json").read_text())


def figures(runs: list[dict], batch: int) -> dict:
    """One path's figures over its runs: pairs per second from the median steady step (wall clock, and the
    process's CPU time, which other work on the machine does not inflate), what the model computed, peak RSS."""
    steady = [t for s in runs for t in s["timing"]["step_seconds"][1:]]
    steady_cpu = [t for s in runs for t in s["timing"]["step_cpu_seconds"][1:]]
    first = runs[0]
    return {
        "pairs_per_s": batch / statistics.median(steady),
        "pairs_per_cpu_s": batch / statistics.median(steady_cpu),
        "pairs_per_s_each_run": [s["pairs_per_s"] for s in runs],
        "computed_tokens": first["computed_tokens"],
        "tokens": first["tokens"],
        "peak_rss_mb": max(s["peak_memory"]["bytes"] for s in runs) / 2**20,
        "losses": [step["loss"] for step in first["steps"]],
        "steady_steps": len(steady),
    }


def compare(work: Path, share: float, args) -> dict:
    """Standard and shared runs on the same pairs of one prefix share, interleaved."""
    prompt, completion = split_tokens(args.pair_tokens, share)
    pairs = make_pairs(args.steps * args.batch, prompt, completion, seed=int(share * 100))
    where = write_pairs(pairs, work / f"pairs-{share}")
    cfg = TrainConfig(pair_types=["r2w"], max_steps=args.steps, save_steps=10_000, learning_rate=1e-4,
                      per_device_train_batch_size=args.batch, max_length=args.pair_tokens,
                      eval_fraction=0.0)  # fmt: skip
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for attempt, shared in enumerate((False, True, True, False)):
        summary = run(work, where, cfg.model_copy(update={"prefix_sharing": shared}), attempt)
        assert summary["prefix_sharing"] == shared and summary["pairs"]["num_pairs_used"] == len(pairs)
        runs[shared].append(summary)
    std, sh = figures(runs[False], args.batch), figures(runs[True], args.batch)
    diff = max(abs(a - b) for a, b in zip(std["losses"], sh["losses"], strict=True))
    return {"share": share, "prompt_tokens": prompt, "completion_tokens": completion, "standard": std, "shared": sh,
            "speedup": sh["pairs_per_s"] / std["pairs_per_s"],
            "speedup_cpu_time": sh["pairs_per_cpu_s"] / std["pairs_per_cpu_s"], "max_loss_diff": diff}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pair-tokens", type=int, default=1024, help="prompt + chosen + rejected tokens of a pair")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    from ckptdpo.models import save_random_llama

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = make_tokenizer(work / "model")
        save_random_llama(tok, work / "model", hidden_size=256, intermediate_size=1024, layers=4, heads=4, kv_heads=2,
                          max_positions=2 * args.pair_tokens)  # fmt: skip
        for share in SHARES:
            results.append(compare(work, share, args))
            print(json.dumps(results[-1]), flush=True)
    load = os.getloadavg()
    print(f"\ncores {os.cpu_count()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, load average "
          f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at the end, {args.pair_tokens} tokens a pair, "
          f"{args.steps} steps of {args.batch} pairs, 2 runs a path")  # fmt: skip
    print("share | path | pairs/s | pairs per CPU s | computed tokens | peak RSS MB | speedup (wall, CPU) | "
          "max abs loss diff")  # fmt: skip
    for r in results:
        for path in ("standard", "shared"):
            f = r[path]
            speed = f"{r['speedup']:.2f}x, {r['speedup_cpu_time']:.2f}x" if path == "shared" else ""
            diff = f"{r['max_loss_diff']:.1e}" if path == "shared" else ""
            print(f"{r['share']:.0%} | {path} | {f['pairs_per_s']:.3f} | {f['pairs_per_cpu_s']:.3f} | "
                  f"{f['computed_tokens']:,} | {f['peak_rss_mb']:.0f} | {speed} | {diff}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

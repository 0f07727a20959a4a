"""Throughput of the hf backend against `model.generate`, and the saving from sharing one prefill across n samples.

1. Overhead: the same chat prompts and settings through `HFBackend.generate` and through `model.generate` on a
   left-padded batch; tokens/s counts generated tokens up to and including EOS. Greedy decoding gives both exactly
   the same tokens, so it compares the cost of the same work; top-p sampling is shown as well. Goal: overhead <= 5%.
2. Shared prefill: n continuations of one P-token prefix. The backend computes the prefix once and indexes its KV
   cache out to n rows; `model.generate(num_return_sequences=n)` prefills n copies. Prompt tokens computed are
   counted by a hook on the model's forward (every call with more than one position is a prefill). Goal: >= 3x fewer.

Usage: python benchmarks/generate_throughput.py [--batch 16] [--max-new 64] [--reps 3] [--prefix 1000] [--n 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from ckptdpo.backends.base import GenerationRequest
from ckptdpo.backends.hf import HFBackend
from ckptdpo.configs import backend_config

QUESTIONS = [
    "What is 17 * 23?",
    "A train travels 120 km in 1.5 hours. What is its average speed?",
    "Simplify (x^2 - 9) / (x - 3).",
    "How many prime numbers are there below 30?",
    "What is the sum of the interior angles of a hexagon?",
    "Solve 3x + 7 = 22.",
    "If a rectangle has perimeter 30 and width 5, what is its area?",
    "What is 2 to the power 10?",
    "Convert 0.375 to a fraction.",
    "What is the greatest common divisor of 84 and 126?",
    "A shirt costs $40 after a 20% discount. What was the original price?",
    "How many ways can 4 books be arranged on a shelf?",
    "What is the square root of 1764?",
    "Find the next number: 2, 6, 12, 20, 30, ...",
    "What is 15% of 260?",
    "How many edges does a cube have?",
]


class PrefillCounter:
    """Counts tokens fed to the model in forward calls with more than one position (prefills)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.tokens = 0
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] > 1:
            mask = kwargs.get("attention_mask")
            # Only real tokens count: with one unpadded prompt the mask is all ones anyway.
            self.tokens += int(mask[:, -ids.shape[-1] :].sum()) if mask is not None else ids.numel()

    def close(self) -> None:
        self._handle.remove()


def generated_tokens(rows: torch.Tensor, eos_ids: frozenset[int]) -> int:
    """Tokens up to and including the first EOS per row (what the backend counts)."""
    total = 0
    for row in rows.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        total += end
    return total


def run_backend(backend: HFBackend, prompts: list[str], max_new: int, temperature: float, top_p: float):
    reqs = [
        GenerationRequest(p, n=1, seed=i, max_tokens=max_new, temperature=temperature, top_p=top_p)
        for i, p in enumerate(prompts)
    ]
    start = time.perf_counter()
    results = backend.generate(reqs)
    wall = time.perf_counter() - start
    return sum(s.num_tokens for r in results for s in r.samples), wall


@torch.inference_mode()
def run_generate(backend: HFBackend, prompts: list[str], max_new: int, temperature: float, top_p: float):
    tok, model = backend.tokenizer, backend.model
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = dict(max_new_tokens=max_new, pad_token_id=backend.pad_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False)
    torch.manual_seed(0)
    start = time.perf_counter()
    out = model.generate(**batch, **kwargs)
    wall = time.perf_counter() - start
    return generated_tokens(out[:, batch.input_ids.shape[1] :], backend.eos_ids), wall


def overhead(backend: HFBackend, args: argparse.Namespace) -> None:
    prompts = [backend.chat_prompt(q) for q in (QUESTIONS * 8)[: args.batch]]
    print(f"\n## overhead: {len(prompts)} prompts, max_new {args.max_new}, {args.reps} rep(s), alternating")
    # A shared machine adds noise of tens of percent: the best run of each side is the steadier figure.
    print(f"{'mode':<22}{'hf backend tok/s':>18}{'model.generate tok/s':>22}{'overhead':>10}  (median / best)")
    for name, temperature, top_p in (("greedy", 0.0, 1.0), ("sample t=0.7 p=0.95", 0.7, 0.95)):
        ours, theirs = [], []
        tok_ours = tok_theirs = 0
        for _ in range(args.reps):
            tok_ours, wall = run_backend(backend, prompts, args.max_new, temperature, top_p)
            ours.append(tok_ours / wall)
            tok_theirs, wall = run_generate(backend, prompts, args.max_new, temperature, top_p)
            theirs.append(tok_theirs / wall)
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"{name:<22}{a:>18.1f}{b:>22.1f}{(b - a) / b:>10.1%}  median   (tokens {tok_ours} vs {tok_theirs})")
        a, b = max(ours), max(theirs)
        print(f"{'':<22}{a:>18.1f}{b:>22.1f}{(b - a) / b:>10.1%}  best")


@torch.inference_mode()
def shared_prefill(backend: HFBackend, args: argparse.Namespace) -> None:
    tok, model = backend.tokenizer, backend.model
    filler = " ".join(f"Step {i}: add {i * 7 % 13} to the running total." for i in range(400))
    head = tok(backend.chat_prompt(filler), add_special_tokens=False).input_ids
    prefix = tuple(head[: args.prefix])
    n, max_new = args.n, args.prefix_new
    print(f"\n## shared prefill: n = {n} continuations of a {len(prefix)}-token prefix, {max_new} new tokens each")

    counter = PrefillCounter(model)
    before = backend.stats.prompt_tokens_computed
    start = time.perf_counter()
    (res,) = backend.generate(
        [GenerationRequest(prefix, n=n, seed=0, max_tokens=max_new, temperature=0.7, top_p=0.95)]
    )
    ours_wall = time.perf_counter() - start
    ours_stats = backend.stats.prompt_tokens_computed - before
    ours_hook, counter.tokens = counter.tokens, 0
    ours_new = sum(s.num_tokens for s in res.samples)

    ids = torch.tensor([prefix])
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        do_sample=True,
        temperature=0.7,
        top_p=0.95,
        num_return_sequences=n,
        pad_token_id=backend.pad_id,
    )
    theirs_wall = time.perf_counter() - start
    theirs_hook = counter.tokens
    counter.close()
    theirs_new = generated_tokens(out[:, len(prefix) :], backend.eos_ids)

    print(f"{'':<24}{'prompt tokens computed':>24}{'wall s':>10}{'new tokens':>12}")
    print(f"{'hf backend (shared)':<24}{ours_hook:>24}{ours_wall:>10.2f}{ours_new:>12}   (stats: {ours_stats})")
    print(f"{'model.generate (n copies)':<24}{theirs_hook:>24}{theirs_wall:>10.2f}{theirs_new:>12}")
    print(f"prompt tokens: {theirs_hook / max(ours_hook, 1):.1f}x fewer; wall: {theirs_wall / ours_wall:.2f}x faster")


def main(args: argparse.Namespace) -> None:
    home = Path(os.environ.get("CKPTDPO_HOME", Path.home() / ".cache" / "ckptdpo")).expanduser()
    backend = HFBackend(backend_config(kind="hf", model=args.model, device=args.device), home=home)
    print(
        f"model {args.model} ({backend.revision}) on {backend.device}, "
        f"{os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}"
    )
    # One small warm-up so first-call costs (allocations, lazy init) land in neither column.
    run_backend(backend, [backend.chat_prompt("Hi")], 4, 0.0, 1.0)
    run_generate(backend, [backend.chat_prompt("Hi")], 4, 0.0, 1.0)
    if not args.skip_overhead:
        overhead(backend, args)
    if not args.skip_prefill:
        shared_prefill(backend, args)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=16, help="prompts in the overhead comparison")
    p.add_argument("--max-new", type=int, default=64, help="new tokens per prompt in the overhead comparison")
    p.add_argument("--reps", type=int, default=3, help="repetitions per mode (median reported)")
    p.add_argument("--prefix", type=int, default=1000, help="prefix length in tokens for the shared-prefill test")
    p.add_argument("--n", type=int, default=8, help="continuations of the prefix")
    p.add_argument("--prefix-new", type=int, default=32, help="new tokens per continuation")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-prefill", action="store_true")
    return p


if __name__ == "__main__":
    main(make_parser().parse_args())

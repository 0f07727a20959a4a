"""Throughput of the hf backend against `model.generate`, its per-step costs, and the saving from a shared prefill.

Side by side in one run:

1. Tiny model (random Llama, 2 layers, hidden 32, a made-up 512-token vocabulary: compute is negligible, so a step
   costs its bookkeeping): backend vs `model.generate` at 16, 64 and 512 rows, and per decode step at 512 rows the
   time outside the model's forward, split into sampling and the rest (per-row Python, the host's checks).
2. Context: time per decode step outside the forward at 16 rows and a 1k, 16k, 32k-token prompt (tiny model): it
   must not grow with the context (no quadratic bookkeeping). A control row runs the 1k prompt with as many bytes
   read after each forward as the 32k KV cache: a long context's forward evicts the CPU caches, which slows the
   work after it whatever that work is.
3. Demo model (SmolLM2-135M-Instruct, float32): backend vs `model.generate` at 16, 64 and 512 rows, greedy (both
   give the same tokens: the cost of the same work) and sampled (t 0.7, top-p 0.95).
4. Shared prefill: n continuations of one P-token prefix. The backend computes the prefix once and indexes its KV
   cache out to n rows; `model.generate(num_return_sequences=n)` prefills n copies. Prompt tokens computed are
   counted by a hook on the model's forward (every call with more than one position is a prefill). Goal: >= 3x fewer.

Tokens/s counts generated tokens up to and including EOS. Each comparison alternates the two sides `--reps` times and
reports the best of each (a shared machine adds noise of tens of percent). The script uses nothing that older
versions of the backend lack, so it measures them too (before/after).

Usage: python benchmarks/generate_throughput.py [--parts tiny,context,demo,prefill] [--rows 16,64,512] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ckptdpo.backends.base import GenerationRequest
from ckptdpo.backends.hf import HFBackend
from ckptdpo.backends.sampling import SamplingParams
from ckptdpo.configs import backend_config
from ckptdpo.models import save_random_llama

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
SAMPLED = {"temperature": 0.7, "top_p": 0.95}
GREEDY = {"temperature": 0.0, "top_p": 1.0}


# --- models ------------------------------------------------------------------------------------------------------


def synthetic_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of exactly `vocab_size` ids and no merges: text encodes byte by byte, and every id
    decodes to text (the 256 bytes, a paragraph break, made-up words, 3 special tokens), so a random model's
    samples detokenize like a real model's. Built in memory: no files to carry to another machine."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["ĊĊ"] = len(vocab)  # "\n\n" in the byte-level alphabet
    rng = random.Random(0)
    while len(vocab) < vocab_size - len(specials):
        word = "Ġ" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        vocab.setdefault(word, len(vocab))  # "Ġ": a leading space
    for s in specials:
        vocab[s] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:2],
    )


def tiny_backend(max_positions: int, **settings) -> HFBackend:
    """The hf backend around a random 2-layer Llama (hidden 32) over `synthetic_tokenizer(512)`, whose forward costs
    next to nothing on a CPU; weights drawn wide (initializer_range 1.0) so that its next-token distributions are
    peaked like a trained model's (at t 0.7, top-p 0.95 the nucleus holds 3 tokens on average)."""
    tokenizer = synthetic_tokenizer(512)
    with tempfile.TemporaryDirectory() as tmp:
        save_random_llama(
            tokenizer, Path(tmp), hidden_size=32, intermediate_size=64, max_positions=max_positions,
            initializer_range=1.0, bos_token_id=None,
        )  # fmt: skip
        tokenizer.save_pretrained(tmp)
        return HFBackend(backend_config(kind="hf", model=tmp, device="cpu", **settings), home=Path(tmp))


# --- measuring ---------------------------------------------------------------------------------------------------


class StepClock:
    """Times a model's forward calls and the backend's sampler: decode steps (one new position) apart from prefills.

    Outside-forward time per step = (span of the decode steps - their forward time) / steps: sampling, the step's
    tensor bookkeeping and the host's per-row work, without the prefill or the set-up before the first step.
    """

    def __init__(self, model, sweep_bytes: int = 0) -> None:
        self.model = model
        self.calls: list[tuple[float, float]] = []
        self.sampling = 0.0
        self.samplings = 0
        self._forward = model.forward
        # Read after each forward, inside its time (see context_part).
        self._sweep = torch.ones(sweep_bytes // 4) if sweep_bytes else None

    def _timed_forward(self, *args, **kwargs):
        start = time.perf_counter()
        out = self._forward(*args, **kwargs)
        if self._sweep is not None:
            self._sweep.sum()
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] == 1:
            self.calls.append((start, time.perf_counter()))
        return out

    @contextmanager
    def running(self):
        real_sample = SamplingParams.sample

        def timed_sample(params, *args, **kwargs):
            start = time.perf_counter()
            picked = real_sample(params, *args, **kwargs)
            self.sampling += time.perf_counter() - start
            self.samplings += 1
            return picked

        self.calls, self.sampling, self.samplings = [], 0.0, 0
        self.model.forward = self._timed_forward
        SamplingParams.sample = timed_sample
        try:
            yield self
        finally:
            self.model.forward = self._forward
            SamplingParams.sample = real_sample

    def per_step_ms(self) -> dict[str, float]:
        """Per decode step: forward, outside the forward, and of that sampling and the rest (milliseconds)."""
        steps = len(self.calls)
        if steps < 2:
            return {"steps": steps}
        span = self.calls[-1][1] - self.calls[0][0]
        forward = sum(end - start for start, end in self.calls)
        outside = (span - forward) / (steps - 1)
        sampling = self.sampling / max(self.samplings, 1)
        return {
            "steps": steps,
            "forward_ms": 1000 * forward / steps,
            "outside_ms": 1000 * outside,
            "sampling_ms": 1000 * sampling,
            "rest_ms": 1000 * (outside - sampling),
        }


def requests_for(prompts: list[str], max_new: int, mode: dict) -> list[GenerationRequest]:
    return [GenerationRequest(p, n=1, seed=i, max_tokens=max_new, **mode) for i, p in enumerate(prompts)]


def run_backend(backend: HFBackend, prompts: list[str], max_new: int, mode: dict) -> tuple[int, float]:
    start = time.perf_counter()
    results = backend.generate(requests_for(prompts, max_new, mode))
    wall = time.perf_counter() - start
    return sum(s.num_tokens for r in results for s in r.samples), wall


def generated_tokens(rows: torch.Tensor, eos_ids: frozenset[int]) -> int:
    """Tokens up to and including the first EOS per row (what the backend counts)."""
    total = 0
    for row in rows.tolist():
        total += next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
    return total


@torch.inference_mode()
def run_generate(backend: HFBackend, prompts: list[str], max_new: int, mode: dict) -> tuple[int, float]:
    tok, model = backend.tokenizer, backend.model
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(backend.device)
    kwargs = dict(max_new_tokens=max_new, pad_token_id=backend.pad_id)
    if mode["temperature"] > 0:
        kwargs.update(do_sample=True, temperature=mode["temperature"], top_p=mode["top_p"], top_k=0)
    else:
        kwargs.update(do_sample=False)
    torch.manual_seed(0)
    start = time.perf_counter()
    out = model.generate(**batch, **kwargs)
    if backend.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return generated_tokens(out[:, batch.input_ids.shape[1] :], backend.eos_ids), wall


def compare(backend: HFBackend, prompts: list[str], max_new: int, mode: dict, reps: int) -> dict[str, float]:
    """Best tokens/s of the backend and of `model.generate` over `reps` alternating runs."""
    ours = theirs = 0.0
    for _ in range(reps):
        n, wall = run_backend(backend, prompts, max_new, mode)
        ours = max(ours, n / wall)
        n, wall = run_generate(backend, prompts, max_new, mode)
        theirs = max(theirs, n / wall)
    return {"backend_tok_s": ours, "generate_tok_s": theirs, "ratio": ours / theirs}


def print_comparison(label: str, rows: int, max_new: int, mode_name: str, r: dict[str, float]) -> None:
    print(
        f"{label:<6}{rows:>6}{max_new:>8}  {mode_name:<8}{r['backend_tok_s']:>12.0f}{r['generate_tok_s']:>12.0f}"
        f"{r['ratio']:>8.2f}x",
        flush=True,
    )


# --- the parts ---------------------------------------------------------------------------------------------------


def tiny_part(args: argparse.Namespace) -> None:
    backend = tiny_backend(1024, **batch_settings(args))
    prompts = [f"Question {i}: what is {i} plus {2 * i}?\n\n" for i in range(max(args.rows))]
    run_backend(backend, prompts[:4], 4, SAMPLED)  # warm-up: first-call costs land in neither column
    run_generate(backend, prompts[:4], 4, SAMPLED)
    print(f"\n## tiny model: backend vs model.generate, {args.tiny_new} new tokens, best of {args.reps}")
    print(f"{'model':<6}{'rows':>6}{'new':>8}  {'mode':<8}{'backend':>12}{'generate':>12}{'ratio':>9}")
    for rows in args.rows:
        for name, mode in (("greedy", GREEDY), ("sampled", SAMPLED)):
            print_comparison(
                "tiny", rows, args.tiny_new, name, compare(backend, prompts[:rows], args.tiny_new, mode, args.reps)
            )
    rows = max(args.rows)
    print(f"\n## tiny model: per decode step at {rows} rows (ms; best of {args.reps} runs by outside time)")
    for name, mode in (("greedy", GREEDY), ("sampled", SAMPLED)):
        best = min((step_costs(backend, prompts[:rows], args.tiny_new, mode) for _ in range(args.reps)),
                   key=lambda r: r["outside_ms"])  # fmt: skip
        print(f"{name:<8}" + "  ".join(f"{k} {v:.2f}" for k, v in best.items() if k != "steps"), flush=True)


def step_costs(backend: HFBackend, prompts: list[str], max_new: int, mode: dict) -> dict[str, float]:
    clock = StepClock(backend.model)
    with clock.running():
        run_backend(backend, prompts, max_new, mode)
    return clock.per_step_ms()


def context_part(args: argparse.Namespace) -> None:
    """Outside-forward time per step at each context, and at the shortest one again with as many bytes swept
    through the memory caches after each forward as the longest context's KV cache: a long context's forward
    evicts the caches, which slows whatever runs after it, bookkeeping or not; the control tells the two apart."""
    contexts = args.contexts
    backend = tiny_backend(max(contexts) + 1024, **batch_settings(args))
    cfg = backend.model.config
    kv_bytes = 2 * cfg.num_hidden_layers * 16 * cfg.num_key_value_heads * cfg.head_dim * max(contexts) * 4
    rng = random.Random(1)
    print(f"\n## context: 16 rows (n = 16 of one prompt), greedy, {args.context_new} new tokens, tiny model (ms/step)")
    print(f"{'context':>24}{'forward':>10}{'outside':>10}{'sampling':>10}{'rest':>10}")
    results = {}
    control = f"{min(contexts)} + {kv_bytes / 1e6:.0f} MB swept"
    runs = [(c, c, 0) for c in contexts] + [(control, min(contexts), kv_bytes)]
    for name, context, sweep in runs:
        prompt = tuple(rng.randrange(256) for _ in range(context))
        req = GenerationRequest(prompt, n=16, seed=0, max_tokens=args.context_new, temperature=0.0)
        best = None
        for _ in range(args.reps):
            clock = StepClock(backend.model, sweep_bytes=sweep)
            with clock.running():
                backend.generate([req])
            r = clock.per_step_ms()
            best = r if best is None or r["outside_ms"] < best["outside_ms"] else best
        results[name] = best
        print(
            f"{name:>24}{best['forward_ms']:>10.2f}{best['outside_ms']:>10.2f}{best['sampling_ms']:>10.2f}"
            f"{best['rest_ms']:>10.2f}",
            flush=True,
        )
    low, high, swept = results[min(contexts)], results[max(contexts)], results[control]
    print(
        f"outside the forward at {max(contexts)} / at {min(contexts)}: {high['outside_ms'] / low['outside_ms']:.2f}x; "
        f"/ at {min(contexts)} with the sweep: {high['outside_ms'] / swept['outside_ms']:.2f}x"
    )


def demo_part(args: argparse.Namespace) -> None:
    home = Path(os.environ.get("CKPTDPO_HOME", Path.home() / ".cache" / "ckptdpo")).expanduser()
    backend = HFBackend(
        backend_config(kind="hf", model=args.model, device=args.device, **batch_settings(args)), home=home
    )
    print(f"\n## demo model {args.model} ({backend.revision}) on {backend.device}: backend vs model.generate")
    print(f"{'model':<6}{'rows':>6}{'new':>8}  {'mode':<8}{'backend':>12}{'generate':>12}{'ratio':>9}")
    run_backend(backend, [backend.chat_prompt("Hi")], 4, GREEDY)
    run_generate(backend, [backend.chat_prompt("Hi")], 4, GREEDY)
    for rows, max_new in zip(args.rows, args.demo_new, strict=True):
        # Every row its own prompt (the backend would prefill a repeated prompt once): chat prompts at 16 rows, bare
        # numbered questions beyond, so that 512 rows' prefill stays within minutes on a CPU.
        questions = [f"Problem {i}: {QUESTIONS[i % len(QUESTIONS)]}" for i in range(rows)]
        prompts = [backend.chat_prompt(q) for q in QUESTIONS] if rows == len(QUESTIONS) else questions
        for name, mode in (("greedy", GREEDY), ("sampled", SAMPLED)):
            print_comparison("demo", rows, max_new, name, compare(backend, prompts, max_new, mode, args.demo_reps))


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


@torch.inference_mode()
def prefill_part(args: argparse.Namespace) -> None:
    home = Path(os.environ.get("CKPTDPO_HOME", Path.home() / ".cache" / "ckptdpo")).expanduser()
    backend = HFBackend(backend_config(kind="hf", model=args.model, device=args.device), home=home)
    tok, model = backend.tokenizer, backend.model
    filler = " ".join(f"Step {i}: add {i * 7 % 13} to the running total." for i in range(400))
    head = tok(backend.chat_prompt(filler), add_special_tokens=False).input_ids
    prefix = tuple(head[: args.prefix])
    n, max_new = args.n, args.prefix_new
    print(f"\n## shared prefill: n = {n} continuations of a {len(prefix)}-token prefix, {max_new} new tokens each")

    counter = PrefillCounter(model)
    before = backend.stats.prompt_tokens_computed
    start = time.perf_counter()
    (res,) = backend.generate([GenerationRequest(prefix, n=n, seed=0, max_tokens=max_new, **SAMPLED)])
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
        num_return_sequences=n,
        pad_token_id=backend.pad_id,
        **SAMPLED,
    )
    theirs_wall = time.perf_counter() - start
    theirs_hook = counter.tokens
    counter.close()
    theirs_new = generated_tokens(out[:, len(prefix) :], backend.eos_ids)

    print(f"{'':<24}{'prompt tokens computed':>24}{'wall s':>10}{'new tokens':>12}")
    print(f"{'hf backend (shared)':<24}{ours_hook:>24}{ours_wall:>10.2f}{ours_new:>12}   (stats: {ours_stats})")
    print(f"{'model.generate (n copies)':<24}{theirs_hook:>24}{theirs_wall:>10.2f}{theirs_new:>12}")
    print(f"prompt tokens: {theirs_hook / max(ours_hook, 1):.1f}x fewer; wall: {theirs_wall / ours_wall:.2f}x faster")


def batch_settings(args: argparse.Namespace) -> dict:
    """One batch for every row count measured, and the thread count."""
    return {"max_batch_size": max(args.rows), "batch_token_budget": 1 << 30, "threads": args.threads}


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"{os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}, load average {load[0]:.2f}")
    parts = {"tiny": tiny_part, "context": context_part, "demo": demo_part, "prefill": prefill_part}
    for name in args.parts:
        parts[name](args)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


def make_parser() -> argparse.ArgumentParser:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", type=lambda s: s.split(","), default=["tiny", "context", "demo", "prefill"])
    p.add_argument("--model", default="demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the demo recipe's setting)")
    p.add_argument("--rows", type=ints, default=[16, 64, 512], help="batch sizes compared with model.generate")
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions per tiny-model measurement")
    p.add_argument("--tiny-new", type=int, default=128, help="new tokens per row, tiny model")
    p.add_argument("--contexts", type=ints, default=[1024, 16384, 32768], help="prompt lengths of the context part")
    p.add_argument("--context-new", type=int, default=128, help="new tokens per row in the context part")
    p.add_argument("--demo-new", type=ints, default=[32, 16, 4], help="new tokens per row for each of --rows, demo")
    p.add_argument("--demo-reps", type=int, default=2, help="alternating repetitions per demo measurement")
    p.add_argument("--prefix", type=int, default=1000, help="prefix length in tokens for the shared-prefill test")
    p.add_argument("--n", type=int, default=8, help="continuations of the prefix")
    p.add_argument("--prefix-new", type=int, default=32, help="new tokens per continuation")
    return p


if __name__ == "__main__":
    main(make_parser().parse_args())

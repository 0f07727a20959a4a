"""CPU decoding against the memory-bandwidth bound: how close the hf backend gets, and which settings win.

A decode step reads every weight once (the tied embedding / LM head matrix included) plus each row's KV cache, so
its floor is bytes read / memory bandwidth. Measured side by side in one run:

1. Memory bandwidth: a read (torch sum over a 1 GiB float32 tensor) and a copy (torch and numpy), 1 and 2 threads.
2. The demo model's bytes read per decode step: parameter bytes per dtype, KV bytes per row and context token.
3. Decode tokens/s: the bare model (forward + argmax with a DynamicCache, nothing else) and the hf backend
   (`HFBackend.generate`, n sampled rows of one short prompt, tokens counted per row) for each dtype, thread count
   and batch size, next to the bound for that shape: batch x read bandwidth / (weights + batch x KV bytes).

    python benchmarks/decode_bound.py [--steps 48] [--batches 1,4,16] [--threads 1,2] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from ckptdpo.backends import decode
from ckptdpo.backends.base import GenerationRequest
from ckptdpo.backends.decode import cache_arg
from ckptdpo.backends.hf import HFBackend
from ckptdpo.configs import backend_config
from ckptdpo.models import pull_demo

GIB = 1 << 30


def best_of(fn, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bandwidth(threads: int) -> dict[str, float]:
    """GB/s (1e9 bytes/s) of a read and of a copy (read + write counted) over 1 GiB."""
    torch.set_num_threads(threads)
    a = torch.ones(GIB // 4, dtype=torch.float32)
    b = torch.empty_like(a)
    read = best_of(lambda: a.sum())
    copy = best_of(lambda: b.copy_(a))
    out = {"read": GIB / read / 1e9, "copy": 2 * GIB / copy / 1e9}
    if threads == 1:  # numpy's copy is single-threaded
        na, nb = a.numpy(), b.numpy()
        out["numpy_copy"] = 2 * GIB / best_of(lambda: np.copyto(nb, na)) / 1e9
    return out


def step_bytes(model, context: int) -> tuple[int, int]:
    """(weight bytes read per step, KV bytes read per row at `context` tokens)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights are listed once
    cfg = model.config
    elem = next(model.parameters()).element_size()
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context * elem
    return weights, kv


@torch.inference_mode()
def model_rate(model, prompt: list[int], batch: int, steps: int) -> float:
    """Decode tokens/s of the bare model: forward with a DynamicCache and argmax, nothing else."""
    from transformers import DynamicCache

    def run() -> None:
        cache = DynamicCache(config=model.config)
        ids = torch.tensor([prompt] * batch)
        out = model(input_ids=ids, **cache_arg(model, cache), use_cache=True, logits_to_keep=1)
        pos = len(prompt)
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            pos_ids = torch.full_like(nxt, pos)
            out = model(input_ids=nxt, **cache_arg(model, cache), use_cache=True, position_ids=pos_ids)
            pos += 1
        run.elapsed = time.perf_counter() - t0

    best = min(_timed(run) for _ in range(2))
    return batch * steps / best


def _timed(run) -> float:
    run()
    return run.elapsed


def backend_rate(backend: HFBackend, prompt: list[int], batch: int, steps: int) -> float:
    """Tokens/s of `HFBackend.generate` for `batch` sampled rows of one prompt (prefill included: it is short)."""
    # A row that ends early (EOS) counts only its own tokens, so the figure is never inflated by early stops.
    req = GenerationRequest(tuple(prompt), n=batch, seed=3, max_tokens=steps, temperature=1.0)
    best = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        (res,) = backend.generate([req])
        wall = time.perf_counter() - t0
        best = max(best, sum(s.num_tokens for s in res.samples) / wall)
    return best


def long_context(model_dir: Path, home: Path, context: int, batch: int, steps: int) -> None:
    """Backend tokens/s at a long prefix with the KV cache reserved (written in place) and with transformers'
    DynamicLayer (torch.cat of the whole cache every step), alternated twice in one run."""
    cfg = backend_config(kind="hf", model=str(model_dir), device="cpu", threads=1).model_copy(
        update={"loop_guard": False}
    )
    backend = HFBackend(cfg, home=home)
    words = " ".join(["the sum of the terms and check each case carefully again"] * (context // 10))
    ids = backend.tokenizer(words, add_special_tokens=False).input_ids[:context]
    req = GenerationRequest(tuple(ids), n=batch, seed=1, max_tokens=steps, temperature=0.0)
    real_reserve = decode.reserve
    rates: dict[str, list[float]] = {"reserved": [], "cat": []}
    try:
        for _ in range(2):
            for name in rates:
                decode.reserve = real_reserve if name == "reserved" else _select_only
                t0 = time.perf_counter()
                (res,) = backend.generate([req])
                rates[name].append(sum(s.num_tokens for s in res.samples) / (time.perf_counter() - t0))
    finally:
        decode.reserve = real_reserve
    r, c = max(rates["reserved"]), max(rates["cat"])
    print(f"long context {context} tokens x {batch} rows, {steps} steps (prefill included), float32, 1 thread:")
    print(f"  KV reserved {r:.1f} tok/s, DynamicLayer cat {c:.1f} tok/s: {r / c:.2f}x")
    backend.close()


def _select_only(cache, extra: int, rows=None) -> None:
    """`decode.reserve` without the reservation: the rows are picked and the layers stay DynamicLayers (torch.cat)."""
    if rows is not None:
        cache.batch_select_indices(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--long", default="1500,8,16", help="context,batch,steps of the long-context run ('' to skip)")
    args = p.parse_args()
    threads = [int(x) for x in args.threads.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    print(f"cores: {os.cpu_count()}, load average at start: {os.getloadavg()[0]:.2f}")
    bw = {t: bandwidth(t) for t in threads}
    for t, r in bw.items():
        print(f"bandwidth, {t} thread(s): " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in r.items()))
    home = Path(os.environ.get("CKPTDPO_HOME", Path.home() / ".cache" / "ckptdpo"))
    model_dir = pull_demo(home)
    head = ("dtype", "thr", "batch", "MB/step", "bound tok/s", "model tok/s", "share", "backend tok/s", "share")
    print(" ".join(f"{h:>13}" for h in head))
    for dtype in args.dtypes.split(","):
        for t in threads:
            cfg = backend_config(kind="hf", model=str(model_dir), device="cpu", dtype=dtype, threads=t)
            cfg = cfg.model_copy(update={"loop_guard": False})
            backend = HFBackend(cfg, home=home)
            text = backend.chat_prompt("Write a long story about a cat.")
            prompt = backend.tokenizer(text, add_special_tokens=False).input_ids
            for b in batches:
                weights, kv = step_bytes(backend.model, len(prompt) + args.steps // 2)
                bound = b * bw[t]["read"] * 1e9 / (weights + b * kv)
                m = model_rate(backend.model, prompt, b, args.steps)
                g = backend_rate(backend, prompt, b, args.steps)
                mb = f"{(weights + b * kv) / 1e6:.0f}"
                row = (dtype, t, b, mb, f"{bound:.1f}", f"{m:.1f}", f"{m / bound:.0%}", f"{g:.1f}", f"{g / bound:.0%}")
                print(" ".join(f"{x:>13}" for x in row), flush=True)
            backend.close()
    if args.long:
        long_context(model_dir, home, *[int(x) for x in args.long.split(",")])
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

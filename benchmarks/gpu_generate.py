"""The hf backend against `model.generate` on one GPU, with and without `backend.compile`, within a time budget.

The model is a random-initialised Qwen2 of DeepSeek-R1-Distill-Qwen-1.5B's shape (hidden 1536, 28 layers, 12 heads,
2 KV heads, intermediate 8960, vocabulary 151936, bfloat16, sdpa), built here on the GPU; the tokenizer is made up in
memory (`generate_throughput.synthetic_tokenizer`: every id decodes to text), so nothing has to be downloaded or
carried. Prompts are short questions, one request per row, sampled at the R1 setting (t 0.6, top-p 0.95).

Measured, in this order, each printed as one JSON object (and all written to $OUT/gpu_generate.json when OUT is set):

1. 512 rows x 128 new tokens: backend (no compile) vs `model.generate` (goal: >= 1.0x).
2. 64 rows x 128 new tokens: backend (no compile) vs `model.generate`.
3. 64 rows x 128 new tokens: backend with `compile: true` (static KV cache, torch.compile with CUDA graphs) vs the
   `model.generate` figure of 2 (goal: >= 3x); the first run compiles and is timed apart.
4. If time is left: 512 rows greedy, backend vs `model.generate`.

Each figure carries tokens/s, time per step and the HBM figure (weight bytes read per step / step time). A
measurement that would not fit in what is left of `--budget-s` is skipped (reported as skipped). `--tiny` runs the same
code on a CPU with a tiny random Qwen2 in under a minute, to check the script.

    python benchmarks/gpu_generate.py [--budget-s 190] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ckptdpo, when run from a bare checkout

import torch  # noqa: E402
from generate_throughput import GREEDY, run_backend, run_generate, synthetic_tokenizer  # noqa: E402

from ckptdpo.backends.hf import HFBackend  # noqa: E402
from ckptdpo.configs import backend_config  # noqa: E402

R1_SHAPE = dict(
    hidden_size=1536,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    intermediate_size=8960,
    vocab_size=151936,
    max_position_embeddings=131072,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=False,
)
TINY_SHAPE = {
    **R1_SHAPE,
    "hidden_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 2048,
    "max_position_embeddings": 4096,
}
R1_SAMPLING = {"temperature": 0.6, "top_p": 0.95}
H200_HBM_GB_S = 4800.0


def build(shape: dict, device: torch.device, dtype: torch.dtype):
    """A random Qwen2 of `shape` on `device`, and a made-up tokenizer of its vocabulary size."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    tokenizer = synthetic_tokenizer(shape["vocab_size"])
    cfg = Qwen2Config(
        **shape,
        use_sliding_window=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), tokenizer


def make_backend(model, tokenizer, device: torch.device, rows: int, compile_: bool) -> HFBackend:
    cfg = backend_config(
        kind="hf",
        model="random-r1-shape",
        device=device.type,
        dtype="bfloat16" if device.type == "cuda" else "float32",
        max_batch_size=rows,
        batch_token_budget=1 << 30,
        compile=compile_,
    )
    return HFBackend.from_model(cfg, model, tokenizer, revision="random")


class Report:
    """Prints one JSON object per measurement and keeps them for $OUT/gpu_generate.json."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.rows: list[dict] = []

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def add(self, row: dict) -> None:
        """Print the row and rewrite the file with every row so far (a run stopped from outside keeps them)."""
        row = {**row, "elapsed_s": round(time.perf_counter() - self.start, 1)}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        out = os.environ.get("OUT")
        if out:
            Path(out, "gpu_generate.json").write_text(json.dumps(self.rows, indent=1) + "\n")


def figures(tokens: int, wall: float, steps: int, weight_bytes: int) -> dict:
    """Tokens/s, wall time per step (prefill included) and the weight bytes read per second at that step time."""
    step_s = wall / steps
    hbm = weight_bytes / step_s / 1e9
    return {
        "tok_s": round(tokens / wall, 1),
        "step_ms": round(1000 * step_s, 2),
        "hbm_gb_s": round(hbm, 1),
        "hbm_share": round(hbm / H200_HBM_GB_S, 4),  # of an H200's 4.8 TB/s
    }


def compare(report: Report, backend: HFBackend, prompts: list[str], new: int, mode: dict, name: str, **extra) -> dict:
    """Backend then `model.generate` on the same prompts (each after a short warm-up), one JSON line."""
    weight_bytes = sum(p.numel() * p.element_size() for p in backend.model.parameters())
    run_backend(backend, prompts[:2], 2, mode)
    tokens, wall = run_backend(backend, prompts, new, mode)
    ours = figures(tokens, wall, new, weight_bytes)
    run_generate(backend, prompts[:2], 2, mode)
    tokens, wall = run_generate(backend, prompts, new, mode)
    theirs = figures(tokens, wall, new, weight_bytes)
    row = {
        "measurement": name,
        "rows": len(prompts),
        "new_tokens": new,
        "mode": mode,
        "backend": ours,
        "generate": theirs,
        "ratio": round(ours["tok_s"] / theirs["tok_s"], 3),
        "weights_gb": round(weight_bytes / 1e9, 3),
        **extra,
    }
    report.add(row)
    return row


def main(args: argparse.Namespace) -> None:
    device = torch.device("cpu" if args.tiny else "cuda")
    if args.tiny:
        torch.set_num_threads(1)  # steadier on a small shared CPU; the figures there only show that the script runs
    report = Report(args.budget_s)
    rows_big, rows_small, new = (64, 16, 32) if args.tiny else (512, 64, 128)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model, tokenizer = build(TINY_SHAPE if args.tiny else R1_SHAPE, device, dtype)
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "params": sum(p.numel() for p in model.parameters()),
    }
    report.add({"measurement": "setup", **info})
    prompts = [f"Question {i}: what is {i} times {i + 3}, minus {2 * i}?" for i in range(rows_big)]

    # A measurement is skipped when the one before it, scaled, would not fit in the time left.
    plain = make_backend(model, tokenizer, device, rows_big, compile_=False)
    first = time.perf_counter()
    compare(report, plain, prompts, new, R1_SAMPLING, f"{rows_big} rows, no compile")
    big_s = time.perf_counter() - first

    small = prompts[:rows_small]
    baseline = None
    if report.left() > big_s / 2:
        baseline = compare(report, plain, small, new, R1_SAMPLING, f"{rows_small} rows, no compile")
    else:
        report.add({"measurement": f"{rows_small} rows, no compile", "skipped": "budget"})

    if baseline is not None and report.left() > args.compile_estimate_s:
        compiled = make_backend(model, tokenizer, device, rows_small, compile_=True)
        start = time.perf_counter()
        run_backend(compiled, small, new, R1_SAMPLING)  # compiles, records the CUDA graphs
        first_run_s = time.perf_counter() - start
        run_backend(compiled, small, new, R1_SAMPLING)
        tokens, wall = run_backend(compiled, small, new, R1_SAMPLING)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        ours = figures(tokens, wall, new, weight_bytes)
        status = compiled.compile_status()
        report.add(
            {
                "measurement": f"{rows_small} rows, compile",
                "rows": rows_small,
                "new_tokens": new,
                "mode": R1_SAMPLING,
                "backend": ours,
                "generate": baseline["generate"],
                "ratio": round(ours["tok_s"] / baseline["generate"]["tok_s"], 3),
                "first_run_s": round(first_run_s, 1),
                "compiled": status["failure"] is None and status["compiled_steps"] > 0,
                "compile_failure": status["failure"],
            }
        )
    else:
        report.add({"measurement": f"{rows_small} rows, compile", "skipped": "budget"})

    if report.left() > 1.2 * big_s:
        compare(report, plain, prompts, new, GREEDY, f"{rows_big} rows, no compile, greedy")
    else:
        report.add({"measurement": f"{rows_big} rows, no compile, greedy", "skipped": "budget"})
    report.add({"measurement": "done", "left_s": round(report.left(), 1)})


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=190.0, help="stop measuring before this many seconds")
    p.add_argument("--compile-estimate-s", type=float, default=100.0, help="time left needed to try compile")
    p.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU (checks the script)")
    return p


if __name__ == "__main__":
    main(make_parser().parse_args())

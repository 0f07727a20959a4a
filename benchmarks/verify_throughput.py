"""Verdicts per second of `verify_batch` against a plain serial math-verify loop, and its worst per-item latency.

    .venv/bin/python benchmarks/verify_throughput.py [--items 2000] [--samples-per-problem 8] [--adversarial 0.01]
        [--timeout-s 5] [--workers N] [--paragraphs 12] [--seed 0]

Completions are R1-style (seeded): `<think>`, reasoning paragraphs with inline math, some opening with "Wait,", "But"
or "Alternatively,", `</think>`, a short summary and a boxed final answer in one of several equivalent or wrong
formats (fractions as \\frac, \\dfrac, a/b or decimals; thousands separators; tuples, intervals, sets; radicals;
multiples of pi; text; polynomials). `--samples-per-problem` completions share a problem, as n samples per prompt do,
so equal (gold, extracted) pairs recur and the verdict cache counts; `--samples-per-problem 1` measures the pool
alone. A fraction `--adversarial` of them end in a box known to hang math-verify or in a megabyte of text.

Two serial baselines run in the main thread over the same non-adversarial items, with math-verify's own
(signal-based) timeouts:
  - full: `verify(parse(gold), parse(completion))`, what a plain loop over completions does;
  - box:  the same, but parsing only the extracted `\\boxed{...}`, the work a worker does per item.
`verify_batch` runs on the same items (warm pool, empty verdict cache), then on everything including the
adversarial items; the worst per-item latency is the longest time an item spent in a worker. CPU seconds are printed
beside wall seconds because on a machine shared with other work the wall-clock ratio says little about the pool.
Goal: >= 1.7x the serial loop on 2 cores; worst <= timeout + 1 s.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckptdpo import verify as V  # noqa: E402

REASONING = [
    "Let me set up the problem. We have $x + y = {a}$ and $xy = {b}$, so $x^2 + y^2 = (x+y)^2 - 2xy = {c}$.",
    "So the area of the triangle is $\\frac{{1}}{{2}} \\cdot {a} \\cdot {b} = {c}$, assuming the height is right.",
    "Then substituting back, we get $y = 3x - {a}$, which gives the point $({b}, {c})$ on the line.",
    "The number of ways to choose the committee is $\\binom{{{a}}}{{3}} = {c}$ if order does not matter.",
    "Hmm, the discriminant is $b^2 - 4ac = {a}^2 - 4 \\cdot {b} = {c}$, so there are two real roots.",
    "Now I need to check whether this value satisfies the original constraint $x \\le {a}$.",
    "Let me recompute: ${a} \\times {b} = {c}$. Yes, that matches what I had before.",
    "The sum of the interior angles is $180^\\circ$, so the third angle is $180 - {a} - {b} = {c}$ degrees.",
    "Using the formula for an arithmetic series, $S_n = \\frac{{n}}{{2}}(a_1 + a_n)$ with $n = {a}$ gives {c}.",
    "I think the key observation is that the expression is symmetric in $x$ and $y$, so let $s = x + y = {a}$.",
]
OPENINGS = ["Wait, ", "But ", "Alternatively, ", "Hmm, ", "So ", "", "", ""]


def answer_kinds(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """(gold, equivalent forms, wrong forms) for one random problem."""
    kind = rng.randrange(10)
    if kind == 0:
        n = rng.randrange(1_000, 5_000_000)
        return str(n), [str(n), f"{n:,}", f"{n}.0"], [str(n + rng.randrange(1, 999)), f"{n // 10:,}"]
    if kind == 1:
        p, q = rng.choice([(1, 2), (3, 4), (5, 8), (7, 20), (1, 3), (2, 7), (11, 6)])
        forms = [f"\\frac{{{p}}}{{{q}}}", f"\\dfrac{{{p}}}{{{q}}}", f"{p}/{q}"]
        if q in (2, 4, 8, 20):
            forms.append(str(p / q))
        return f"\\frac{{{p}}}{{{q}}}", forms, [f"\\frac{{{q}}}{{{p}}}", f"\\frac{{{p}}}{{{q + 1}}}"]
    if kind == 2:
        a, b = rng.randrange(2, 9), rng.choice([2, 3, 5, 7])
        return f"{a}\\sqrt{{{b}}}", [f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b}}}"], [f"{a + 1}\\sqrt{{{b}}}"]
    if kind == 3:
        a, b = rng.randrange(-9, 9), rng.randrange(-9, 9)
        return f"({a}, {b})", [f"({a},{b})", f"\\left({a}, {b}\\right)"], [f"({b}, {a + 1})"]
    if kind == 4:
        a = rng.randrange(-9, 5)
        b = a + rng.randrange(1, 9)
        return f"[{a}, {b})", [f"[{a},{b})", f"\\left[{a}, {b}\\right)"], [f"[{a},{b}]", f"({a},{b})"]
    if kind == 5:
        xs = rng.sample(range(1, 20), 3)
        perm = rng.sample(xs, 3)
        return (
            "\\{" + ", ".join(map(str, xs)) + "\\}",
            ["\\{" + ",".join(map(str, perm)) + "\\}"],
            ["\\{" + ",".join(map(str, xs[:2])) + "\\}"],
        )
    if kind == 6:
        k = rng.choice([2, 3, 4, 6])
        return f"\\frac{{\\pi}}{{{k}}}", [f"\\frac{{\\pi}}{{{k}}}", f"\\pi/{k}", f"\\dfrac{{\\pi}}{{{k}}}"], ["\\pi"]
    if kind == 7:
        day = rng.choice(["Monday", "Tuesday", "Friday", "Sunday"])
        return f"\\text{{{day}}}", [f"\\text{{{day}}}", day], ["\\text{Saturday}"]
    if kind == 8:
        a = rng.randrange(1, 9)
        return f"x^2 + {2 * a}x + {a * a}", [f"(x+{a})^2", f"x^2+{2 * a}x+{a * a}"], [f"(x+{a + 1})^2"]
    n = rng.randrange(2, 200)
    return str(n), [str(n), f"{n}"], [str(n + 1), str(n - 1)]


def make_completion(rng: random.Random, answer: str, paragraphs: int) -> str:
    parts = []
    for _ in range(max(1, int(rng.gauss(paragraphs, paragraphs / 3)))):
        sentences = [
            s.format(a=rng.randrange(2, 99), b=rng.randrange(2, 99), c=rng.randrange(2, 9999))
            for s in rng.sample(REASONING, rng.randrange(2, 5))
        ]
        parts.append(rng.choice(OPENINGS) + " ".join(sentences))
    think = "\n\n".join(parts)
    summary = (
        "**Solution.** Following the reasoning above, we compute the requested quantity step by step and "
        "check it against the constraints.\n\n**Final Answer**\n"
    )
    box = rng.choice(
        [f"\\[\n\\boxed{{{answer}}}\n\\]", f"$\\boxed{{{answer}}}$", f"The answer is $\\boxed{{{answer}}}$."]
    )
    return f"<think>\n{think}\n</think>\n\n{summary}{box}"


def adversarial_completions(rng: random.Random, paragraphs: int) -> list[str]:
    pre = make_completion(rng, "0", paragraphs).rsplit("**Final Answer**", 1)[0]
    return [
        pre + "\\boxed{9^{9^{9^{9^{9}}}}}",
        pre + "\\boxed{10^{10^{10}}}",
        pre + "\\boxed{(10^{6})!}",
        pre + "\\boxed{" + "(" * 10_000 + "1" + ")" * 10_000 + "}",
        "Wait, let me reconsider the whole setup. " * 25_000 + "\\boxed{9^{9^{9^{9}}}}",  # ~1 MB
        "Wait, let me reconsider the whole setup. " * 25_000,  # ~1 MB, no box
    ]


def build(args: argparse.Namespace) -> tuple[list[tuple[str, str]], list[bool]]:
    rng = random.Random(args.seed)
    items: list[tuple[str, str]] = []
    adversarial: list[bool] = []
    adv_pool = adversarial_completions(rng, args.paragraphs)
    while len(items) < args.items:
        gold, good, bad = answer_kinds(rng)
        # Per-problem difficulty, so some problems are mostly right and others mostly wrong.
        p_correct = rng.random()
        for _ in range(args.samples_per_problem):
            if len(items) >= args.items:
                break
            if rng.random() < args.adversarial:
                items.append((gold, rng.choice(adv_pool)))
                adversarial.append(True)
                continue
            answer = rng.choice(good) if rng.random() < p_correct else rng.choice(bad)
            items.append((gold, make_completion(rng, answer, args.paragraphs)))
            adversarial.append(False)
    return items, adversarial


def clear_math_verify_caches() -> None:
    from math_verify import parser

    for name in ("parse_latex_cached", "parse_expr_cached"):
        getattr(parser, name).cache_clear()


def worker_cpu_seconds() -> float:
    """CPU seconds used so far by the live pool workers (Linux /proc), to compare work done apart from machine load."""
    total = 0
    for w in V._POOL.workers if V._POOL else []:
        try:
            with open(f"/proc/{w.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def serial_loop(items: list[tuple[str, str]], box_only: bool) -> tuple[float, float, list[bool]]:
    from math_verify import parse, verify

    clear_math_verify_caches()
    out = []
    c0 = time.process_time()
    t0 = time.perf_counter()
    for gold, completion in items:
        gold_parsed = parse("\\boxed{" + gold + "}")
        if box_only:
            boxed = V.extract_answer(completion)
            pred = parse("\\boxed{" + boxed + "}") if boxed is not None else parse(completion[-1000:])
        else:
            pred = parse(completion)
        out.append(bool(verify(gold_parsed, pred)))
    return time.perf_counter() - t0, time.process_time() - c0, out


def timed_batch(items: list[tuple[str, str]], args: argparse.Namespace) -> tuple[float, float, list, list[float]]:
    """Wall seconds, CPU seconds (parent + workers; exact only when no worker is killed), verdicts, latencies."""
    V.clear_cache()
    c0 = time.process_time() + worker_cpu_seconds()
    t0 = time.perf_counter()
    verdicts, latency = V.verify_batch_timed(items, timeout_s=args.timeout_s, workers=args.workers)
    wall = time.perf_counter() - t0
    return wall, time.process_time() + worker_cpu_seconds() - c0, verdicts, latency


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--samples-per-problem", type=int, default=8)
    p.add_argument("--adversarial", type=float, default=0.01, help="fraction of adversarial completions")
    p.add_argument("--paragraphs", type=int, default=12, help="mean reasoning paragraphs per completion")
    p.add_argument("--timeout-s", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=None, help="default: CPU count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-full", action="store_true", help="skip the (slow) full-completion serial baseline")
    args = p.parse_args(argv)
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)

    items, adversarial = build(args)
    normal = [it for it, adv in zip(items, adversarial, strict=True) if not adv]
    sizes = [len(c) for _, c in normal]
    unique = len({(g, V.extract_answer(c)) for g, c in normal})
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"{len(items)} completions ({len(normal)} normal, {sum(adversarial)} adversarial), "
        f"mean {sum(sizes) / len(sizes) / 1000:.1f} KB, {unique} distinct (gold, extracted) among the normal; "
        f"{cores} cores, workers={args.workers or cores}, timeout {args.timeout_s:g} s"
    )

    t0 = time.perf_counter()
    V.verify_batch([("1", "\\boxed{1}")], timeout_s=args.timeout_s, workers=args.workers)
    print(f"pool start (fork server + {args.workers or cores} workers): {time.perf_counter() - t0:.2f} s")
    # Workers and the main process both warm up (ANTLR's DFA, sympy's caches) on other problems first, so that
    # what is measured is a steady state for both.
    warm_args = argparse.Namespace(**{**vars(args), "items": 200, "seed": args.seed + 1, "adversarial": 0.0})
    warm_items = build(warm_args)[0]
    V.verify_batch(warm_items, timeout_s=args.timeout_s, workers=args.workers)
    serial_loop(warm_items, box_only=True)

    box_s, box_cpu, box_ok = serial_loop(normal, box_only=True)
    print(
        f"serial loop, boxed answer only: {box_s:7.2f} s  {len(normal) / box_s:8.1f} verdicts/s  cpu {box_cpu:6.2f} s"
    )
    if not args.skip_full:
        full_s, full_cpu, full_ok = serial_loop(normal, box_only=False)
        print(
            f"serial loop, full completion:   {full_s:7.2f} s  {len(normal) / full_s:8.1f} verdicts/s  "
            f"cpu {full_cpu:6.2f} s"
        )

    pool_s, pool_cpu, verdicts, latency = timed_batch(normal, args)
    pool_ok = [v.status == "correct" for v in verdicts]
    print(
        f"verify_batch, same items:       {pool_s:7.2f} s  {len(normal) / pool_s:8.1f} verdicts/s  "
        f"cpu {pool_cpu:6.2f} s (parent + workers)"
    )
    print(f"  speedup vs serial (boxed):  {box_s / pool_s:5.2f}x  cpu seconds, serial/pool: {box_cpu / pool_cpu:.2f}")
    if not args.skip_full:
        print(f"  speedup vs serial (full):   {full_s / pool_s:5.2f}x")
        agree = sum(a == b for a, b in zip(pool_ok, full_ok, strict=True)) / len(normal)
        print(f"  agreement with the full serial loop: {agree:.1%}")
    agree_box = sum(a == b for a, b in zip(pool_ok, box_ok, strict=True)) / len(normal)
    print(f"  agreement with the boxed serial loop: {agree_box:.1%}")

    all_s, _, verdicts, latency = timed_batch(items, args)
    counts = collections.Counter(v.status for v in verdicts)
    worst = max(latency)
    print(f"verify_batch, all items:        {all_s:7.2f} s  {len(items) / all_s:8.1f} verdicts/s  {dict(counts)}")
    goal = "ok" if worst <= args.timeout_s + 1.0 else "OVER"
    print(f"  worst per-item latency: {worst:.2f} s (limit {args.timeout_s + 1.0:.2f} s: {goal})")
    V.shutdown_pool()
    return 0


if __name__ == "__main__":
    sys.exit(main())

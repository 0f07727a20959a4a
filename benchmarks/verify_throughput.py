"""Verdicts per second of `verify_batch` against open-r1's way of verifying, and 10,000 adversarial rows.

    .venv/bin/python benchmarks/verify_throughput.py [--items 2000] [--samples-per-problem 8] [--timeout-s 5]
        [--adversarial-rows 10000] [--adversarial-timeout-s 1] [--hangs 20] [--open-r1-cap-s 60] [--workers N]

Normal items: R1-style completions (seeded): `<think>`, reasoning paragraphs with inline math, some opening with
"Wait,", "But" or "Alternatively,", `</think>`, a short summary and a boxed final answer in one of several equivalent
or wrong formats (fractions as \\frac, \\dfrac, a/b or decimals; thousands separators; tuples, intervals, sets;
radicals; multiples of pi; text; polynomials). `--samples-per-problem` completions share a problem, as n samples per
prompt do, so equal (gold, answer) pairs recur and the verdict cache counts.

open-r1's way: its `accuracy_reward` (src/open_r1/rewards.py): math-verify `parse(gold)`, `parse(completion)` with a
LaTeX extraction config that tries boxes first, then `verify`, in process, one item after another, relying on
math-verify's own signal-based timeouts. It runs on the same normal items; then, in a subprocess stopped after
`--open-r1-cap-s`, on the adversarial rows (a C-level big-integer power cannot be interrupted by its signals).

Adversarial rows (`--adversarial-rows`, each unique, so no cache helps): exponent towers, huge factorials, `\\frac`
nested 3,000 deep, 10,000 nested parentheses, `\\sqrt` nested 2,000 deep, megabyte completions ending in a tower, and
megabyte completions without a box, verified with `--adversarial-timeout-s` (goal: all 10,000 in under 60 s on 2
cores, every item back within timeout + 1 s, the pool still working afterwards). `--hangs` answers within the
complexity budget that still hang sympy show the other path: a worker killed at the deadline and replaced.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckptdpo import verify as V  # noqa: E402
from ckptdpo.verify.budget import over_budget  # noqa: E402

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


def build(args: argparse.Namespace) -> list[tuple[str, str]]:
    rng = random.Random(args.seed)
    items: list[tuple[str, str]] = []
    while len(items) < args.items:
        gold, good, bad = answer_kinds(rng)
        # Per-problem difficulty, so some problems are mostly right and others mostly wrong.
        p_correct = rng.random()
        for _ in range(min(args.samples_per_problem, args.items - len(items))):
            answer = rng.choice(good) if rng.random() < p_correct else rng.choice(bad)
            items.append((gold, make_completion(rng, answer, args.paragraphs)))
    return items


MEGABYTE = "Wait, let me reconsider the whole setup. " * 25_000  # ~1 MB
ADVERSARIAL_KINDS = ("tower", "factorial", "frac 3000", "parens 10000", "sqrt 2000", "megabyte tower", "megabyte")


def adversarial_row(rng: random.Random, k: int) -> tuple[str, str]:
    """Row k of the adversarial set: (gold, completion); every row differs, so no verdict comes from the cache."""
    kind = ADVERSARIAL_KINDS[k % len(ADVERSARIAL_KINDS)]
    n = rng.randrange(10**6)
    a, b, c, d = (rng.randrange(2, 10) for _ in range(4))
    tower = f"{a}^{{{b}^{{{c}^{{{d}^{{{n}}}}}}}}}"
    pre = f"<think>\nLet me try case {n}.\n\nWait, that gives a huge number.\n</think>\n\n**Final Answer**\n"
    if kind == "tower":
        return str(n), pre + f"\\boxed{{{tower}}}"
    if kind == "factorial":
        return str(n), pre + f"\\boxed{{({n + 10}^{{6}})!}}"
    if kind == "frac 3000":
        return str(n), pre + "\\boxed{" + "\\frac{" * 3_000 + str(n) + "}{2}" * 3_000 + "}"
    if kind == "parens 10000":
        return str(n), pre + "\\boxed{" + "(" * 10_000 + str(n) + ")" * 10_000 + "}"
    if kind == "sqrt 2000":
        return str(n), pre + "\\boxed{" + "\\sqrt{" * 2_000 + str(n) + "}" * 2_000 + "}"
    if kind == "megabyte tower":
        return str(n), MEGABYTE + f"</think>\\boxed{{{tower}}}"
    return str(n), MEGABYTE + f"so maybe {n} or {n + 1}"


def adversarial_chunks(seed: int, rows: int, chunk: int):
    """The adversarial rows in chunks, built as they are needed (megabyte rows would not fit in memory at once)."""
    rng = random.Random(seed + 7)
    for lo in range(0, rows, chunk):
        yield [adversarial_row(rng, k) for k in range(lo, min(rows, lo + chunk))]


def open_r1_reward(gold: str, completion: str) -> float | None:
    """open-r1's `accuracy_reward` for one item (src/open_r1/rewards.py), math-verify in this process."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify

    gold_parsed = parse(gold, extraction_mode="first_match")
    if len(gold_parsed) == 0:
        return None
    config = LatexExtractionConfig(
        normalization_config=NormalizationConfig(
            nits=False, malformed_operators=False, basic_latex=True, equations=True, boxed="all", units=True
        ),
        boxed_match_priority=0,
        try_extract_without_anchor=False,
    )
    answer_parsed = parse(completion, extraction_config=[config], extraction_mode="first_match")
    try:
        return float(verify(gold_parsed, answer_parsed))
    except Exception:
        return None


def open_r1_gold(gold: str) -> str:
    # open-r1's solutions are full LaTeX; a bare gold answer is given to it in `$...$` so its parser finds it.
    return gold if "$" in gold or "\\boxed" in gold else f"${gold}$"


def open_r1_adversarial(seed: int, rows: int) -> None:
    """Child process: open-r1's way over the adversarial rows, one progress line per item (killed by the parent)."""
    t0 = time.perf_counter()
    for k, (gold, completion) in enumerate(row for chunk in adversarial_chunks(seed, rows, 100) for row in chunk):
        open_r1_reward(open_r1_gold(gold), completion)
        print(f"{k + 1} {time.perf_counter() - t0:.2f}", flush=True)


def capped_open_r1(args: argparse.Namespace) -> tuple[int, float]:
    """(items done, seconds) of open-r1's way on the adversarial rows within the cap."""
    cmd = [sys.executable, __file__, "--open-r1-child", "--seed", str(args.seed)]
    cmd += ["--adversarial-rows", str(args.adversarial_rows)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    done, seconds = 0, 0.0
    try:
        proc.wait(args.open_r1_cap_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for line in proc.stdout.read().splitlines():
        done, seconds = int(line.split()[0]), float(line.split()[1])
    return done, args.open_r1_cap_s if proc.returncode != 0 else seconds


def run_normal(items: list[tuple[str, str]], args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    theirs = [open_r1_reward(open_r1_gold(g), c) for g, c in items]
    r1_s = time.perf_counter() - t0
    print(f"open-r1 accuracy_reward, in process:  {r1_s:7.2f} s  {len(items) / r1_s:8.1f} verdicts/s")
    V.clear_cache()
    t0 = time.perf_counter()
    verdicts, latency = V.verify_batch_timed(items, timeout_s=args.timeout_s, workers=args.workers)
    ours_s = time.perf_counter() - t0
    print(f"verify_batch (pool, cache cleared):   {ours_s:7.2f} s  {len(items) / ours_s:8.1f} verdicts/s")
    print(f"  ratio open-r1 / verify_batch wall time: {r1_s / ours_s:.2f}x")
    agree = sum((t == 1.0) == (v.status == "correct") for t, v in zip(theirs, verdicts, strict=True))
    print(f"  agreement on correct/not correct: {agree}/{len(items)}")
    budget_hits = 0
    for gold, completion in items:
        found = V.extract_final_answer(completion)
        if (found.text and over_budget(V.normalize_answer(found.text))) or over_budget(V.normalize_answer(gold)):
            budget_hits += 1
    statuses = dict(collections.Counter(v.status for v in verdicts))
    print(f"  normal items stopped by the complexity budget: {budget_hits}; statuses {statuses}")
    print(f"  worst per-item latency: {max(latency):.2f} s")


def run_adversarial(args: argparse.Namespace) -> None:
    counts: collections.Counter = collections.Counter()
    worst = 0.0
    t0 = time.perf_counter()
    for chunk in adversarial_chunks(args.seed, args.adversarial_rows, 500):
        verdicts, latency = V.verify_batch_timed(chunk, timeout_s=args.adversarial_timeout_s, workers=args.workers)
        counts.update(v.status for v in verdicts)
        worst = max(worst, max(latency))
    wall = time.perf_counter() - t0
    print(
        f"verify_batch, {args.adversarial_rows:,} adversarial rows, timeout {args.adversarial_timeout_s:g} s: "
        f"{wall:.2f} s (building the rows included); {dict(counts)}"
    )
    limit = args.adversarial_timeout_s + 1.0
    print(f"  worst per-item latency: {worst:.2f} s (limit {limit:.2f} s: {'ok' if worst <= limit else 'OVER'})")
    probe = V.verify_batch([("4321", "so \\boxed{4321}")], timeout_s=args.timeout_s, workers=args.workers)
    print(f"  pool afterwards: {probe[0].status}")
    if args.hangs:
        # Within the budget but too slow for sympy: these do reach a worker, which is killed at the deadline.
        hangs = [(str(k), f"\\boxed{{(x+{k})^{{900000}}}}") for k in range(args.hangs)]
        t0 = time.perf_counter()
        verdicts, latency = V.verify_batch_timed(hangs, timeout_s=args.adversarial_timeout_s, workers=args.workers)
        print(
            f"verify_batch, {args.hangs} hangs within the budget: {time.perf_counter() - t0:.2f} s; "
            f"{dict(collections.Counter(v.status for v in verdicts))}; worst per-item latency {max(latency):.2f} s"
        )
        probe = V.verify_batch([("4322", "so \\boxed{4322}")], timeout_s=args.timeout_s, workers=args.workers)
        print(f"  pool afterwards: {probe[0].status}")
    if args.open_r1_cap_s > 0:
        done, seconds = capped_open_r1(args)
        rate = done / seconds if seconds else 0.0
        projected = f"{args.adversarial_rows / rate:,.0f} s projected" if rate else "no item finished"
        print(f"open-r1 accuracy_reward on the same rows: {done} done in {seconds:.1f} s ({projected})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--samples-per-problem", type=int, default=8)
    p.add_argument("--paragraphs", type=int, default=12, help="mean reasoning paragraphs per completion")
    p.add_argument("--timeout-s", type=float, default=5.0)
    p.add_argument("--adversarial-rows", type=int, default=10_000)
    p.add_argument("--adversarial-timeout-s", type=float, default=1.0)
    p.add_argument("--hangs", type=int, default=20, help="answers within the budget that hang sympy")
    p.add_argument("--open-r1-cap-s", type=float, default=60.0, help="0: skip open-r1 on the adversarial rows")
    p.add_argument("--workers", type=int, default=None, help="default: CPU count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--open-r1-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.open_r1_child:
        open_r1_adversarial(args.seed, args.adversarial_rows)
        return 0

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    items = build(args)
    sizes = [len(c) for _, c in items]
    print(
        f"{len(items)} normal completions, mean {sum(sizes) / len(sizes) / 1000:.1f} KB; {cores} cores, "
        f"workers={args.workers or cores}, timeout {args.timeout_s:g} s"
    )
    t0 = time.perf_counter()
    V.verify_batch([("1", "\\boxed{1}")], timeout_s=args.timeout_s, workers=args.workers)
    print(f"pool start (fork server with math-verify warmed up, then workers): {time.perf_counter() - t0:.2f} s")
    # Both sides warm up (ANTLR's DFA, sympy's caches) on other problems first, so a steady state is measured.
    warm = build(argparse.Namespace(**{**vars(args), "items": 200, "seed": args.seed + 1}))
    V.verify_batch(warm, timeout_s=args.timeout_s, workers=args.workers)
    for g, c in warm:
        open_r1_reward(open_r1_gold(g), c)
    run_normal(items, args)
    if args.adversarial_rows:
        run_adversarial(args)
    V.shutdown_pool()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MB/s of `locate_checkpoints` (and `count_paragraphs`) over synthetic R1-style trajectories of ~20 KB.

    .venv/bin/python benchmarks/checkpoint_scan.py [--trajectories 40000] [--size-kb 20] [--distinct N] [--repeats 3]

Trajectories are paragraphs drawn (seeded) from a pool that holds real checkpoints (`Wait,` `But` `Alternatively`)
and false ones (`Waiting`, `Butterfly`, `wait`, `Wait2`, a `Wait` after a single newline, a marker mid-line), joined
mostly by "\\n\\n", sometimes by "\\n\\n\\n" or "\\n"; one in twenty ends in a loop of "Wait, triangle AFE: same."
paragraphs, as real wrong samples do; a fifth of them hold non-Latin-1 math symbols, which makes
Python store them with 2 bytes per character. The number of true checkpoints is known from the generator and checked
against what the scan finds, so the benchmark also fails loudly if the locator is wrong. MB are 10^6 bytes of UTF-8.
Goal: >= 100 MB/s.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckptdpo.checkpoints import count_paragraphs, locate_checkpoints  # noqa: E402

FILLER = [
    "Let me compute the area of triangle AFE using the coordinates we found.",
    "So the equation becomes x^2 + 2x + 1 = 0, which factors as (x + 1)^2 = 0.",
    "Then substituting back, we get y = 3x - 4 = 2, so the point is (2, 2).",
    "The sum of the interior angles is 180 degrees, so the third angle is 180 - 45 - 60 = 75 degrees.",
    "Now I need to check whether this value satisfies the original constraint.",
    "Hmm, that gives 17/4, which is 4.25; the problem asks for an integer though.",
]
# (paragraph opening, is a true checkpoint when it opens a paragraph after "\n\n")
OPENINGS = [
    ("Wait, ", True),
    ("Wait. ", True),
    ("But ", True),
    ("Alternatively, ", True),
    ("Waiting for the sum to settle, ", False),
    ("Butterfly diagrams aside, ", False),
    ("wait, ", False),
    ("Wait2 ", False),
    ("So ", False),
    ("Let me see. ", False),
    ("Therefore ", False),
    ("First, ", False),
]
LOOP = "Wait, triangle AFE: same."
UNICODE_FILLER = "Since √(x² + 1) ≤ x + 1 for x ≥ 0, the bound holds. "


def make_paragraph_pool(rng: random.Random, size: int = 600) -> list[tuple[str, bool]]:
    """Paragraphs of 60 to ~500 characters, each (text, opens with a true checkpoint marker)."""
    pool = []
    for _ in range(size):
        opening, real = rng.choice(OPENINGS)
        body = " ".join(rng.choices(FILLER, k=rng.randint(1, 6)))
        if rng.random() < 0.2:  # a marker inside a paragraph, after a single newline or mid-line: never a checkpoint
            body += rng.choice(["\nWait, that is odd.", " But no.", " Wait, same."])
        pool.append((opening + body, real))
    return pool


def make_trajectories(n: int, size_kb: float, distinct: int, seed: int) -> tuple[list[str], int]:
    """`n` trajectories (`distinct` different ones, cycled) of about size_kb KB, and their number of checkpoints."""
    rng = random.Random(seed)
    pool = make_paragraph_pool(rng)
    target = int(size_kb * 1000)
    texts, expected = [], []
    for i in range(min(n, distinct)):
        paragraphs = rng.choices(pool, k=max(1, target // 60))  # more than enough; the loop stops at the target
        parts = [f"Okay, so I need to solve problem {i}."]
        count, length = 0, len(parts[0])
        unicode = rng.random() < 0.2
        looping = rng.random() < 0.05
        for text, real in paragraphs:
            r = rng.random()
            sep = "\n\n" if r < 0.9 else ("\n\n\n" if r < 0.95 else "\n")
            count += real and sep != "\n"
            parts.append(sep)
            parts.append(text + (UNICODE_FILLER if unicode and rng.random() < 0.3 else ""))
            length += len(sep) + len(parts[-1])
            if length >= target:
                break
            if looping and length >= target // 4:
                # A wrong trajectory stuck in a loop: the rest is one short checkpoint paragraph over and over.
                reps = (target - length) // (len(LOOP) + 2) + 1
                parts.append(("\n\n" + LOOP) * reps)
                count += reps
                break
        texts.append("".join(parts))
        expected.append(count)
    reps = -(-n // len(texts))
    return (texts * reps)[:n], sum((expected * reps)[:n])


def time_best(fn, texts: list[str], repeats: int) -> tuple[float, int]:
    best, result = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn(texts)
        best = min(best, time.perf_counter() - t0)
    return best, result


def scan_checkpoints(texts: list[str]) -> int:
    return sum(len(locate_checkpoints(t)) for t in texts)


def scan_paragraphs(texts: list[str]) -> int:
    return sum(count_paragraphs(t) for t in texts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trajectories", type=int, default=40_000)
    p.add_argument("--size-kb", type=float, default=20.0, help="approximate size of one trajectory (KB)")
    p.add_argument("--distinct", type=int, default=None, help="different trajectories, cycled (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes; the best one counts")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    texts, expected = make_trajectories(args.trajectories, args.size_kb, args.distinct or args.trajectories, args.seed)
    gen_s = time.perf_counter() - t0
    chars = sum(len(t) for t in texts)
    utf8_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"cpu cores: {os.cpu_count()}; python {sys.version.split()[0]}")
    print(
        f"{len(texts):,} trajectories ({len(set(map(id, texts))):,} distinct), {utf8_bytes / 1e6:,.1f} MB UTF-8, "
        f"{chars / 1e6:,.1f} M chars, mean {utf8_bytes / len(texts) / 1e3:.1f} KB; generated in {gen_s:.1f} s"
    )

    scan_checkpoints(texts[:200])  # compile and cache the pattern outside the timing
    secs, found = time_best(scan_checkpoints, texts, args.repeats)
    if found != expected:
        print(f"FAIL: found {found:,} checkpoints, the generator put {expected:,}", file=sys.stderr)
        return 1
    mbs = utf8_bytes / secs / 1e6
    print(
        f"locate_checkpoints: {secs:.2f} s, {mbs:,.0f} MB/s, {len(texts) / secs:,.0f} trajectories/s, "
        f"{found / len(texts):.1f} checkpoints per trajectory (all {found:,} as generated)"
    )
    secs_p, paragraphs = time_best(scan_paragraphs, texts, args.repeats)
    print(
        f"count_paragraphs:   {secs_p:.2f} s, {utf8_bytes / secs_p / 1e6:,.0f} MB/s, "
        f"{paragraphs / len(texts):.1f} paragraphs per trajectory"
    )
    print(f"goal >= 100 MB/s for locate_checkpoints: {'met' if mbs >= 100 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

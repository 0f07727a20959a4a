"""Peak RSS and wall time of the data pipeline on the fake backend at 10k, 20k and 40k problems x 4 samples, at the
shape of real reasoning trajectories.

Trajectories are drawn to match public R1-distill / DeepScaleR / QwQ / Qwen3 outputs on MATH-500 and AIME (issue 17):
median 9.2 KB, mean 13 KB, max 89 KB; checkpoints (Wait / Alternatively / But) median 11, mean 22, max 843. Wrong
trajectories are longer (mean 245 paragraphs, 56 checkpoints) than right ones (96, 16), and a few wrong ones are
800-checkpoint loops ("Wait, triangle AFE: same."). A pool of such trajectories is the fake backend's script; every
sample is one of them. All stages do real work: Parquet shards, verification in the process pool, checkpoint scans,
one resampling round with the seed schedule (up to 24 continuations per trajectory, each a prompt of the whole
prefix) and pair building. Goal: peak RSS under 2 GB at 40k problems, time linear in the number of problems.

    python benchmarks/scale_memory.py [--sizes 10000,20000,40000] [--shard-size 1000] [--pool 1000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

TEMPLATE = "<|user|>\n{message}\n<|assistant|>\n"


WORDS = "let us compute the sum of the terms and check each case carefully again so that".split()
MARKERS = ("Wait", "Alternatively", "But")
MAX_CHARS = 89_000


def paragraph(rng: random.Random, checkpoint: bool) -> str:
    """~110 characters: the mean paragraph of the measured trajectories (13 KB over ~118 paragraphs)."""
    head = rng.choice(MARKERS) + "," if checkpoint else rng.choice(("Then", "Next,", "So", "Now"))
    return head + " " + " ".join(rng.choices(WORDS, k=rng.randint(14, 27))) + "."


def trajectory(rng: random.Random, right: bool) -> str:
    """Paragraphs drawn lognormally (right: median 78, mean 96; wrong: median 170, mean 245), checkpoints at the
    measured mean rates (right 16/96, wrong 56/245) scaled per trajectory by a lognormal factor of mean 1 (real
    trajectories differ in how often they reconsider), and a boxed answer (7 is right, 8 wrong)."""
    median, sigma, rate = (78, 0.64, 16 / 96) if right else (170, 0.85, 56 / 245)
    n = max(3, round(rng.lognormvariate(math.log(median), sigma)))
    rate *= rng.lognormvariate(-(0.7**2) / 2, 0.7)
    paragraphs, size = [], 0
    for i in range(n):
        paragraphs.append(paragraph(rng, i > 0 and rng.random() < rate))
        size += len(paragraphs[-1]) + 2
        if size > MAX_CHARS - 200:
            break
    paragraphs.append(f"So the answer is \\boxed{{{7 if right else 8}}}.")
    return "\n\n".join(paragraphs)


def loop_trajectory(rng: random.Random) -> str:
    """A wrong trajectory stuck in a loop: 800-843 checkpoints of one short paragraph."""
    body = ["Let me look at triangle AFE again."] + ["Wait, triangle AFE: same."] * rng.randint(800, 843)
    return "\n\n".join([*body, "So the answer is \\boxed{8}."])


def trajectory_pool(size: int, seed: int = 0) -> list[str]:
    """`size` trajectories, 15% wrong (which with the rates above gives the measured mean of 22 checkpoints), of
    which 1 in 40 loops; shuffled, since the fake backend gives a problem's samples consecutive pool entries."""
    rng = random.Random(seed)
    wrong = round(0.15 * size)
    loops = max(1, wrong // 40)
    pool = [trajectory(rng, True) for _ in range(size - wrong)]
    pool += [trajectory(rng, False) for _ in range(wrong - loops)] + [loop_trajectory(rng) for _ in range(loops)]
    rng.shuffle(pool)
    return pool


def describe_pool(pool: list[str]) -> str:
    sizes = sorted(len(t.encode()) for t in pool)
    cps = sorted(sum(t.count(f"\n\n{m} ") + t.count(f"\n\n{m},") for m in MARKERS) for t in pool)
    mid = len(pool) // 2
    return (
        f"pool of {len(pool)}: KB median {sizes[mid] / 1e3:.1f} mean {sum(sizes) / len(sizes) / 1e3:.1f} "
        f"max {sizes[-1] / 1e3:.1f}; checkpoints median {cps[mid]} mean {sum(cps) / len(cps):.1f} max {cps[-1]}"
    )


def write_inputs(tmp: Path, num_problems: int, shard_size: int, pool: list[str]) -> Path:
    script = {
        "template": TEMPLATE,
        "continuations": [
            {"after": "<|assistant|>\n", "texts": pool},
            {"after": "\n\n", "texts": ["Wait, it is \\boxed{7}.", "Wait, it is \\boxed{6}."]},
        ],
    }
    (tmp / "script.yaml").write_text(yaml.safe_dump(script))
    with open(tmp / "problems.jsonl", "w") as f:
        for i in range(num_problems):
            f.write(json.dumps({"id": f"q{i}", "problem": f"Problem {i}: what is 3 + 4?", "answer": "7"}) + "\n")
    recipe = {
        "name": f"scale-{num_problems}",
        "stages": ["generate", "verify", "checkpoints", "resample"],
        "problems": {"source": "file", "path": "problems.jsonl"},
        "backend": {"kind": "fake", "model": "fake", "script": str(tmp / "script.yaml")},
        "generate": {"num_samples": 4, "max_tokens": 100_000, "shard_size": shard_size},
        "resample": {"policy": "seed", "max_rounds": 1, "max_tokens": 100},
    }
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp / "recipe.yaml"


def manifest_rows(stage_dir: Path) -> int:
    manifest = json.loads((stage_dir / "_manifest.json").read_text())
    return manifest["num_rows"]


def measure(num_problems: int, shard_size: int, keep: bool, pool: list[str]) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"ckptdpo-scale-{num_problems}-"))
    recipe = write_inputs(tmp, num_problems, shard_size, pool)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    # On a loaded machine the ephemeral Prefect API can take longer than its default 20 s to come up.
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    cmd = [sys.executable, "-m", "commands", "run", str(recipe), "--run-dir", str(tmp / "run")]
    t0 = time.perf_counter()
    # A wrapper process per size, so RUSAGE_CHILDREN's max RSS is this run's pipeline process alone.
    probe = (
        "import resource,subprocess,sys;"
        f"subprocess.run({cmd!r},check=True,stdout=subprocess.DEVNULL);"
        "u=resource.getrusage(resource.RUSAGE_CHILDREN);"
        "print(u.ru_utime+u.ru_stime);print(u.ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    run = tmp / "run"
    stats = json.loads((run / "stats.json").read_text())
    disk = sum(p.stat().st_size for p in run.rglob("*.parquet"))
    result = {
        "problems": num_problems,
        "samples": stats["generate"]["num_samples"],
        "continuations": manifest_rows(run / "resample" / "round-01"),
        "pairs": stats["resample"]["pairs"]["num_pairs"],
        "wall_s": wall,
        "stage_s": {k: stats[k].get("wall_s", 0.0) for k in ("generate", "verify", "checkpoints", "resample")},
        "peak_rss_mb": int(out.stdout.strip().splitlines()[-1]) / 1024,
        # CPU seconds of the pipeline process and the children it waited for: on a shared machine, a steadier
        # measure of work than wall time (verifier workers that outlive their pool are not counted).
        "cpu_s": float(out.stdout.strip().splitlines()[-2]),
        "parquet_mb": disk / 1e6,
    }
    if not keep:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="10000,20000,40000")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--pool", type=int, default=1000, help="distinct trajectories the fake backend draws from")
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    args = p.parse_args()
    pool = trajectory_pool(args.pool)
    print(f"cores: {os.cpu_count()}, shard size {args.shard_size}, load average {os.getloadavg()[0]:.2f}")
    print(describe_pool(pool))
    head = ("problems", "samples", "contin.", "pairs", "wall s", "cpu s", "gen/ver/cp/res s", "RSS MB", "parquet MB")
    widths = (9, 8, 9, 8, 8, 8, 22, 7, 11)
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True)))
    for n in [int(x) for x in args.sizes.split(",")]:
        r = measure(n, args.shard_size, args.keep, pool)
        stages = "/".join(f"{v:.0f}" for v in r["stage_s"].values())
        print(
            f"{r['problems']:>9} {r['samples']:>8} {r['continuations']:>9} {r['pairs']:>8} {r['wall_s']:>8.1f} "
            f"{r['cpu_s']:>8.1f} {stages:>22} {r['peak_rss_mb']:>7.0f} {r['parquet_mb']:>11.1f}",
            flush=True,
        )
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"self RSS {self_mb:.0f} MB, load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

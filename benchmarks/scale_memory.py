"""Peak RSS and wall time of the data pipeline on the fake backend at 10k, 20k and 40k problems x 4 samples.

Trajectories are synthetic ~20 KB R1-style texts (paragraphs, one checkpoint near the end, a boxed answer), half
right and half wrong, so every stage does real work: Parquet shards of ~80 MB of text each, verification in the
process pool, checkpoint scans, one resampling round and pair building. Goal: peak RSS under 2 GB at 40k
problems, time linear in the number of problems.

    python benchmarks/scale_memory.py [--sizes 10000,20000,40000] [--shard-size 1000]
"""

from __future__ import annotations

import argparse
import json
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


def trajectory(rng: random.Random, answer: str, size: int) -> str:
    words = "let us compute the sum of the terms and check each case carefully again".split()
    paragraphs = []
    while sum(len(p) + 2 for p in paragraphs) < size:
        paragraphs.append(("Then " if rng.random() < 0.5 else "Next, ") + " ".join(rng.choices(words, k=40)) + ".")
    # One checkpoint, near the end: the prefix is long, the diverging suffixes short.
    paragraphs.append("Wait, let me double-check the last step.")
    paragraphs.append(f"So the answer is \\boxed{{{answer}}}.")
    return "\n\n".join(paragraphs)


def write_inputs(tmp: Path, num_problems: int, shard_size: int) -> Path:
    rng = random.Random(0)
    texts = [trajectory(rng, a, 20_000) for a in ("7", "8", "7", "9")]  # two right, two wrong
    script = {
        "template": TEMPLATE,
        "continuations": [
            {"after": "<|assistant|>\n", "texts": texts},
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
        "resample": {"max_rounds": 1, "max_tokens": 100},
    }
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp / "recipe.yaml"


def measure(num_problems: int, shard_size: int, keep: bool) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"ckptdpo-scale-{num_problems}-"))
    recipe = write_inputs(tmp, num_problems, shard_size)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "commands", "run", str(recipe), "--run-dir", str(tmp / "run")]
    t0 = time.perf_counter()
    # A wrapper process per size, so RUSAGE_CHILDREN's max RSS is this run's pipeline process alone.
    probe = (
        "import resource,subprocess,sys;"
        f"subprocess.run({cmd!r},check=True,stdout=subprocess.DEVNULL);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    stats = json.loads((tmp / "run" / "stats.json").read_text())
    disk = sum(p.stat().st_size for p in (tmp / "run").rglob("*.parquet"))
    if not keep:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return {
        "problems": num_problems,
        "samples": stats["generate"]["num_samples"],
        "pairs": stats["resample"]["pairs"]["num_pairs"],
        "wall_s": wall,
        "peak_rss_mb": int(out.stdout.strip().splitlines()[-1]) / 1024,
        "parquet_mb": disk / 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="10000,20000,40000")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    args = p.parse_args()
    print(f"cores: {os.cpu_count()}, shard size {args.shard_size}")
    head = ("problems", "samples", "pairs", "wall s", "s/1k problems", "peak RSS MB", "parquet MB")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (9, 8, 7, 8, 14, 12, 11), strict=True)))
    for n in [int(x) for x in args.sizes.split(",")]:
        r = measure(n, args.shard_size, args.keep)
        print(
            f"{r['problems']:>9} {r['samples']:>8} {r['pairs']:>7} {r['wall_s']:>8.1f} "
            f"{1000 * r['wall_s'] / n:>14.2f} {r['peak_rss_mb']:>12.0f} {r['parquet_mb']:>11.1f}",
            flush=True,
        )
    print(f"self RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()

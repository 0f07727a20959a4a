"""Share of a pipeline run's wall time spent outside generation and verification (Prefect, I/O, bookkeeping).

Runs `ckptdpo run` on a recipe (default: the demo recipe's data stages) into a fresh run directory, then reads
the generation and verification seconds each stage measured around its backend and verifier calls.

    python benchmarks/pipeline_overhead.py [--recipe recipes/demo.yaml] [--stages generate,verify,...] [--set k=v]
    python benchmarks/pipeline_overhead.py --from-run runs/demo --wall-s 512   # a finished run, e.g. `make demo`

Model work is what each stage measured around its backend, verifier and trainer calls: generation, verification,
DTO probing and judging, training, evaluation. Everything else (Prefect task and flow runs, Parquet I/O, stage
bookkeeping, model loading) is overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--recipe", default=str(REPO / "recipes" / "demo.yaml"))
    p.add_argument("--stages", default="generate,verify,checkpoints,resample")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--run-dir", default=None, help="default: a fresh temporary directory")
    p.add_argument("--from-run", default=None, help="analyse this finished run instead of running one")
    p.add_argument("--wall-s", type=float, default=None, help="with --from-run: the measured process wall time")
    args = p.parse_args()
    if args.from_run:
        print(f"measured wall time of the run: {args.wall_s} s" if args.wall_s else "")
        report(json.loads((Path(args.from_run) / "stats.json").read_text()), None)
        return
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="ckptdpo-overhead-")) / "run"
    cmd = [sys.executable, "-m", "commands", "run", args.recipe, "--run-dir", str(run_dir), "--stages", args.stages]
    for o in args.overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    total = time.perf_counter() - t0
    report(json.loads((run_dir / "stats.json").read_text()), total)


def work_seconds(stage: str, st: dict) -> float:
    """Seconds a stage spent in model work, as it recorded them."""
    if stage == "train":
        return st.get("wall_time_s", 0.0)  # the training subprocess, start to finish
    if stage == "eval":
        return st.get("wall_s", 0.0) if "generate_s" not in st else st["generate_s"] + st.get("verify_s", 0.0)
    return st.get("generate_s", 0.0) + st.get("verify_s", 0.0) + st.get("optimize_s", 0.0)


def report(stats: dict, total: float | None) -> None:
    # Stages that record their own wall time (train and eval record theirs in other shapes and are left out).
    stages = [s for s in ("generate", "verify", "checkpoints", "resample", "dto") if "wall_s" in stats.get(s, {})]
    in_stages = sum(stats[s].get("wall_s", 0.0) for s in stages)
    work = sum(work_seconds(s, stats[s]) for s in stages)
    print(f"cores: {os.cpu_count()}")
    if total:
        print(f"process wall time:             {total:8.1f} s")
    print(f"sum of stage wall times:       {in_stages:8.1f} s")
    print(f"model work:                    {work:8.1f} s")
    for s in stages:
        st = stats[s]
        print(f"  {s:12s} wall {st.get('wall_s', 0):7.1f} s  model work {work_seconds(s, st):7.1f} s")
    print(f"overhead inside the flows:     {100 * (in_stages - work) / in_stages:8.2f} %  (goal <= 5 %)")
    if total:
        print(f"overhead incl. process start:  {100 * (total - work) / total:8.2f} %  (imports, Prefect API start)")


if __name__ == "__main__":
    main()

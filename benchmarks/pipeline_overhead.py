"""Share of a pipeline run's wall time spent outside generation and verification (Prefect, I/O, bookkeeping).

Runs `ckptdpo run` on a recipe (default: the demo recipe's data stages) into a fresh run directory, then reads
the generation and verification seconds each stage measured around its backend and verifier calls.

    python benchmarks/pipeline_overhead.py [--recipe recipes/demo.yaml] [--stages generate,verify,...] [--set k=v]
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
    args = p.parse_args()
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="ckptdpo-overhead-")) / "run"
    cmd = [sys.executable, "-m", "ckptdpo.cli", "run", args.recipe, "--run-dir", str(run_dir), "--stages", args.stages]
    for o in args.overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    total = time.perf_counter() - t0
    stats = json.loads((run_dir / "stats.json").read_text())
    stages = [s for s in args.stages.split(",") if s in stats]
    in_stages = sum(stats[s].get("wall_s", 0.0) for s in stages)
    work = sum(stats[s].get("generate_s", 0.0) + stats[s].get("verify_s", 0.0) for s in stages)
    print(f"cores: {os.cpu_count()}")
    print(f"process wall time:             {total:8.1f} s")
    print(f"sum of stage wall times:       {in_stages:8.1f} s")
    print(f"generation + verification:     {work:8.1f} s")
    for s in stages:
        st = stats[s]
        print(
            f"  {s:12s} wall {st.get('wall_s', 0):7.1f} s  generate {st.get('generate_s', 0):7.1f} s  "
            f"verify {st.get('verify_s', 0):6.1f} s"
        )
    print(f"overhead inside the flows:     {100 * (in_stages - work) / in_stages:8.2f} %  (goal <= 5 %)")
    print(f"overhead incl. process start:  {100 * (total - work) / total:8.2f} %  (Python imports, Prefect API start)")


if __name__ == "__main__":
    main()

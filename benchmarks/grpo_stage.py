"""The GRPO baseline stage on its own: how long it takes and how close it lands to its generation budget.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/grpo_stage.py [--recipe recipes/demo.yaml] [--budget 640]
        [--model PATH] [--problems 12] [--set grpo.key=value ...] [--out DIR]

Writes the recipe's problems (the demo generator, or --problems-file JSONL) into a fresh run directory, builds the
job the grpo stage builds (`build_grpo_job`), runs `python -m ckptdpo.grpo` through the stage's launcher and prints
the summary's figures: steps, generated tokens against the budget, trained tokens, start-up / training / saving
seconds, and the reward curve. The default is the demo's grpo section on the demo model; on a GPU machine pass
`--set grpo.bf16=true` and the model to use.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ckptdpo.configs import Recipe, parse_override  # noqa: E402
from ckptdpo.grpo import build_grpo_job, build_grpo_launch_command  # noqa: E402
from ckptdpo.problems import load_problems  # noqa: E402
from ckptdpo.schemas import PROBLEMS, make_table  # noqa: E402
from ckptdpo.shards import write_manifest, write_shard  # noqa: E402
from ckptdpo.train.job import write_job  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "demo.yaml"))
    p.add_argument("--model", default=str(Path.home() / ".cache" / "ckptdpo" / "models" / "smollm2-135m-instruct"))
    p.add_argument("--budget", type=int, default=None, help="tokens (default: the recipe's grpo.generation_budget)")
    p.add_argument("--set", action="append", default=[], help="dotted.key=value recipe overrides")
    p.add_argument("--out", default=None, help="run directory (default: a fresh temporary one)")
    args = p.parse_args()

    overrides = dict(parse_override(s) for s in args.set)
    if args.budget is not None:
        overrides["grpo.generation_budget"] = args.budget
    recipe = Recipe.from_yaml(args.recipe, overrides)
    run = Path(args.out or tempfile.mkdtemp(prefix="grpo-stage-"))
    rows = load_problems(recipe.problems, base_dir=Path(args.recipe).resolve().parent).rows
    write_shard(run / "problems", 0, make_table(rows, PROBLEMS))
    write_manifest(run / "problems", config_hash="benchmark")
    # No factory ran here: 'match' has nothing to match, so a budget must be a number (--budget or the recipe's).
    job = build_grpo_job(recipe, run, args.model, stats={})
    path = write_job(job, run / "grpo-job.yaml")
    cmd = build_grpo_launch_command(path, job.grpo)
    load = os.getloadavg()
    print(f"{len(rows)} problems, budget {job.generation_budget} tokens, load average before {load[0]:.1f}")
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        print(done.stderr[-4000:])
        return done.returncode
    s = json.loads((run / "grpo" / "summary.json").read_text())
    print(f"stage wall {wall:.1f} s (subprocess): start-up {s['startup_s']:.1f} s, "
          f"training {s['train_runtime_s']:.1f} s, saving {s['save_s']:.1f} s; "
          f"load average after {os.getloadavg()[0]:.1f}")  # fmt: skip
    share = f"{100 * s['budget_share']:.1f}%" if s["budget_share"] else "-"
    print(f"{s['global_step']} steps, {s['completions_per_step']} completions per step, stopped by {s['stopped_by']}")
    print(f"generated {s['generated_tokens']:,} of {s['generation_budget']} budget tokens ({share}); "
          f"trained tokens {s['trained_tokens']:,}; capped generations {s['capped_generations']}")  # fmt: skip
    columns = ("step", "generated_tokens", "completion_length", "generation_s", "reward_s", "reward_mean",
               "skipped_share", "loss")  # fmt: skip
    rows = [columns] + [tuple(str(st.get(c)) for c in columns) for st in s["steps"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    print("\n".join("  " + "  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows))
    print(f"run directory: {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

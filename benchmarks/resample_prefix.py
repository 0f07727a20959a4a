"""Prompt tokens the hf backend computes for the resample stage, with and without prefix reuse, on the demo model.

Two shapes, each run twice side by side (reuse off, then on) with the same requests and seeds:

1. synthetic: one trajectory (~600 tokens with its prompt) with 11 "Wait," checkpoints, its resample requests
   planned by `ckptdpo.resample.plan_slots` / `build_requests` with the seed schedule (as the resample stage does).
2. demo: the demo recipe's problems, few-shot prompt and generate settings; trajectories sampled by the hf backend,
   verified, checkpoints located with the recipe's markers, round-1 resample requests per shard of the recipe's
   shard size (one `generate` call per shard, as the resample task makes).

Counted per run: continuation rows, prompt tokens of per-continuation prefill (every draw prefilled from scratch:
sum of n x prompt tokens), of per-request prefill (the backend before reuse: the n draws of a request share one
prefill; `prompt_tokens_requested`), and `prompt_tokens_computed` (what ran through the model), wall seconds, and
whether every continuation's token ids are identical with and without reuse.

    python benchmarks/resample_prefix.py [--shapes synthetic,demo] [--problems 12]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ckptdpo.backends.base import GenerationRequest, templated_problem
from ckptdpo.backends.hf import HFBackend
from ckptdpo.checkpoints import locate_checkpoints
from ckptdpo.configs import ResampleConfig
from ckptdpo.configs.recipe import Recipe
from ckptdpo.generation import build_generation_requests
from ckptdpo.models import pull_demo
from ckptdpo.problems import load_problems
from ckptdpo.resample import build_requests, plan_slots
from ckptdpo.verify import verify_batch

ROOT = Path(__file__).resolve().parents[1]


def synthetic_trajectory(backend: HFBackend, checkpoints: int = 11) -> dict:
    """A correct trajectory of ~550 tokens: reasoning paragraphs, `checkpoints` of them opening with "Wait,"."""
    paragraphs = []
    for i in range(checkpoints * 2 + 1):
        head = "Wait, let me recheck" if i % 2 else "Next we compute"
        paragraphs.append(f"{head} the partial sum {i}: {17 * (i + 3)} plus {23 * (i + 1)} gives {40 * i + 74}.")
    paragraphs.append("The final answer is \\boxed{391}.")
    completion = "\n\n".join(paragraphs)
    return {
        "sample_id": "synthetic-0",
        "problem_id": "p0",
        "status": "correct",
        "prompt": backend.chat_prompt("What is 17 * 23? Show the partial sums."),
        "completion": completion,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "checkpoint_chars": [c.char for c in locate_checkpoints(completion)],
    }


def resample_requests(trajectories: list[dict], cfg: ResampleConfig) -> list[GenerationRequest]:
    by_id = {t["sample_id"]: t for t in trajectories}
    work = [(slot, slot.draws) for t in trajectories for slot in plan_slots(t, cfg)]
    return build_requests(work, by_id, cfg, round_index=1)


def demo_shards(backend: HFBackend, recipe: Recipe, num_problems: int) -> list[list[GenerationRequest]]:
    """The demo's round-1 resample requests, one list per shard; trajectories sampled by the backend itself."""
    problems = load_problems(recipe.problems.model_copy(update={"num_problems": num_problems})).rows
    few_shot = recipe.generate.few_shot_pairs()
    prompt = lambda q: templated_problem(backend.tokenizer, q, few_shot)  # noqa: E731
    gen = build_generation_requests(problems, recipe.generate, prompt)
    results = backend.generate(gen)
    trajectories = []
    for p, req, res in zip(problems, gen, results, strict=True):
        for j, s in enumerate(res.samples):
            trajectories.append(
                {
                    "sample_id": f"{p['problem_id']}-{j}",
                    "problem_id": p["problem_id"],
                    "prompt": req.prompt,
                    "completion": s.text,
                    "prompt_tokens": res.prompt_tokens,
                    "completion_tokens": s.num_tokens,
                    "gold_answer": p["answer"],
                }
            )
    verdicts = verify_batch([(t["gold_answer"], t["completion"]) for t in trajectories], timeout_s=5.0)
    errors = sum(v.status == "error" for v in verdicts)
    if errors:
        raise SystemExit(f"verification failed for {errors} of {len(verdicts)} trajectories; fix verify and rerun.")
    markers = tuple(recipe.checkpoints.markers)
    for t, v in zip(trajectories, verdicts, strict=True):
        t["status"] = v.status
        t["checkpoint_chars"] = [c.char for c in locate_checkpoints(t["completion"], markers)]
    size = recipe.generate.shard_size * recipe.generate.num_samples
    shards = [trajectories[i : i + size] for i in range(0, len(trajectories), size)]
    return [r for r in (resample_requests(s, recipe.resample) for s in shards) if r]


def run(backend: HFBackend, shards: list[list[GenerationRequest]], reuse: bool) -> dict:
    backend.prefix_reuse = reuse
    row_steps = [0]

    def count(module, args, kwargs) -> None:
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[-1] == 1:  # a decode step: every row of the batch is computed
            row_steps[0] += ids.shape[0]

    hook = backend.model.register_forward_pre_hook(count, with_kwargs=True)
    t0 = time.perf_counter()
    try:
        results = [backend.generate(reqs) for reqs in shards]
    finally:
        hook.remove()
    wall = time.perf_counter() - t0
    flat = [(q, r) for reqs, res in zip(shards, results, strict=True) for q, r in zip(reqs, res, strict=True)]
    assert all(r.error is None for _, r in flat), [r.error for _, r in flat if r.error]
    return {
        "rows": sum(q.n for q, _ in flat),
        "per_continuation": sum(q.n * r.prompt_tokens for q, r in flat),
        "requested": sum(r.prompt_tokens_requested for _, r in flat),
        "computed": sum(r.prompt_tokens_computed for _, r in flat),
        "gen_tokens": sum(s.num_tokens for _, r in flat for s in r.samples),
        "wall_s": wall,
        # Rows computed per decode step that were still generating: what refilling finished rows could recover.
        # The first token of each row comes from the prefill, so it is not a decode row-step.
        "occupancy": (sum(s.num_tokens for _, r in flat for s in r.samples) - sum(q.n for q, _ in flat))
        / max(1, row_steps[0]),
        "ids": [[s.token_ids for s in r.samples] for _, r in flat],
    }


def report(name: str, shards: list[list[GenerationRequest]], backend: HFBackend) -> None:
    off, on = run(backend, shards, reuse=False), run(backend, shards, reuse=True)
    same = off["ids"] == on["ids"]
    num = sum(len(s) for s in shards)
    print(f"\n{name}: {num} requests, {off['rows']} continuations, {len(shards)} generate calls")
    print(f"  {'':>10} {'per-cont.':>10} {'requested':>10} {'computed':>10} {'gen tok':>8} {'wall s':>7}")
    for label, r in (("reuse off", off), ("reuse on", on)):
        print(
            f"  {label:>10} {r['per_continuation']:>10} {r['requested']:>10} {r['computed']:>10} "
            f"{r['gen_tokens']:>8} {r['wall_s']:>7.1f}"
        )
    print(
        f"  computed: {off['per_continuation'] / on['computed']:.2f}x fewer than per-continuation prefill, "
        f"{off['computed'] / on['computed']:.2f}x fewer than per-request prefill; "
        f"wall {off['wall_s'] / on['wall_s']:.2f}x; identical continuations: {same}"
    )
    print(f"  decode batch occupancy (rows still generating / rows computed): {on['occupancy']:.0%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", default="synthetic,demo")
    p.add_argument("--problems", type=int, default=12, help="demo shape: number of demo problems")
    args = p.parse_args()
    recipe = Recipe.from_yaml(ROOT / "recipes" / "demo.yaml")
    home = Path(os.environ.get("CKPTDPO_HOME", Path.home() / ".cache" / "ckptdpo"))
    bcfg = recipe.backend.model_copy(update={"model": str(pull_demo(home))})
    backend = HFBackend(bcfg, home=home)
    print(f"cores: {os.cpu_count()}, torch threads {bcfg.threads}, dtype {bcfg.dtype}, demo model")
    shapes = args.shapes.split(",")
    if "synthetic" in shapes:
        cfg = ResampleConfig(policy="seed", max_tokens=32, temperature=0.8, top_p=0.95, seed=1)
        shards = [resample_requests([synthetic_trajectory(backend)], cfg)]
        report("synthetic 11-checkpoint trajectory", shards, backend)
    if "demo" in shapes:
        shards = demo_shards(backend, recipe, args.problems)
        report(f"demo resample round 1 ({args.problems} problems)", shards, backend)


if __name__ == "__main__":
    main()

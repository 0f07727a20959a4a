"""Rollouts the values stage spends with binary search against exhaustive probing, on planted trajectories.

Trajectories with 8, 68 (the seed's median paragraph count) and 300 checkpoints, each with a planted value curve (the
fake backend continues the prefix at checkpoint i with exactly the planted share of correct continuations), and a
spread of critical indices from 1 to n plus "none". Two curve shapes: a step (0.75 before the critical checkpoint,
0.125 from it) and a ramp (falling linearly from 0.875 to 0, crossing 0.5 at the critical checkpoint). Both searches
run through `ckptdpo.values.estimate_values` with the real verifier (`verify_batch`, answer_format boxed), side by
side on the same trajectories; the script prints rollouts used, probes, rounds, whether both found the planted
critical index, and wall seconds.

    python benchmarks/values_search.py [--sizes 8,68,300] [--per-size 12] [--rollouts 8]
"""

from __future__ import annotations

import argparse
import functools
import os
import time

from ckptdpo.backends.fake import FakeBackend
from ckptdpo.configs import ValuesConfig
from ckptdpo.values import estimate_values
from ckptdpo.verify import verify_batch
from tests.unit.test_values import plant

verify = functools.partial(verify_batch, timeout_s=20.0, workers=1, answer_format="boxed")


def critical_indices(n: int, k: int) -> list[int | None]:
    """k critical indices spread from 1 to n, plus None (no checkpoint below the threshold)."""
    if k >= n:
        return [*range(1, n + 1), None]
    return sorted({1 + round(j * (n - 1) / (k - 1)) for j in range(k)}) + [None]


def ramp(n: int, critical: int | None, rollouts: int) -> list[float]:
    """Rates falling linearly from 0.875 to 0, in units of 1/rollouts, first below 0.5 at `critical`."""
    if critical is None:
        return [0.875] * n
    out = []
    for i in range(1, n + 1):
        # at or above 0.5 before the critical checkpoint, below it from there, non-increasing throughout
        if i < critical:
            share = 0.875 - 0.375 * (i - 1) / max(1, critical - 1)
        else:
            share = 0.375 * (n - i) / max(1, n - critical)
        out.append(round(share * rollouts) / rollouts)
    return out


def step(n: int, critical: int | None, rollouts: int) -> list[float]:
    return [0.125 if critical is not None and i >= critical else 0.75 for i in range(1, n + 1)]


def measure(n: int, per_size: int, rollouts: int, shape) -> dict:
    planted = [
        (c, *plant(f"n{n}-c{c}", shape(n, c, rollouts), rollouts=rollouts)) for c in critical_indices(n, per_size)
    ]
    backend = FakeBackend({"continuations": [r for _, _, rules in planted for r in rules]})
    trajectories = [t for _, t, _ in planted]
    planted_critical = {t["sample_id"]: c for c, t, _ in planted}
    out = {}
    for search in ("binary", "exhaustive"):
        t0 = time.perf_counter()
        res = estimate_values(trajectories, ValuesConfig(search=search, rollouts=rollouts), backend, verify)
        wall = time.perf_counter() - t0
        rows = res.trajectories
        out[search] = {
            "rollouts": sum(r["rollouts_used"] for r in rows),
            "probes": sum(r["probed"] for r in rows),
            "max_probes": max(r["probed"] for r in rows),
            "rounds": res.stats["rounds"],
            "found": sum(r["critical_index"] == planted_critical[r["sample_id"]] for r in rows),
            "trajectories": len(rows),
            "worst_ratio": None,
            "wall_s": wall,
            "per_trajectory": {r["sample_id"]: r["rollouts_used"] for r in rows},
        }
    b, e = out["binary"]["per_trajectory"], out["exhaustive"]["per_trajectory"]
    out["binary"]["worst_ratio"] = max(b[s] / e[s] for s in b)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,68,300")
    parser.add_argument("--per-size", type=int, default=12, help="critical indices per size (plus 'none')")
    parser.add_argument("--rollouts", type=int, default=8)
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}, load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    header = "| shape | checkpoints | trajectories | binary rollouts | exhaustive rollouts | binary / exhaustive | "
    header += "worst per trajectory | binary probes per trajectory (max) | planted critical found (b / e) | "
    header += "wall s (b / e) |"
    print(header)
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for shape in (step, ramp):
        for n in (int(x) for x in args.sizes.split(",")):
            m = measure(n, args.per_size, args.rollouts, shape)
            b, e = m["binary"], m["exhaustive"]
            print(
                f"| {shape.__name__} | {n} | {b['trajectories']} | {b['rollouts']:,} | {e['rollouts']:,} | "
                f"**{b['rollouts'] / e['rollouts']:.1%}** | {b['worst_ratio']:.1%} | "
                f"{b['probes'] / b['trajectories']:.1f} ({b['max_probes']}) | "
                f"{b['found']}/{b['trajectories']} / {e['found']}/{e['trajectories']} | "
                f"{b['wall_s']:.2f} / {e['wall_s']:.2f} |"
            )


if __name__ == "__main__":
    main()

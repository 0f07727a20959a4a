"""What a resampling schedule would yield, estimated from the values stage's own rollouts (no extra generation)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ckptdpo.configs import ResampleConfig
from ckptdpo.resample import plan_slots


def compare_schedules(
    trajectories: Iterable[dict[str, Any]],
    values: Iterable[Mapping[str, Any]],
    cfg: ResampleConfig,
    threshold: float = 0.5,
    baseline: str = "seed",
) -> dict[str, Any]:
    """Expected first-round r2w/w2r pairs per 1k generated tokens of a fixed schedule and of `policy: value`.

    A checkpoint's rollouts in the values stage are draws from the same distribution resampling draws from, so a
    draw there yields a w2r pair with probability successes / rollouts (from a wrong trajectory) and an r2w pair with
    probability incorrect / rollouts (from a correct one), at completion_tokens / rollouts tokens. Summed over each
    schedule's draws this compares the schedules on the same data. Only trajectories where every checkpoint either
    schedule draws from was probed are counted (with binary search that is few; with exhaustive, all), the others
    are reported as `skipped`. Later rounds (redraws of slots without a pair) are not modelled.

    Returns {"trajectories", "skipped", baseline: stats, "value": stats}, stats being {"draws", "expected_pairs",
    "expected_tokens", "pairs_per_1k_tokens"} (None per 1k when no tokens).
    """
    by_sample: dict[str, dict[int, Mapping[str, Any]]] = defaultdict(dict)
    for r in values:
        by_sample[r["sample_id"]][int(r["checkpoint_index"])] = r
    fixed = cfg.model_copy(update={"policy": baseline})
    guided = cfg.model_copy(update={"policy": "value"})
    totals = {name: {"draws": 0, "expected_pairs": 0.0, "expected_tokens": 0.0} for name in (baseline, "value")}
    used = skipped = 0
    for t in trajectories:
        probed = by_sample.get(t["sample_id"], {})
        plans = {
            baseline: plan_slots(t, fixed),
            "value": plan_slots(t, guided, list(probed.values()), threshold),
        }
        if not plans[baseline]:
            continue  # not resampled at all (its verdict, no checkpoint, or its direction is off)
        if any(s.checkpoint_index not in probed for slots in plans.values() for s in slots):
            skipped += 1
            continue
        used += 1
        for name, slots in plans.items():
            for s in slots:
                r = probed[s.checkpoint_index]
                hits = r["successes"] if s.direction == "w2r" else r["incorrect"]
                totals[name]["draws"] += s.draws
                totals[name]["expected_pairs"] += s.draws * hits / r["rollouts"]
                totals[name]["expected_tokens"] += s.draws * r["completion_tokens"] / r["rollouts"]
    out: dict[str, Any] = {"trajectories": used, "skipped": skipped}
    for name, t in totals.items():
        per_1k = 1000 * t["expected_pairs"] / t["expected_tokens"] if t["expected_tokens"] else None
        out[name] = {
            "draws": t["draws"],
            "expected_pairs": round(t["expected_pairs"], 3),
            "expected_tokens": round(t["expected_tokens"], 1),
            "pairs_per_1k_tokens": None if per_1k is None else round(per_1k, 4),
        }
    return out


def rows_by_sample(values: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """VALUES rows grouped by sample_id (what `plan_slots(..., values=...)` takes per trajectory)."""
    out: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in values:
        out[r["sample_id"]].append(r)
    return dict(out)

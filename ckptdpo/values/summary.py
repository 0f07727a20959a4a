"""The values stage's section of stats.json and its one-line headline."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ckptdpo.summary import describe
from ckptdpo.values.pairs import PAIR_TYPE


def summarize_values(
    values: Sequence[Mapping[str, Any]],
    trajectories: Sequence[Mapping[str, Any]],
    pairs: Sequence[Mapping[str, Any]] = (),
    counters: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """stats.json `values` from the stage's VALUES, VALUE_TRAJECTORIES and (critical) PAIRS rows.

    `exhaustive_rollouts` is what probing every checkpoint of the same trajectories with the same rollouts would
    have cost; `rollouts_share_of_exhaustive` compares the search with it. `critical_relative_position` is
    critical_index / num_checkpoints. `counters` (summed `ValuesResult.stats` of the shards) are copied in.
    """
    checkpoints = sum(t["num_checkpoints"] for t in trajectories)
    probed = sum(t["probed"] for t in trajectories)
    used = sum(t["rollouts_used"] for t in trajectories)
    per_probe = {r["sample_id"]: r["rollouts"] for r in values}
    exhaustive = sum(t["num_checkpoints"] * per_probe.get(t["sample_id"], 0) for t in trajectories)
    critical = [t for t in trajectories if t["critical_index"] is not None]
    critical_pairs = [p for p in pairs if p["pair_type"] == PAIR_TYPE]
    ratios = [p["chosen_tokens"] / p["rejected_tokens"] for p in critical_pairs if p["rejected_tokens"]]
    stats: dict[str, Any] = {
        "trajectories": len(trajectories),
        "by_status": dict(sorted(Counter(t["status"] for t in trajectories).items())),
        "search": dict(sorted(Counter(t["search"] for t in trajectories).items())),
        "checkpoints": checkpoints,
        "probed": probed,
        "probed_share": round(probed / checkpoints, 4) if checkpoints else None,
        "rollouts_used": used,
        "exhaustive_rollouts": exhaustive,
        "rollouts_share_of_exhaustive": round(used / exhaustive, 4) if exhaustive else None,
        "critical_found": len(critical),
        "unresolved": sum(not t["resolved"] for t in trajectories),
        "critical_relative_position": describe([t["critical_index"] / t["num_checkpoints"] for t in critical]),
        "mean_value": round(statistics.fmean(r["value"] for r in values), 4) if values else None,
        "critical_pairs": len(critical_pairs),
        "critical_pair_length_ratio": describe(ratios),
    }
    for key, value in (counters or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            stats[key] = value
    return stats


def values_headline(stats: Mapping[str, Any]) -> str:
    """One line for the CLI: trajectories, rollouts against exhaustive, critical points found, pairs."""
    searches = "/".join(stats.get("search") or {}) or "-"
    # An exhaustive search is its own yardstick: the share says something only when something else ran.
    share = None if searches == "exhaustive" else stats.get("rollouts_share_of_exhaustive")
    probed = stats.get("probed_share")
    return (
        f"{stats.get('trajectories', 0)} trajectories ({searches}), {stats.get('rollouts_used', 0):,} rollouts"
        + (f" ({share:.0%} of exhaustive)" if share is not None else "")
        + f", {stats.get('critical_found', 0)} critical points"
        + (f", {probed:.0%} of checkpoints probed" if probed is not None else "")
        + f", {stats.get('critical_pairs', 0)} critical pairs"
    )

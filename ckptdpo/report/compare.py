"""`ckptdpo compare RUN_A RUN_B`: two runs' eval metrics side by side, with paired bootstrap intervals of B - A."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptdpo.errors import UserError
from ckptdpo.report.data import eval_section, run_intervals
from ckptdpo.shards import read_stats

# The efficiency of run B against run A on the same problems, (acc_B/acc_A) x (tokens_A/tokens_B): not either run's
# own eta (which is against its own reference model), so it gets its own label.
ETA_B_VS_A = "eta of B vs A"
COMPARED = (
    ("pass@1", lambda m: m.get("pass_at_1")),
    ("mean tokens", lambda m: m.get("mean_tokens")),
    ("mean tokens (incorrect)", lambda m: m.get("mean_tokens_incorrect")),
    ("length share", lambda m: m.get("length_share")),
    ("loop share", lambda m: m.get("loop_share")),
    ("eta", lambda m: m.get("eta")),
    ("AES", lambda m: m.get("aes")),
)


def read_eval_section(run_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory; pass two run directories.")
    section = eval_section(read_stats(run_dir))
    if not section:
        raise UserError(f"{run_dir}: stats.json has no eval section; run the eval stage there first.")
    return section


def compare_rows(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, str, str, Any, Any]]:
    """(benchmark, model, metric, value in A, value in B) for every metric of every (benchmark, model) in either."""
    out = []
    keys = list(dict.fromkeys([(bn, mn) for s in (a, b) for bn, ms in s.items() for mn in ms]))
    for bench, model in keys:
        ma, mb = (s.get(bench, {}).get(model) for s in (a, b))
        ks = sorted({int(k) for m in (ma, mb) if m for k in m.get("pass_at_k") or {}})
        metrics = list(COMPARED[:1])
        metrics += [(f"pass@{k}", lambda m, k=k: (m.get("pass_at_k") or {}).get(str(k))) for k in ks if k > 1]
        metrics += [(f"cons@{k}", lambda m, k=k: (m.get("cons_at_k") or {}).get(str(k))) for k in ks]
        metrics += list(COMPARED[1:])
        for label, get in metrics:
            out.append((bench, model, label, get(ma) if ma else None, get(mb) if mb else None))
    return out


def compare_intervals(
    run_a: Path, run_b: Path, a: Mapping[str, Any], b: Mapping[str, Any]
) -> dict[tuple[str, str, str], dict[str, Any]]:
    """{(benchmark, model, metric label): interval of B - A} for pass@1, pass@k and mean tokens, and of B's
    efficiency against A (`ETA_B_VS_A`, no change = 1), paired by problem over the problems both runs evaluated."""
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for bench, models in a.items():
        for model, ma in models.items():
            mb = (b.get(bench) or {}).get(model)
            if not mb:
                continue
            ks = sorted({int(k) for m in (ma, mb) for k in m.get("pass_at_k") or {}})
            iv = run_intervals(Path(run_a), Path(run_b), bench, model, ks)
            if iv is None:
                continue
            out[(bench, model, "pass@1")] = iv["pass_at_1"]
            for k, v in (iv.get("pass_at_k") or {}).items():
                out[(bench, model, f"pass@{k}")] = v
            out[(bench, model, "mean tokens")] = iv["mean_tokens"]
            out[(bench, model, ETA_B_VS_A)] = iv["eta"]
    return out

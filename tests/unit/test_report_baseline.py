"""The cost-matched baseline in the report and in `ckptdpo compare`: base, DPO and GRPO side by side with their
costs, paired intervals of every comparison, and a headline that names the leader and says whether it is
significant; on a synthetic run directory written with the real schemas."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from ckptdpo import evaluate
from ckptdpo.grpo import factory_generated_tokens
from ckptdpo.report import cost_matched_view, pair_intervals, section_cost_matched
from ckptdpo.schemas import EVAL_SAMPLES
from ckptdpo.shards import read_stats, update_stats, write_manifest, write_shard
from commands.cli import main
from tests.unit.test_report import as_table, eval_rows, make_run

GRPO_SUMMARY = {
    "method": "grpo",
    "generation_budget": 1200,
    "budget_setting": "match",
    "generated_tokens": 1190,
    "trained_tokens": 5400,
    "global_step": 3,
    "stopped_by": "budget",
    "wall_time_s": 42.0,
    "completions": 24,
    "skipped_completions": 1,
    "steps": [
        {"step": s, "generated_tokens": g, "completion_length": g / 8, "reward_mean": r, "skipped_share": k}
        for s, g, r, k in ((1, 500, 0.25, 0.0), (2, 450, 0.5, 0.125), (3, 240, None, None))
    ],
}


def add_grpo(run_dir: Path, gain: float, seed: int = 1) -> dict:
    """A third evaluated model, `grpo`, solving each problem `gain` more often than the base; its summary.json."""
    rng = random.Random(seed)
    stats = read_stats(run_dir)
    section = stats["eval"]
    for bench, models in section.items():
        base_rows = [r for r in _rows(run_dir, bench, "base")]
        per_problem = {}
        for r in base_rows:
            per_problem.setdefault(r["problem_id"], []).append(r["status"] == "correct")
        accuracies = [
            min(1.0, sum(v) / len(v) + gain) for _, v in sorted(per_problem.items(), key=lambda kv: int(kv[0][1:]))
        ]
        rows = eval_rows(rng, bench, "grpo", accuracies, 250)
        stage = run_dir / "eval" / bench / "grpo"
        write_shard(stage, 0, as_table(rows, EVAL_SAMPLES))
        metrics = evaluate.aggregate_shards([as_table(rows, EVAL_SAMPLES)], 8, [1, 2, 4, 8])
        write_manifest(stage, config_hash="synthetic", stats=metrics)
        models = {**models, "grpo": metrics}
        scores = evaluate.compare_to_reference(models, "base")
        section[bench] = {n: {**m, **scores[n]} for n, m in models.items()}
    update_stats(run_dir, "eval", section)
    (run_dir / "grpo").mkdir(exist_ok=True)
    (run_dir / "grpo" / "summary.json").write_text(json.dumps(GRPO_SUMMARY))
    return section


def _rows(run_dir: Path, bench: str, model: str) -> list[dict]:
    from ckptdpo.report import read_eval_rows

    return read_eval_rows(run_dir, bench, model)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run_dir = make_run(tmp_path_factory.mktemp("baseline") / "run", gain=0.3)
    add_grpo(run_dir, gain=0.0)
    return run_dir


def test_three_models_side_by_side_with_costs(run):
    view = cost_matched_view(run)
    stats = read_stats(run)
    header, rows = view["models"]
    assert [r[1] for r in rows[:3]] == ["base", "DPO on the factory's pairs", "GRPO at matched cost"]
    assert {
        "pass@1",
        "pass@k",
        "gap (pass@k − pass@1)",
        "mean tokens",
        "eta",
        "AES",
        "generated tokens (cost)",
    } <= set(header)
    col = header.index("generated tokens (cost)")
    assert rows[1][col] == f"{factory_generated_tokens(stats):,}" and rows[2][col] == "1,190"
    gap = header.index("gap (pass@k − pass@1)")
    (grpo_math,) = [r for r in rows if r[0] == "math" and r[1].startswith("GRPO")]
    m = stats["eval"]["math"]["grpo"]
    assert grpo_math[header.index("pass@k")] == f"pass@8 {m['pass_at_k']['8']:.3f}"
    assert float(grpo_math[gap]) == pytest.approx(m["pass_at_k"]["8"] - m["pass_at_1"], abs=1e-3)
    assert (
        "GRPO's budget was 1,200 tokens (matched to the factory's); it generated 1,190 (99.2%" in view["budget_text"]
    )


def test_every_comparison_has_its_paired_interval_and_the_headline_names_the_leader(run):
    section = read_stats(run)["eval"]
    view = cost_matched_view(run)
    _, rows = view["comparisons"]
    assert [r[1] for r in rows if r[0] == "math"] == ["DPO − base", "GRPO − base", "DPO − GRPO"]
    ivs = pair_intervals(run, section, "grpo", "trained")
    for bench, line in zip(section, view["headline"], strict=True):
        iv = ivs[bench]["pass_at_1"]
        shown = section[bench]["trained"]["pass_at_1"] - section[bench]["grpo"]["pass_at_1"]
        # The interval's estimate is the difference the tables show (same problems for both models).
        assert iv["estimate"] == pytest.approx(shown, abs=1e-6)
        leader = "DPO" if iv["estimate"] > 0 else "GRPO"
        verdict = "significant" if iv["significant"] else "not significant"
        assert line.startswith(f"{bench}: DPO on the factory's pairs pass@1") and f"{leader} ahead, {verdict}" in line
        assert "generated tokens: factory" in line and "GRPO 1,190 (budget 1,200)" in line
    # DPO trained with a +0.3 gain per problem, GRPO with none: DPO is ahead, and with 20 problems significantly.
    assert all("DPO ahead, significant" in line for line in view["headline"])


def test_report_section_and_compare_show_the_same(run, capsys, monkeypatch):
    page = section_cost_matched(run)
    for text in ("GRPO at matched cost", "DPO − GRPO", "GRPO − base", "DPO ahead, significant", "1,190"):
        assert text in page
    data = [
        json.loads(m) for m in re.findall(r'<script type="application/json" class="figure-data">(.*?)</script>', page)
    ]
    assert data and data[0]["alt"] == "GRPO reward and generated tokens per step"
    for ax in data[0]["axes"]:  # every plotted point lies on its axes
        (x0, x1), (y0, y1) = ax["xlim"], ax["ylim"]
        assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in ax["points"]), ax
    monkeypatch.setenv("COLUMNS", "300")  # rich folds long cells in a narrow terminal
    assert main(["compare", str(run), str(run)]) == 0
    out = capsys.readouterr().out
    assert "DPO − GRPO" in out and "GRPO at matched cost" in out and "DPO ahead, significant" in out


def test_a_run_without_grpo_says_so(tmp_path):
    run_dir = make_run(tmp_path / "run")
    assert cost_matched_view(run_dir) is None
    assert "not run: no grpo stage" in section_cost_matched(run_dir)

"""The run report and `ckptdpo compare`, on synthetic run directories written with the real schemas."""

from __future__ import annotations

import base64
import io
import json
import math
import random
import re
import shutil
import struct
from pathlib import Path

import pytest
from rich.console import Console

from ckptdpo import evaluate, summary
from ckptdpo.metrics import wilson_interval
from ckptdpo.report import (
    CSS,
    benchmark_kinds,
    build_report,
    compare_intervals,
    compare_rows,
    dto_figures,
    eval_intervals,
    headline,
    headline_markdown,
    load_dto_results,
    load_pairs,
    read_eval_section,
    render_report,
    section_dto,
    section_pair_quality,
)
from ckptdpo.report.evaluation import section_accuracy_tokens, section_tables
from ckptdpo.schemas import (
    ATTEMPTS,
    CHECKPOINTS,
    DTO_RESULTS,
    EVAL_SAMPLES,
    PAIRS,
    SAMPLES,
    VALUE_TRAJECTORIES,
    VALUES,
    VERDICTS,
    make_table,
)
from ckptdpo.shards import atomic_write_bytes, update_stats, write_manifest, write_shard
from ckptdpo.values import summarize_values
from commands.cli import main
from commands.report import compare_table
from tasks.registry import report_sections

SECTIONS = [
    "overview",
    "lengths",
    "checkpoints",
    "values",
    "rounds",
    "dto",
    "pairs",
    "pairquality",
    "training",
    "grpo",
    "passk",
    "acctokens",
    "metrics",
]
PLOTTED = SECTIONS[1:12]


def as_table(rows: list[dict], schema):
    """The rows as a table of `schema`; columns the report does not read (added by other stages' work) are None."""
    return make_table([{**dict.fromkeys(schema.names), **r} for r in rows], schema)


def _stage(run_dir: Path, stage: str, rows: list[dict], schema) -> None:
    write_shard(run_dir / stage, 0, as_table(rows, schema))
    write_manifest(run_dir / stage, config_hash="synthetic")


def eval_rows(rng: random.Random, bench: str, model: str, accuracies: list[float], tokens: int) -> list[dict]:
    """EVAL_SAMPLES rows: 8 samples for each problem, problem p solved with probability accuracies[p]."""
    rows = []
    for p, accuracy in enumerate(accuracies):
        for j in range(8):
            ok = rng.random() < accuracy
            rows.append(
                {
                    "benchmark": bench,
                    "model_name": model,
                    "model": model,
                    "problem_id": f"p{p}",
                    "sample_index": j,
                    "completion": "",
                    "completion_tokens": rng.randint(tokens // 2, tokens * 2),
                    "finish_reason": "stop" if rng.random() < 0.9 else "length",
                    "status": "correct" if ok else "incorrect",
                    "is_correct": ok,
                    "extracted": "1" if ok else str(rng.randint(2, 4)),
                }
            )
    return rows


def write_eval(run_dir: Path, rng: random.Random, gain: float, kinds: dict[str, str] | None = None) -> dict:
    """Two benchmarks, base and trained, each (benchmark, model) a real eval stage: shards and a manifest with its
    metrics; the trained model solves every problem `gain` more often than the base."""
    kinds = kinds or {"math": "math", "gsm": "math"}
    section = {}
    for bench in kinds:
        difficulty = [rng.uniform(0.1, 0.7) for _ in range(20)]
        metrics = {}
        for name, shift, tokens in (("base", 0.0, 300), ("trained", gain, 200)):
            rows = eval_rows(rng, bench, name, [min(1.0, d + shift) for d in difficulty], tokens)
            stage = run_dir / "eval" / bench / name
            write_shard(stage, 0, as_table(rows, EVAL_SAMPLES))
            metrics[name] = evaluate.aggregate_shards([as_table(rows, EVAL_SAMPLES)], 8, [1, 2, 4, 8])
            write_manifest(stage, config_hash="synthetic", stats=metrics[name])
        scores = evaluate.compare_to_reference(metrics, "base")
        section[bench] = {name: {**m, **scores[name]} for name, m in metrics.items()}
    update_stats(run_dir, "eval", section)
    benchmarks = {b: {"num_problems": 20, "kind": k} for b, k in kinds.items()}
    stats = {"reference": "base", "skipped_models": {"other": "no such model"}, "benchmarks": benchmarks}
    write_manifest(run_dir / "eval", config_hash="synthetic", stats=stats)
    return section


def make_run(run_dir: Path, seed: int = 0, gain: float = 0.15, kinds: dict[str, str] | None = None) -> Path:
    """Every stage's output in miniature: shards with the real schemas, stats.json, the training summary."""
    rng = random.Random(seed)
    samples, verdicts, cps = [], [], []
    for p in range(12):
        for j in range(4):
            sid, ok = f"s{p}-{j}", rng.random() < 0.5
            tokens = rng.randint(50, 400) if ok else rng.randint(200, 1200)
            n_cp = rng.randint(0, 4) if ok else rng.randint(1, 12)
            samples.append(
                {
                    "sample_id": sid,
                    "problem_id": f"p{p}",
                    "sample_index": j,
                    "seed": 1,
                    "prompt": "q",
                    "completion": "x",
                    "prompt_tokens": 5,
                    "completion_tokens": tokens,
                    "finish_reason": "stop" if tokens < 1100 else "length",
                    "model": "m",
                }
            )
            verdicts.append(
                {
                    "sample_id": sid,
                    "problem_id": f"p{p}",
                    "status": "correct" if ok else "incorrect",
                    "is_correct": ok,
                    "extracted": "1",
                }
            )
            cps.append(
                {
                    "sample_id": sid,
                    "problem_id": f"p{p}",
                    "is_correct": ok,
                    "completion_tokens": tokens,
                    "num_paragraphs": n_cp + 3,
                    "num_checkpoints": n_cp,
                    "checkpoint_chars": list(range(n_cp)),
                    "checkpoint_markers": ["Wait"] * n_cp,
                }
            )
    _stage(run_dir, "generate", samples, SAMPLES)
    _stage(run_dir, "verify", verdicts, VERDICTS)
    _stage(run_dir, "checkpoints", cps, CHECKPOINTS)
    pairs, attempts_by_round = [], {1: [], 2: []}
    with_cps = [c for c in cps if c["num_checkpoints"]]
    for i, c in enumerate(with_cps):
        rnd = 1 + i % 2
        kind = "r2w" if c["is_correct"] else "w2r"
        for _ in range(3):
            attempts_by_round[rnd].append(
                {
                    "direction": kind,
                    "source_sample_id": c["sample_id"],
                    "checkpoint_index": 1,
                    "status": "incorrect",
                    "finish_reason": "stop",
                    "completion_tokens": rng.randint(20, 200),
                }
            )
        if i % 3:
            continue
        pairs.append(pair(kind, c, rng.randint(1, c["num_checkpoints"]), rnd, rng))
    value_rows, value_trajectories = [], []
    for c in [c for c in with_cps if not c["is_correct"]]:
        n, critical = c["num_checkpoints"], rng.randint(1, c["num_checkpoints"])
        for i in range(1, n + 1):
            successes = 6 if i < critical else 1
            low, high = wilson_interval(successes, 8)
            value_rows.append({"sample_id": c["sample_id"], "problem_id": c["problem_id"], "checkpoint_index": i,
                               "checkpoint_char": i, "rollouts": 8, "successes": successes, "value": successes / 8,
                               "ci_low": low, "ci_high": high})  # fmt: skip
        value_trajectories.append({"sample_id": c["sample_id"], "problem_id": c["problem_id"], "status": "incorrect",
                                   "is_correct": False, "num_checkpoints": n, "probed": n, "rollouts_used": 8 * n,
                                   "search": "exhaustive", "resolved": True, "critical_index": critical})  # fmt: skip
        pairs.append(pair("critical", c, max(critical - 1, 1), None, rng))
    _stage(run_dir, "values", value_rows, VALUES)
    _stage(run_dir, "values/trajectories", value_trajectories, VALUE_TRAJECTORIES)
    update_stats(run_dir, "values", summarize_values(value_rows, value_trajectories, pairs) | {"threshold": 0.5})
    optimized = []
    for c in [c for c in cps if c["is_correct"]]:
        status = rng.choice(["pruned", "truncated", "no_exit"])
        cut = int(c["completion_tokens"] * rng.uniform(0.3, 0.9)) if status != "no_exit" else 0
        optimized.append(dto_row(c, status, cut, int(cut * rng.uniform(0.6, 1.0)) if status == "pruned" else cut))
        if status != "no_exit" and len([p for p in pairs if p["pair_type"] == "dto"]) < 8:
            pairs.append(pair("dto", c, 1, None, rng))
    write_shard(run_dir / "dto" / "optimized", 0, as_table(optimized, DTO_RESULTS))
    _stage(run_dir, "dto", [p for p in pairs if p["pair_type"] == "dto"], PAIRS)
    _stage(run_dir, "pairs", pairs, PAIRS)
    write_manifest(run_dir / "pairs", config_hash="synthetic", stats=summary.summarize_pairs(pairs, 50_000))
    _stage(run_dir, "resample/round-01", [], ATTEMPTS)
    update_stats(run_dir, "problems", {"num_problems": 12, "num_invalid": 0, "source": "demo"})
    update_stats(run_dir, "generate", summary.summarize_generate(samples))
    update_stats(run_dir, "verify", summary.summarize_verify(verdicts))
    update_stats(run_dir, "checkpoints", summary.summarize_checkpoints(cps))
    rounds = [{"round": r, **summary.summarize_round(a)} for r, a in attempts_by_round.items()]
    update_stats(run_dir, "resample", {"rounds": rounds, "pairs": summary.summarize_pairs(pairs, 50_000)})
    update_stats(
        run_dir, "dto", {"segments_judged": 14, "segments_removed": 3, "judge_parse_failures": 2, "num_pairs": 8}
    )
    steps = [
        {
            "step": s,
            "loss": 0.69 * 0.9**s,
            "rewards_margins": 0.05 * s,
            "rewards_accuracies": min(1, 0.5 + s / 20),
            "learning_rate": 5e-7,
        }
        for s in range(1, 13)
    ]
    (run_dir / "train").mkdir(parents=True, exist_ok=True)
    (run_dir / "train" / "summary.json").write_text(
        json.dumps(
            {"loss": "dpo", "loss_type": "sigmoid", "steps": steps, "global_step": 12, "final_loss": steps[-1]["loss"]}
        )
    )
    update_stats(run_dir, "train", {"global_step": 12, "final_loss": round(steps[-1]["loss"], 4)})
    write_eval(run_dir, rng, gain, kinds)
    (run_dir / "recipe.yaml").write_text("name: synthetic\n")
    return run_dir


def pair(kind: str, c: dict, index: int, rnd: int | None, rng: random.Random) -> dict:
    chosen, rejected = rng.randint(20, 300), rng.randint(300, 900)
    return {
        "pair_id": f"{kind}-{c['sample_id']}",
        "pair_type": kind,
        "problem_id": c["problem_id"],
        "prompt": "q",
        "chosen": "a",
        "rejected": "b",
        "gold_answer": "1",
        "source_sample_id": c["sample_id"],
        "checkpoint_index": index,
        "prompt_tokens": 10,
        "chosen_tokens": chosen,
        "rejected_tokens": rejected,
        "round": rnd,
        "attempt_id": None,
        "model": "m",
    }


def dto_row(c: dict, status: str, truncated: int, pruned: int) -> dict:
    return {
        "sample_id": c["sample_id"], "problem_id": c["problem_id"], "status": status, "exit_kind": "checkpoint",
        "num_candidates": 3, "exit_index": 1 if truncated else None, "exit_char": 10 if truncated else None,
        "exit_probability": 0.9 if truncated else None, "reverify_probability": None, "num_segments": 2,
        "removed_segments": [], "truncated_text": None, "text": "t" if truncated else None,
        "original_tokens": c["completion_tokens"], "truncated_tokens": truncated, "pruned_tokens": pruned,
    }  # fmt: skip


def png_sizes(page: str) -> list[tuple[int, int]]:
    sizes = []
    for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page):
        raw = base64.b64decode(data)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        sizes.append(struct.unpack(">II", raw[16:24]))
    return sizes


def figure_data(page: str) -> list[dict]:
    return [
        json.loads(x) for x in re.findall(r'<script type="application/json" class="figure-data">(.*?)</script>', page)
    ]


def points_outside(fig: dict) -> list[tuple[str, list[float]]]:
    """Plotted points outside their axes' limits, and markers not strictly inside them (a marker on the edge is
    drawn cut in half); log axes compared in log space."""
    out = []
    for ax in fig["axes"]:
        (x0, x1), (y0, y1) = sorted(ax["xlim"]), sorted(ax["ylim"])
        for x, y in ax["points"]:
            if not (x0 <= x <= x1 and y0 <= y <= y1):
                out.append((ax["title"] or ax["xlabel"], [x, y]))
        scale = (lambda v: math.log(v)) if ax["xscale"] == "log" else (lambda v: v)
        lx0, lx1 = scale(x0), scale(x1)
        for x, y in ax["markers"]:
            mx, my = 0.01 * (lx1 - lx0), 0.01 * (y1 - y0)
            if not (lx0 + mx < scale(x) < lx1 - mx and y0 + my < y < y1 - my):
                out.append((ax["title"] or ax["xlabel"], [x, y]))
    return out


def sections_of(page: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="(\w+)">(.*?)</section>', page, re.S))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    from tests.unit.test_report_baseline import add_grpo

    run_dir = make_run(tmp_path_factory.mktemp("report") / "run")
    add_grpo(run_dir, gain=0.0)
    build_report(run_dir, report_sections())
    return run_dir


def test_full_report_draws_every_section(full_run: Path):
    page = (full_run / "report" / "index.html").read_text()
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in page
    assert "not run" not in page and "could not be drawn" not in page
    sizes = png_sizes(page)
    # One figure per plotted section; the values section draws two (value curves, and cost and positions).
    assert len(sizes) == len(PLOTTED) + 1 and all(w > 200 and h > 100 for w, h in sizes)
    sections = sections_of(page)
    assert all("<img" in sections[a] for a in PLOTTED)
    stats = json.loads((full_run / "stats.json").read_text())
    trained = stats["eval"]["math"]["trained"]
    # The metrics table shows the eval section's numbers: a row per (benchmark, model) with pass@1 and eta.
    table = sections["metrics"]
    assert f"<td>{trained['pass_at_1']:.3f}</td>" in table and f"<td>{trained['eta']:.3f}</td>" in table
    assert "model other not evaluated: no such model." in table and "not evaluated" in sections["passk"]
    assert "optimized trajectories; median reduction" in sections["dto"] and "8 DTO pairs" in sections["dto"]
    assert "Judge: 14 segments judged, 3 removed, 2 unparseable replies" in sections["dto"]
    assert "pass@8 − pass@1 gap" in sections["overview"] and re.search(
        "<th>all pairs</th><td>[^<]*dto 8", sections["overview"]
    )
    assert "ckptdpo report: synthetic" in page and 'rel="icon" href="data:,"' in page


def test_every_plot_carries_its_data_and_no_point_lies_outside_its_axes(full_run: Path):
    page = (full_run / "report" / "index.html").read_text()
    figures = figure_data(page)
    assert len(figures) == len(PLOTTED) + 1  # the values section draws two
    assert all(ax["points"] for fig in figures for ax in fig["axes"] if ax["title"] != "")
    assert [(f["alt"], points_outside(f)) for f in figures if points_outside(f)] == []
    # The accuracy-vs-tokens plot holds both models of each benchmark (the arrow's ends included).
    acc = next(f for f in figures if f["alt"].startswith("accuracy vs tokens"))
    stats = json.loads((full_run / "stats.json").read_text())["eval"]
    for ax in acc["axes"]:
        for m in stats[ax["title"]].values():
            assert [m["mean_tokens"], m["pass_at_1"]] in ax["points"]


def test_axes_hold_extreme_points(tmp_path: Path):
    """A far-out model (many more tokens, pass@1 of exactly 0 or 1) and a DTO text longer than its original (a late
    exit adds the exit sentence) still lie inside the drawn axes."""
    run_dir = make_run(tmp_path / "run")
    stats = json.loads((run_dir / "stats.json").read_text())
    stats["eval"]["math"]["trained"].update(mean_tokens=5000.0, pass_at_1=1.0)
    stats["eval"]["math"]["base"].update(pass_at_1=0.0)
    update_stats(run_dir, "eval", stats["eval"])
    rows = [
        dto_row({"sample_id": "x1", "problem_id": "p1", "completion_tokens": 100}, "truncated", 130, 130),
        dto_row({"sample_id": "x2", "problem_id": "p2", "completion_tokens": 100}, "pruned", 60, 20),
    ]
    page = section_accuracy_tokens(read_eval_section(run_dir))
    page += section_dto([(10, 50), (400, 30)], dto_figures(as_table(rows, DTO_RESULTS)), {})
    figures = figure_data(page)
    assert len(figures) == 2 and [(f["alt"], points_outside(f)) for f in figures if points_outside(f)] == []


def test_dto_figures_are_totals_over_optimized_trajectories(tmp_path: Path):
    """One definition: tokens before/after and the reduction count only trajectories DTO optimized (a no_exit one
    is not diluted in), the reduction is a positive share, and the plot's data are the captions' numbers."""
    run_dir = make_run(tmp_path / "run")
    c = {"problem_id": "p1", "completion_tokens": 1000}
    rows = [
        dto_row({**c, "sample_id": "a"}, "pruned", 600, 400),  # 1000 -> 600 -> 400
        dto_row({**c, "sample_id": "b"}, "truncated", 500, 500),  # 1000 -> 500
        dto_row({**c, "sample_id": "n"}, "no_exit", 0, 0),  # not optimized: not counted anywhere
    ]
    rows[2].update(truncated_tokens=1000, pruned_tokens=1000)  # what optimize_trajectories stores for no_exit
    write_shard(run_dir / "dto" / "optimized", 0, as_table(rows, DTO_RESULTS))
    section = section_dto([], dto_figures(load_dto_results(run_dir)), {})
    assert "DTO optimized 2 of 3 correct trajectories" in section
    assert (
        "2,000 → 1,100 after truncation → 900 after pruning, a reduction of 55% (45% from truncation alone)" in section
    )
    assert "2 optimized trajectories; median reduction 55%" in section  # (0.6 + 0.5) / 2
    fig = next(f for f in figure_data(section) if f["alt"] == "DTO token reductions")
    hist = fig["axes"][0]
    assert hist["xlim"][0] <= 0.5 and hist["xlim"][1] >= 0.6


def test_headline_carries_intervals_and_says_no_significant_change(tmp_path: Path):
    same = make_run(tmp_path / "same", seed=3, gain=0.0)
    lines = headline(read_eval_section(same), eval_intervals(same, read_eval_section(same)))
    assert len(lines) == 2 and all("95% CI" in line for line in lines)
    ivs = eval_intervals(same, read_eval_section(same))
    for bench, line in zip(("math", "gsm"), lines, strict=True):
        iv = ivs[bench]["trained"]["pass_at_1"]
        expected = "significant" if iv["significant"] else "no significant change"
        assert f"; {expected})" in line.split("pass@8")[0]
    assert any("pass@1" in line and "no significant change" in line.split(", pass@8")[0] for line in lines)

    better = make_run(tmp_path / "better", seed=3, gain=0.6)
    lines = headline(read_eval_section(better), eval_intervals(better, read_eval_section(better)))
    assert all("; significant)" in line.split(", pass@8")[0] for line in lines)
    assert "95% CI" in headline_markdown(better)


def test_intervals_bracket_the_shown_differences(full_run: Path):
    section = read_eval_section(full_run)
    ivs = eval_intervals(full_run, section)
    for bench, models in section.items():
        iv = ivs[bench]["trained"]
        shown = models["trained"]["pass_at_1"] - models["base"]["pass_at_1"]
        assert iv["pass_at_1"]["estimate"] == pytest.approx(shown, abs=1e-5)
        assert iv["pass_at_1"]["low"] <= shown <= iv["pass_at_1"]["high"]
        assert iv["eta"]["estimate"] == pytest.approx(models["trained"]["eta"], abs=1e-4)
        assert set(iv["pass_at_k"]) == {"2", "4", "8"}


def test_stored_intervals_are_used(full_run: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(full_run, run_dir)
    stats = json.loads((run_dir / "stats.json").read_text())["eval"]
    fake = {"estimate": 0.5, "low": 0.25, "high": 0.75, "null": 0.0, "significant": True}
    stats["math"]["trained"]["intervals"] = {"num_problems": 20, "pass_at_1": fake}
    update_stats(run_dir, "eval", stats)
    assert eval_intervals(run_dir, read_eval_section(run_dir))["math"]["trained"]["pass_at_1"] == fake


def test_tables_grouped_by_kind_with_a_cross_benchmark_table(tmp_path: Path):
    run_dir = make_run(tmp_path / "run", kinds={"math": "math", "humaneval": "code", "mmlu": "choice"})
    section = read_eval_section(run_dir)
    table = section_tables(section, benchmark_kinds(run_dir, section), eval_intervals(run_dir, section), "", "base")
    heads = re.findall(r"<h3>(.*?)</h3>", table)
    assert heads == ["math benchmarks", "code benchmarks", "choice benchmarks", "base vs trained, every benchmark"]
    parts = re.split(r"<h3>", table)
    assert "<td>humaneval</td>" in parts[2] and "<td>humaneval</td>" not in parts[1]
    cross = parts[4]
    assert cross.count("<td>base → trained</td>") == 3 and "[" in cross and "Δ" in cross
    # Every table sits in a wrapper that scrolls sideways, so the page itself never overflows.
    assert table.count('<div class="table-wrap"><table') == table.count("<table")
    assert ".table-wrap { max-width: 100%; overflow-x: auto; }" in CSS


def test_kind_absent_means_math(tmp_path: Path):
    run_dir = make_run(tmp_path / "run")
    m = json.loads((run_dir / "eval" / "_manifest.json").read_text())
    m["stats"]["benchmarks"] = {}
    atomic_write_bytes(run_dir / "eval" / "_manifest.json", json.dumps(m).encode())
    assert benchmark_kinds(run_dir, read_eval_section(run_dir)) == {"math": "math", "gsm": "math"}


def test_pair_quality_section(tmp_path: Path):
    run_dir = make_run(tmp_path / "run")
    section = section_pair_quality(load_pairs(run_dir), None)
    assert "median chosen/rejected" in section and "not recorded in stats.json" in section
    rows = [
        {"pair_type": "r2w", "chosen_tokens": 10, "rejected_tokens": 20, "chosen_extracted_from": "boxed",
         "rejected_extracted_from": "final_statement"},
        {"pair_type": "r2w", "chosen_tokens": 30, "rejected_tokens": 10, "chosen_extracted_from": "boxed",
         "rejected_extracted_from": "boxed"},
    ]  # fmt: skip
    quality = summary.summarize_pair_quality(rows, {"resample": {"over_max_pair_tokens": 2, "duplicate": 1}})
    update_stats(run_dir, "pair_quality", quality)
    section = section_pair_quality(
        load_pairs(run_dir), json.loads((run_dir / "stats.json").read_text())["pair_quality"]
    )
    assert (
        "r2w: chosen labels from boxed 2 (100%); rejected labels from boxed 1 (50%), final_statement 1 (50%)"
        in section
    )
    assert "resample: 5 candidate pairs; dropped by over_max_pair_tokens 2 (40%), duplicate 1 (20%)" in section


def test_missing_stages_show_not_run_notes(tmp_path: Path):
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    page = render_report(run_dir, report_sections())
    assert "<img" not in page and "could not be drawn" not in page
    assert page.count("not run") == len(PLOTTED) + 1  # every plot section, and the metrics table

    # Only generation and verification: lengths come from joining them, the rest is still missing.
    part = tmp_path / "partial"
    shutil.copytree(make_run(tmp_path / "full"), part)
    for stage in ("checkpoints", "values", "pairs", "resample", "dto", "train", "grpo", "eval", "stats.json"):
        target = part / stage
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    sections = sections_of(render_report(part, report_sections()))
    assert "<img" in sections["lengths"] and "48 trajectories" in sections["lengths"]
    assert all("not run" in sections[a] for a in PLOTTED[1:])


def test_report_cli(tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    update_stats(run_dir, "problems", {"num_problems": 3, "source": "demo"})
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report" / "index.html")
    assert "3 (demo)" in (run_dir / "report" / "index.html").read_text()
    assert [p.name for p in (run_dir / "report").iterdir()] == ["index.html"]  # written atomically: no temp left
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_headline_markdown_has_the_metrics_table(full_run: Path):
    md = headline_markdown(full_run)
    # A row per (benchmark, model): base, trained and the GRPO baseline.
    assert "| benchmark | model | problems | pass@1 |" in md and md.count("\n| math |") == 3


def test_compare_two_runs(tmp_path: Path, capsys):
    a = make_run(tmp_path / "a", seed=1, gain=0.0)
    b = make_run(tmp_path / "b", seed=1, gain=0.5)
    stats_a = json.loads((a / "stats.json").read_text())["eval"]
    stats_b = json.loads((b / "stats.json").read_text())["eval"]
    rows = {(bench, model, metric): (va, vb) for bench, model, metric, va, vb in compare_rows(stats_a, stats_b)}
    assert rows[("math", "trained", "pass@1")] == (
        stats_a["math"]["trained"]["pass_at_1"],
        stats_b["math"]["trained"]["pass_at_1"],
    )
    assert rows[("math", "base", "pass@1")][0] == rows[("math", "base", "pass@1")][1]  # same seed, same base
    assert {m for (_, _, m) in rows} >= {"pass@1", "pass@8", "cons@8", "mean tokens", "eta", "AES"}
    # A model only one run has shows up with a blank on the other side.
    stats_b["math"]["extra"] = stats_b["math"]["trained"]
    assert compare_rows(stats_a, stats_b)[-1][3] is None

    ivs = compare_intervals(a, b, stats_a, read_eval_section(b))
    assert ivs[("math", "trained", "pass@1")]["significant"] is True  # +0.5 on every problem
    assert ivs[("math", "base", "pass@1")]["estimate"] == 0 and not ivs[("math", "base", "pass@1")]["significant"]
    out = io.StringIO()
    Console(file=out, width=240).print(compare_table(a, b))
    text = out.getvalue()
    va, vb = stats_a["math"]["trained"]["pass_at_1"], stats_b["math"]["trained"]["pass_at_1"]
    delta = vb - va
    assert f"{va:.4f}" in text and f"{vb:.4f}" in text and f"{'+' if delta > 0 else ''}{delta:.4f}" in text
    iv = ivs[("math", "trained", "pass@1")]
    assert f"[{iv['low']:+.4f}, {iv['high']:+.4f}]" in text and "no significant change" in text
    assert main(["compare", str(a), str(b)]) == 0 and "95% CI" in capsys.readouterr().out
    (tmp_path / "c").mkdir()
    assert main(["compare", str(a), str(tmp_path / "c")]) == 2
    assert "no eval section" in capsys.readouterr().err

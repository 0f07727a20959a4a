"""The run report and `ckptdpo compare`, on synthetic run directories written with the real schemas."""

from __future__ import annotations

import base64
import io
import json
import random
import re
import shutil
import struct
from pathlib import Path

import pytest
from rich.console import Console

from ckptdpo import evaluate, summary
from ckptdpo.report import build_report, compare_rows, headline_markdown, render_report
from ckptdpo.schemas import (
    ATTEMPTS,
    CHECKPOINTS,
    DTO_RESULTS,
    EVAL_SAMPLES,
    PAIRS,
    SAMPLES,
    VERDICTS,
    make_table,
)
from ckptdpo.shards import atomic_write_bytes, update_stats, write_manifest, write_shard
from commands.cli import main
from commands.report import compare_table

SECTIONS = [
    "overview",
    "lengths",
    "checkpoints",
    "pairs",
    "rounds",
    "dto",
    "training",
    "passk",
    "acctokens",
    "metrics",
]
PLOTTED = SECTIONS[1:9]


def _stage(run_dir: Path, stage: str, rows: list[dict], schema) -> None:
    write_shard(run_dir / stage, 0, make_table(rows, schema))
    write_manifest(run_dir / stage, config_hash="synthetic")


def eval_metrics(rng: random.Random, accuracy: float, tokens: int) -> dict:
    rows = []
    for p in range(20):
        for j in range(8):
            ok = rng.random() < accuracy
            rows.append(
                {
                    "benchmark": "b",
                    "model_name": "m",
                    "model": "m",
                    "problem_id": f"p{p}",
                    "sample_index": j,
                    "completion": "",
                    "completion_tokens": rng.randint(tokens // 2, tokens * 2),
                    "finish_reason": "stop" if rng.random() < 0.9 else "length",
                    "status": "correct" if ok else "incorrect",
                    "is_correct": ok,
                    "extracted": str(rng.randint(0, 2)),
                }
            )
    return evaluate.aggregate_shards([make_table(rows, EVAL_SAMPLES)], 8, [1, 2, 4, 8])


def write_eval(run_dir: Path, rng: random.Random, trained_accuracy: float) -> dict:
    section = {}
    for bench in ("math", "gsm"):
        metrics = {"base": eval_metrics(rng, 0.4, 300), "trained": eval_metrics(rng, trained_accuracy, 200)}
        scores = evaluate.compare_to_reference(metrics, "base")
        section[bench] = {name: {**m, **scores[name]} for name, m in metrics.items()}
    update_stats(run_dir, "eval", section)
    manifest = {"stats": {"reference": "base", "skipped_models": {"other": "no such model"}}}
    atomic_write_bytes(run_dir / "eval" / "_manifest.json", json.dumps(manifest).encode())
    return section


def make_run(run_dir: Path, seed: int = 0, trained_accuracy: float = 0.55) -> Path:
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
    optimized = []
    for c in [c for c in cps if c["is_correct"]]:
        status = rng.choice(["pruned", "truncated", "no_exit"])
        cut = int(c["completion_tokens"] * rng.uniform(0.3, 0.9)) if status != "no_exit" else 0
        optimized.append(dto_row(c, status, cut, int(cut * rng.uniform(0.6, 1.0)) if status == "pruned" else cut))
        if status != "no_exit" and len([p for p in pairs if p["pair_type"] == "dto"]) < 8:
            pairs.append(pair("dto", c, 1, None, rng))
    write_shard(run_dir / "dto" / "optimized", 0, make_table(optimized, DTO_RESULTS))
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
        run_dir, "dto", {"tokens_before": 9000, "tokens_after_truncation": 5000, "tokens_after_pruning": 4200}
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
    write_eval(run_dir, rng, trained_accuracy)
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


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    run_dir = make_run(tmp_path_factory.mktemp("report") / "run")
    build_report(run_dir)
    return run_dir


def test_full_report_draws_every_section(full_run: Path):
    page = (full_run / "report" / "index.html").read_text()
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in page
    assert "not run" not in page and "could not be drawn" not in page
    sizes = png_sizes(page)
    assert len(sizes) == len(PLOTTED) and all(w > 200 and h > 100 for w, h in sizes)
    sections = dict(re.findall(r'<section id="(\w+)">(.*?)</section>', page, re.S))
    assert all("<img" in sections[a] for a in PLOTTED)
    stats = json.loads((full_run / "stats.json").read_text())
    trained = stats["eval"]["math"]["trained"]
    # The metrics table shows the eval section's numbers: a row per (benchmark, model) with pass@1 and eta.
    table = sections["metrics"]
    assert table.count("<tr>") == 1 + 4
    assert f"<td>{trained['pass_at_1']:.3f}</td>" in table and f"<td>{trained['eta']:.3f}</td>" in table
    assert "model other not evaluated: no such model." in table and "not evaluated" in sections["passk"]
    assert "optimized trajectories; median reduction" in sections["dto"] and "8 DTO pairs" in sections["dto"]
    assert "pass@8 − pass@1 gap" in sections["overview"] and re.search(
        "<th>all pairs</th><td>[^<]*dto 8", sections["overview"]
    )
    assert "ckptdpo report: synthetic" in page and 'rel="icon" href="data:,"' in page


def test_missing_stages_show_not_run_notes(tmp_path: Path):
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    page = render_report(run_dir)
    assert "<img" not in page and "could not be drawn" not in page
    assert page.count("not run") == len(PLOTTED) + 1  # every plot section, and the metrics table

    # Only generation and verification: lengths come from joining them, the rest is still missing.
    part = tmp_path / "partial"
    shutil.copytree(make_run(tmp_path / "full"), part)
    for stage in ("checkpoints", "pairs", "resample", "dto", "train", "eval", "stats.json"):
        target = part / stage
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    sections = dict(re.findall(r'<section id="(\w+)">(.*?)</section>', render_report(part), re.S))
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
    assert "| benchmark | model | problems | pass@1 |" in md and md.count("\n| math |") == 2


def test_compare_two_runs(tmp_path: Path, capsys):
    a = make_run(tmp_path / "a", seed=1, trained_accuracy=0.5)
    b = make_run(tmp_path / "b", seed=1, trained_accuracy=0.7)
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

    out = io.StringIO()
    Console(file=out, width=200).print(compare_table(a, b))
    text = out.getvalue()
    va, vb = stats_a["math"]["trained"]["pass_at_1"], stats_b["math"]["trained"]["pass_at_1"]
    delta = vb - va
    assert f"{va:.4f}" in text and f"{vb:.4f}" in text and f"{'+' if delta > 0 else ''}{delta:.4f}" in text
    assert main(["compare", str(a), str(b)]) == 0 and "pass@1" in capsys.readouterr().out
    (tmp_path / "c").mkdir()
    assert main(["compare", str(a), str(tmp_path / "c")]) == 2
    assert "no eval section" in capsys.readouterr().err


@pytest.mark.slow
def test_report_in_headless_chromium(full_run: Path):
    """The page loads in Chromium without console errors and every plot decodes (natural width > 0)."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.fail("chromium is not installed: run `make browser` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto((full_run / "report" / "index.html").resolve().as_uri(), wait_until="load")
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
            visible = page.eval_on_selector_all("img", "imgs => imgs.filter(i => i.getBoundingClientRect().width > 0)")
            heading = page.inner_text("h1")
            page.screenshot(path=str(full_run / "report" / "screenshot.png"), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    assert len(widths) == len(PLOTTED) and all(w > 0 for w in widths)
    assert len(visible) == len(PLOTTED)
    assert heading == "ckptdpo report: synthetic"

"""The data factory end to end on the fake backend, under a real (temporary) Prefect API.

The script decides every trajectory and continuation, so the test knows exactly which pairs must come out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from ckptdpo.shards import read_manifest, read_stage, read_stats
from ckptdpo.verify import extract_answer
from tests.conftest import write_fake_recipe

TEMPLATE = "<|user|>\n{message}\n<|assistant|>\n"

# P1 has one right and one wrong trajectory, each with one checkpoint: r2w and w2r pairs must come out.
A = "Let me add the numbers.\n\nWait, 2 + 3 is 5.\n\nSo the answer is \\boxed{5}."
B = "I think it is six.\n\nBut maybe 2 + 3 = 6.\n\nSo the answer is \\boxed{6}."
# P2: a right one without checkpoints, and a wrong one whose continuations stay wrong: no pair, all rounds used.
C = "4 * 4 = 16, so \\boxed{16}."
D = "Hmm, four fours.\n\nBut 4 * 4 = 15.\n\nSo \\boxed{15}."
SCRIPT = {
    "template": TEMPLATE,
    "problems": {"What is 2 + 3?": {"samples": [A, B]}, "What is 4 * 4?": {"samples": [C, D]}},
    "continuations": [
        {"after": "Let me add the numbers.\n\n", "texts": ["Wait, 2 + 3 is 7, so \\boxed{7}."]},
        {"after": "I think it is six.\n\n", "texts": ["But no: 2 + 3 = 5, so \\boxed{5}."]},
        {"after": "Hmm, four fours.\n\n", "texts": ["But 4 * 4 = 17, so \\boxed{17}."]},
    ],
}
PROBLEMS = [
    {"id": "p1", "problem": "What is 2 + 3?", "answer": "5"},
    {"id": "p2", "problem": "What is 4 * 4?", "answer": "16"},
]


def write_recipe(tmp: Path, **resample) -> Path:
    resample = {"max_rounds": 3, "max_attempts": 8, "max_tokens": 100, **resample}
    return write_fake_recipe(tmp, SCRIPT, PROBLEMS, resample=resample)


@pytest.fixture()
def recipe(tmp_path: Path) -> Path:
    return write_recipe(tmp_path)


def run(recipe: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "commands", "run", str(recipe), "--run-dir", str(run_dir), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )


def _env() -> dict[str, str]:
    return {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}


def test_exact_pairs_from_scripted_trajectories(prefect_harness, recipe: Path, tmp_path: Path):
    from flows.pipeline import pipeline_flow

    run_dir = tmp_path / "run"
    pipeline_flow(str(recipe), str(run_dir))
    pairs = read_stage(run_dir / "pairs").to_pylist()
    by_type = {p["pair_type"]: p for p in pairs}
    assert sorted(by_type) == ["r2w", "w2r"] and len(pairs) == 2

    r2w, w2r = by_type["r2w"], by_type["w2r"]
    chat = TEMPLATE.replace(
        "{message}", "What is 2 + 3?\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    assert r2w["prompt"] == chat + "Let me add the numbers.\n\n"
    assert r2w["chosen"] == "Wait, 2 + 3 is 5.\n\nSo the answer is \\boxed{5}."
    assert r2w["rejected"] == "Wait, 2 + 3 is 7, so \\boxed{7}."
    assert w2r["prompt"] == chat + "I think it is six.\n\n"
    assert w2r["chosen"] == "But no: 2 + 3 = 5, so \\boxed{5}."
    assert w2r["rejected"] == "But maybe 2 + 3 = 6.\n\nSo the answer is \\boxed{6}."
    for p in pairs:
        assert p["problem_id"] == "p1" and p["gold_answer"] == "5" and p["checkpoint_index"] == 1
        assert extract_answer(p["chosen"]) == "5" and extract_answer(p["rejected"]) != "5"
        assert p["chosen_tokens"] == len(p["chosen"].split()) and p["rejected_tokens"] == len(p["rejected"].split())

    stats = read_stats(run_dir)
    assert stats["verify"]["by_status"] == {"correct": 2, "incorrect": 2}
    assert stats["verify"]["by_extracted_from"] == {"box": 4}
    rounds = stats["resample"]["rounds"]
    # Round 1: A (r2w), B and D (w2r), one draw each; rounds 2-3 retry only D, whose continuations stay wrong.
    assert [r["attempts"] for r in rounds] == [3, 1, 1]
    assert rounds[0]["r2w"]["by_status"] == {"incorrect": 1} and rounds[1]["w2r"]["by_status"] == {"incorrect": 1}
    assert stats["resample"]["pairs"]["by_type"] == {"r2w": 1, "w2r": 1}
    assert stats["checkpoints"]["by_correctness"]["correct"]["checkpoints"]["max"] == 1


def test_rerun_recomputes_nothing_and_resample_change_keeps_generation(prefect_harness, recipe: Path, tmp_path: Path):
    from flows.pipeline import pipeline_flow

    run_dir = tmp_path / "run"
    pipeline_flow(str(recipe), str(run_dir))
    mtimes = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.parquet")}
    result = pipeline_flow(str(recipe), str(run_dir))
    assert all(result[s].get("skipped") for s in ("generate", "verify", "checkpoints", "resample"))
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.parquet")} == mtimes

    result = pipeline_flow(str(recipe), str(run_dir), {"resample.max_rounds": 1})
    assert all(result[s].get("skipped") for s in ("generate", "verify", "checkpoints"))
    assert not result["resample"].get("skipped")
    generate = [p for p in mtimes if "/generate/" in str(p)]
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in generate)
    assert len(read_stats(run_dir)["resample"]["rounds"]) == 1


def test_cli_user_errors_write_nothing(recipe: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text(recipe.read_text() + "\nbogus: 1\n")
    r = run(bad_key, run_dir)
    assert r.returncode == 2 and "unknown key 'bogus'" in r.stderr and r.stderr.count("\n") == 1

    (tmp_path / "problems.jsonl").write_text(json.dumps({"id": "x", "problem": "", "answer": "1"}) + "\n")
    r = run(recipe, run_dir)
    assert r.returncode == 2 and "problems.jsonl" in r.stderr

    r = run(recipe, run_dir, "--set", "backend.kind=hf", "--set", "backend.model=/no/such/model")
    assert r.returncode == 2 and "/no/such/model" in r.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_kill_during_resampling_then_resume_gives_the_same_pairs(tmp_path: Path):
    """kill -9 in the middle of resampling; the rerun completes with exactly the pairs of an uninterrupted run."""
    recipe = write_recipe(tmp_path)
    script = yaml.safe_load((tmp_path / "script.yaml").read_text())
    # More problems (one shard each) and a slow backend, so there is a "middle" of resampling to kill.
    for i in range(6):
        script["problems"][f"Copy {i}: what is 2 + 3?"] = {"samples": [A, B]}
    script["delay_s"] = 0.4
    (tmp_path / "script.yaml").write_text(yaml.safe_dump(script))
    more = PROBLEMS + [{"id": f"c{i}", "problem": f"Copy {i}: what is 2 + 3?", "answer": "5"} for i in range(6)]
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in more))

    reference = tmp_path / "reference"
    assert run(recipe, reference).returncode == 0

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "commands", "run", str(recipe), "--run-dir", str(run_dir)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    round1 = run_dir / "resample" / "round-01"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(round1.glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "resample" / "_manifest.json").exists(), "the kill came too late to test anything"
    assert 2 <= len(list(round1.glob("part-*.parquet"))) < 8
    for shard in run_dir.rglob("part-*.parquet"):
        pq.read_table(shard)  # every shard under its final name is complete

    assert run(recipe, run_dir).returncode == 0
    got = sorted((p["pair_id"], p["pair_type"]) for p in read_stage(run_dir / "pairs").to_pylist())
    want = sorted((p["pair_id"], p["pair_type"]) for p in read_stage(reference / "pairs").to_pylist())
    assert got == want and len(got) == 14  # p1 and six copies: one r2w and one w2r each
    assert read_manifest(run_dir / "pairs")["num_rows"] == read_manifest(reference / "pairs")["num_rows"]

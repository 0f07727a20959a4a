"""The values stage through the real CLI: planted checkpoint values (fake backend), both searches, its four outputs,
critical pairs gathered into pairs/, the value schedule for resampling, and a resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptdpo.shards import read_manifest, read_stage, read_stats
from tests.conftest import write_fake_recipe
from tests.unit.test_values import GOLD, correct_text, curve, wrong_text

TEMPLATE = "<|user|>\n{message}\n<|assistant|>\n"
ROLLOUTS = 8
# (problem id, planted critical checkpoint or None, number of checkpoints): 4 to 32 checkpoints.
PLANTED = [("p1", 3, 4), ("p2", 1, 9), ("p3", 14, 32), ("p4", None, 8), ("p5", 6, 12)]


def _paragraph(pid: str, i: int) -> str:
    return f"Wait, step {pid}-{i} rechecks the partial sum." if i else f"Let us solve problem {pid} carefully."


def plant(tmp: Path, **values) -> Path:
    """One wrong trajectory per problem, whose prefix at checkpoint i continues correctly at the planted rate, and
    one correct trajectory (no checkpoint) per problem."""
    problems, scripts, rules = [], {}, []
    for pid, critical, n in PLANTED:
        question = f"What is 3 + 4 (asked as {pid})?"
        problems.append({"id": pid, "problem": question, "answer": GOLD})
        paragraphs = [_paragraph(pid, i) for i in range(n + 1)]
        wrong = "\n\n".join(paragraphs) + "\n\nSo the answer is \\boxed{5}."
        scripts[question] = {"samples": [wrong, f"3 + 4 = 7, so \\boxed{{{GOLD}}}."]}
        for i, rate in enumerate(curve(n, critical)):
            k = round(rate * ROLLOUTS)
            texts = [correct_text(j) for j in range(k)] + [wrong_text(j) for j in range(ROLLOUTS - k)]
            rules.append({"after": paragraphs[i] + "\n\n", "texts": texts})
    script = {"template": TEMPLATE, "problems": scripts, "continuations": rules}
    values = {"rollouts": ROLLOUTS, "max_tokens": 100, **values}
    return write_fake_recipe(
        tmp, script, problems, stages=["generate", "verify", "checkpoints", "values"],
        generate={"num_samples": 2, "max_tokens": 400, "shard_size": 2}, verify={"answer_format": "boxed"},
        values=values,
    )  # fmt: skip


def cli(recipe: Path, run_dir: Path, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "commands", "run", str(recipe), "--run-dir", str(run_dir), *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def trajectories(run_dir: Path) -> dict[str, dict]:
    return {r["problem_id"]: r for r in read_stage(run_dir / "values" / "trajectories").to_pylist()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for search in ("exhaustive", "binary"):
        tmp = tmp_path_factory.mktemp(search)
        proc = cli(plant(tmp, search=search), tmp / "run")
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[search] = tmp / "run"
    return out


def test_both_searches_find_every_planted_first_error_and_binary_costs_at_most_half(runs):
    found = {s: trajectories(d) for s, d in runs.items()}
    for pid, critical, n in PLANTED:
        for search in runs:
            t = found[search][pid]
            assert (t["critical_index"], t["num_checkpoints"], t["search"]) == (critical, n, search)
        if n >= 8:
            assert found["binary"][pid]["rollouts_used"] <= found["exhaustive"][pid]["rollouts_used"] / 2
    # The planted rates (0.75 before the first error, 0.125 from it on) come back within 0.25.
    for row in read_stage(runs["exhaustive"] / "values").to_pylist():
        pid = row["problem_id"]
        critical = next(c for p, c, _ in PLANTED if p == pid)
        planted = 0.125 if critical is not None and row["checkpoint_index"] >= critical else 0.75
        assert abs(row["value"] - planted) <= 0.25 and row["ci_low"] <= row["value"] <= row["ci_high"]
    # The recipe's schedule against the value schedule, priced from the exhaustive run's own rollouts.
    schedules = read_stats(runs["exhaustive"])["values"]["schedules"]
    assert schedules["trajectories"] == len(PLANTED) and schedules["skipped"] == 0
    for name in ("seed", "value"):
        s = schedules[name]
        assert s["draws"] > 0 and s["pairs_per_1k_tokens"] == pytest.approx(
            1000 * s["expected_pairs"] / s["expected_tokens"], rel=1e-3
        )
    stats = read_stats(runs["binary"])["values"]
    assert (
        stats["critical_found"] == 4
        and stats["rollouts_used"] < read_stats(runs["exhaustive"])["values"]["rollouts_used"]
    )


def test_prm_labels_agree_with_the_planted_first_error(runs):
    rows = {r["sample_id"]: r for r in read_stage(runs["binary"] / "prm").to_pylist()}
    by_problem = {t["problem_id"]: t for t in trajectories(runs["binary"]).values()}
    for pid, critical, _ in PLANTED:
        row = rows[by_problem[pid]["sample_id"]]
        if critical is None:
            continue  # a wrong trajectory with no drop: its last step is the bad one
        assert row["labels"] == [True] * (critical - 1) + [False]
        assert len(row["completions"]) == critical


def test_critical_pairs_are_gathered_into_pairs_and_verify_strictly(runs):
    from ckptdpo.verify import verify_batch

    for run_dir in runs.values():
        assert read_manifest(run_dir / "pairs") is not None
        pairs = [p for p in read_stage(run_dir / "pairs").to_pylist() if p["pair_type"] == "critical"]
        assert {p["problem_id"] for p in pairs} >= {"p1", "p3", "p5"}
        items = [(GOLD, p["chosen"], "stop") for p in pairs] + [(GOLD, p["rejected"], "stop") for p in pairs]
        verdicts = verify_batch(items, timeout_s=20, workers=1, answer_format="boxed")
        assert all(v.status == "correct" for v in verdicts[: len(pairs)])
        assert all(v.status != "correct" for v in verdicts[len(pairs) :])


def test_status_and_summary_show_the_stage(runs):
    proc = subprocess.run(
        [sys.executable, "-m", "commands", "status", str(runs["binary"])], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "values" in proc.stdout and "prm" in proc.stdout


def test_a_kill_in_the_middle_of_the_stage_resumes_to_the_same_rows_and_pair_ids(tmp_path: Path, runs):
    recipe, run_dir = plant(tmp_path, search="binary"), tmp_path / "run"
    proc = cli(recipe, run_dir, "--stages", "generate,verify,checkpoints")
    assert proc.returncode == 0, proc.stderr[-2000:]
    killed = cli(recipe, run_dir, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not list((run_dir / "values").glob("part-*.parquet")):
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)  # after the first shard, before the stage's manifest
    killed.wait()
    assert read_manifest(run_dir / "values") is None
    again = cli(recipe, run_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    for directory in ("values", "values/trajectories", "values/pairs", "prm"):
        got = read_stage(run_dir / directory).to_pylist()
        want = read_stage(runs["binary"] / directory).to_pylist()
        assert json.dumps(got, sort_keys=True, default=str) == json.dumps(want, sort_keys=True, default=str)

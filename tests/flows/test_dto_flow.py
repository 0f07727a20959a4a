"""The DTO stage in the pipeline, on the fake backend under a real (temporary) Prefect API.

The script decides every trajectory, probe score and judge reply, so the test knows exactly which trajectories
exit where, which segments go, and which pairs must come out.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from ckptdpo.backends.fake import count_words
from ckptdpo.dto import PROBE
from ckptdpo.shards import list_shards, read_manifest, read_stage, read_stats
from tests.conftest import write_fake_recipe

TEMPLATE = "<|user|>\n{message}\n<|assistant|>\n"
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
EXIT = "Hmm, I think this is enough to derive the final answer."

# p1: A is correct with three checkpoints; only the third is a confident exit, and the judge flags its second
# segment, which re-verifies. B is correct but no position reaches the threshold. C is wrong and the longest.
A = (
    "Let me add the numbers.\n\nWait, maybe it is 2 + 2 = 4.\n\nBut 2 + 3 = 5 is right.\n\n"
    "Wait, let me recheck: 2 + 3 = 5.\n\nSo the answer is \\boxed{5}."
)
B = "2 + 3 = 5.\n\nWait, yes.\n\nSo \\boxed{5}."
C = (
    "I think 2 + 3 = 6.\n\nWait, 2 + 3 = 6.\n\nWait, 2 + 3 = 6 again.\n\n"
    "Wait, 2 + 3 = 6 once more, I keep getting six.\n\nBut surely 2 + 3 = 6 and nothing else.\n\n"
    "So the answer is \\boxed{6}."
)
# p2: D is correct and the longest; it exits at its third checkpoint, the judge removes its second segment, but the
# pruned text fails re-verification, so D falls back to its truncated form. E is wrong, G correct without an exit.
D = (
    "Four times four.\n\nWait, 4 * 4 = 16.\n\nBut I should double check this.\n\n"
    "Wait, it is 16, as four groups of four make sixteen in total, so nothing changes.\n\n"
    "So the final answer is \\boxed{16}."
)
E = "4 * 4 = 15, so \\boxed{15}."
G = "4 * 4 = 16.\n\nSo \\boxed{16}."

YES = '{"wrong_information": "yes", "adds_nothing_new": "no", "off_topic_or_redundant": "no"}'
NOTHING_NEW = '{"wrong_information": "no", "adds_nothing_new": "yes", "off_topic_or_redundant": "no"}'
NO = '{"wrong_information": "no", "adds_nothing_new": "no", "off_topic_or_redundant": "no"}'


def segment(text: str) -> str:
    """The judge prompt's quoted block for exactly this segment."""
    return f"<<<BEGIN SEGMENT>>>\n{text}\n<<<END SEGMENT>>>"


POLICY = {
    "template": TEMPLATE,
    "problems": {"What is 2 + 3?": {"samples": [A, B, C]}, "What is 4 * 4?": {"samples": [D, E, G]}},
    "scores": [
        {"prompt_endswith": "is right.\n\n" + PROBE, "continuation": "5}", "logprob": -0.1},
        # Only the unpruned prefix scores high: the pruned D (second segment gone) fails re-verification.
        {
            "prompt_endswith": "= 16.\n\nBut I should double check this.\n\n" + PROBE,
            "continuation": "16}",
            "logprob": -0.2,
        },
    ],
    "default_logprob": -20.0,
}
JUDGE = {
    "chat": [
        {"contains": segment("Wait, maybe it is 2 + 2 = 4."), "reply": YES},
        {"contains": segment("Wait, 4 * 4 = 16."), "reply": NOTHING_NEW},
        {"contains": segment("But I should double check this."), "reply": "Sure! This segment looks fine."},
    ],
    "default_reply": NO,
}
PROBLEMS = [
    {"id": "p1", "problem": "What is 2 + 3?", "answer": "5"},
    {"id": "p2", "problem": "What is 4 * 4?", "answer": "16"},
]

PRUNED_A = f"Let me add the numbers.\n\nBut 2 + 3 = 5 is right.\n\n{EXIT}\n\nFinal Answer: \\boxed{{5}}"
TRUNCATED_A = (
    f"Let me add the numbers.\n\nWait, maybe it is 2 + 2 = 4.\n\nBut 2 + 3 = 5 is right.\n\n{EXIT}\n\n"
    "Final Answer: \\boxed{5}"
)
TRUNCATED_D = (
    f"Four times four.\n\nWait, 4 * 4 = 16.\n\nBut I should double check this.\n\n{EXIT}\n\n"
    "Final Answer: \\boxed{16}"
)


def write_recipe(tmp: Path) -> Path:
    return write_fake_recipe(
        tmp,
        {**POLICY, **JUDGE},  # the policy is its own judge
        PROBLEMS,
        name="fake-dto",
        stages=["generate", "verify", "checkpoints", "dto"],
        generate={"num_samples": 3, "max_tokens": 100, "shard_size": 1},
        dto={"threshold": 0.5},
    )


@pytest.fixture(scope="module")
def base_run(prefect_harness, tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, run_dir) of one whole pipeline run; tests that change the run work on a copy."""
    from flows.pipeline import pipeline_flow

    tmp = tmp_path_factory.mktemp("dto")
    recipe, run_dir = write_recipe(tmp), tmp / "run"
    result = pipeline_flow(str(recipe), str(run_dir))
    assert not result["dto"].get("skipped")
    return recipe, run_dir


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def chat(problem: str) -> str:
    return TEMPLATE.replace("{message}", f"{problem}\n\n{INSTRUCTION}")


def assert_expected_pairs(run_dir: Path) -> None:
    ids = {s["completion"]: s["sample_id"] for s in read_stage(run_dir / "generate").to_pylist()}
    pairs = sorted(read_stage(run_dir / "pairs").to_pylist(), key=lambda p: p["problem_id"])
    assert [p["pair_type"] for p in pairs] == ["dto", "dto"]
    p1, p2 = pairs
    assert (p1["problem_id"], p1["prompt"], p1["gold_answer"]) == ("p1", chat("What is 2 + 3?"), "5")
    assert p1["chosen"] == PRUNED_A and p1["rejected"] == C  # the longest original, wrong as it is
    assert p1["source_sample_id"] == ids[A] and p1["checkpoint_index"] == 3
    assert (p2["problem_id"], p2["prompt"], p2["gold_answer"]) == ("p2", chat("What is 4 * 4?"), "16")
    assert p2["chosen"] == TRUNCATED_D and p2["rejected"] == D  # re-verification failed: the truncated form
    assert p2["source_sample_id"] == ids[D] and p2["checkpoint_index"] == 3
    for p in pairs:
        assert p["chosen_tokens"] == count_words(p["chosen"]) < p["rejected_tokens"] == count_words(p["rejected"])
        assert p["prompt_tokens"] == count_words(p["prompt"]) and p["round"] is None and p["model"] == "fake"
    # The dto stage holds exactly these pairs, in PAIRS shards directly in dto/.
    assert sorted(r["pair_id"] for r in read_stage(run_dir / "dto").to_pylist()) == sorted(p["pair_id"] for p in pairs)


def test_exact_pairs_optimized_rows_and_stats(base_run):
    _, run_dir = base_run
    assert_expected_pairs(run_dir)

    ids = {s["completion"]: s["sample_id"] for s in read_stage(run_dir / "generate").to_pylist()}
    optimized = {r["sample_id"]: r for r in read_optimized(run_dir)}
    assert set(optimized) == {ids[A], ids[B], ids[D], ids[G]}  # the correct trajectories only
    a, b, d, g = (optimized[ids[t]] for t in (A, B, D, G))
    assert (a["status"], a["exit_kind"], a["exit_index"], a["exit_char"]) == (
        "pruned",
        "checkpoint",
        3,
        A.index("Wait, let"),
    )
    assert a["removed_segments"] == [1] and a["truncated_text"] == TRUNCATED_A and a["text"] == PRUNED_A
    assert (d["status"], d["removed_segments"], d["text"]) == ("truncated", [1], TRUNCATED_D)
    assert d["reverify_probability"] < 0.5
    assert (b["status"], b["exit_kind"], b["text"], g["status"], g["text"]) == (
        "no_exit",
        "paragraph",
        None,
        "no_exit",
        None,
    )

    stats = read_stats(run_dir)["dto"]
    # Token totals cover the optimized trajectories only (A pruned, D truncated; B and G found no exit).
    before = count_words(A) + count_words(D)
    truncated = count_words(TRUNCATED_A) + count_words(TRUNCATED_D)
    pruned = truncated - count_words(TRUNCATED_A) + count_words(PRUNED_A)
    expected = {
        "num_trajectories": 4,
        "num_exit_found": 2,
        "no_exit_found": 2,
        "num_pruned": 1,
        "num_dropped": 0,
        "num_probes": 3 + 2 + 3 + 1 + 2,  # A, B, D, G at every candidate, then A and D at their pruned ends
        "probe_errors": 0,
        "tokens_before": before,
        "tokens_after_truncation": truncated,
        "tokens_after_pruning": pruned,
        "segments_judged": 4,  # segments 2 and 3 of A and D (the first is never judged)
        "segments_removed": 2,
        "segments_unjudged": 0,
        "judge_parse_failures": 1,
        "reverify_probes": 2,
        "reverify_failures": 1,
        "num_pairs": 2,
    }
    assert {k: stats[k] for k in expected} == expected
    assert pruned < truncated < before
    assert stats["by_status"] == {"no_exit": 2, "pruned": 1, "truncated": 1}
    assert stats["wall_s"] > 0 and stats["pairs"]["by_type"] == {"dto": 2}
    manifest = read_manifest(run_dir / "dto")
    assert manifest["num_rows"] == 2 and manifest["stats"] == stats
    assert read_manifest(run_dir / "pairs")["stats"]["by_type"] == {"dto": 2}


def test_rerun_skips_the_stage(base_run):
    from flows.pipeline import pipeline_flow

    recipe, run_dir = base_run
    mtimes = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.parquet")}
    result = pipeline_flow(str(recipe), str(run_dir))
    assert result["dto"]["skipped"] is True
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.parquet")} == mtimes


def test_separate_judge_backend_is_the_one_asked(base_run, tmp_path: Path):
    from flows.stage import stage_flow

    recipe, run_dir = base_run
    run_dir = copy_run(run_dir, tmp_path)
    generated = {p: p.stat().st_mtime_ns for p in (run_dir / "generate").glob("*.parquet")}
    # This judge flags nothing (the policy's own rules flag two segments), so nothing may be pruned.
    (tmp_path / "judge.yaml").write_text(yaml.safe_dump({"default_reply": NO}))
    judge = {"kind": "fake", "model": "judge", "script": str(tmp_path / "judge.yaml")}
    result = stage_flow("dto", str(run_dir), str(recipe), {"dto.judge.backend": judge})
    assert not result.get("skipped")
    stats = read_stats(run_dir)["dto"]
    assert (stats["segments_judged"], stats["segments_removed"], stats["judge_parse_failures"]) == (4, 0, 0)
    assert (stats["num_pruned"], stats["reverify_probes"], stats["num_pairs"]) == (0, 0, 2)
    chosen = {p["problem_id"]: p["chosen"] for p in read_stage(run_dir / "dto").to_pylist()}
    assert chosen == {"p1": TRUNCATED_A, "p2": TRUNCATED_D}
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "generate").glob("*.parquet")} == generated


def test_changed_threshold_redoes_only_dto(base_run, tmp_path: Path):
    from flows.stage import stage_flow

    recipe, run_dir = base_run
    run_dir = copy_run(run_dir, tmp_path)
    # exp(-0.1) = 0.90 is the best probe: nothing reaches 0.95, so no exit, no pruning and no pairs.
    result = stage_flow("dto", str(run_dir), str(recipe), {"dto.threshold": 0.95})
    assert not result.get("skipped")
    stats = read_stats(run_dir)["dto"]
    assert (stats["num_exit_found"], stats["segments_judged"], stats["num_pairs"]) == (0, 0, 0)
    assert stats["tokens_after_pruning"] == stats["tokens_after_truncation"] == stats["tokens_before"]
    assert read_manifest(run_dir / "dto")["num_rows"] == 0
    assert {r["status"] for r in read_optimized(run_dir)} == {"no_exit"}


def read_optimized(run_dir: Path) -> list[dict]:
    return [r for p in list_shards(run_dir / "dto" / "optimized") for r in pq.read_table(p).to_pylist()]

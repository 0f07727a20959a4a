"""The refresh's bookkeeping (`ckptdpo.lineage`) on plain rows: what counts as new, what gets recorded."""

from __future__ import annotations

from ckptdpo.lineage import new_problems, problem_hash, record_processed, verified_problem_ids


def test_only_problems_with_verified_samples_are_recorded_and_the_rest_stay_new():
    rows = [{"id": f"q{i}", "problem": f"p{i}", "answer": str(i)} for i in range(4)]
    verdicts = [
        {"problem_id": "q0", "status": "correct"},
        {"problem_id": "q1", "status": "incorrect"},
        {"problem_id": "q1", "status": "error"},
        {"problem_id": "q2", "status": "error"},  # every sample of q2 failed to be checked; q3 has no samples
    ]
    state = {"problems": {}}
    recorded, left = record_processed(state, rows, verified_problem_ids(verdicts))
    assert recorded == ["q0", "q1"] and left == ["q2", "q3"]
    assert state["problems"] == {"q0": problem_hash(rows[0]), "q1": problem_hash(rows[1])}
    source = [{"problem_id": r["id"], "problem": r["problem"], "answer": r["answer"]} for r in rows]
    assert [r["problem_id"] for r in new_problems(source, state["problems"])] == ["q2", "q3"]
    source[0]["answer"] = "corrected"  # a changed gold answer makes a recorded problem new again
    assert [r["problem_id"] for r in new_problems(source, state["problems"])] == ["q0", "q2", "q3"]

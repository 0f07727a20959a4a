"""Benchmark problem sources: tiny fixtures in each benchmark's own format, prompts, shuffles and their tests."""

from __future__ import annotations

import base64
import csv
import gzip
import json
import pickle
import zlib
from pathlib import Path

import pytest

from ckptdpo import sandbox
from ckptdpo.configs import ProblemsConfig
from ckptdpo.errors import UserError
from ckptdpo.sources import CHOICE_INSTRUCTION, choice_order, decode_lcb_cases, load_eval_problems
from ckptdpo.verify.choice import extract_choice
from ckptdpo.verify.code import CodeTask, verify_code_batch

ALLOW = not sandbox.sandbox_support().isolated
SHARED_MBPP = Path(__file__).resolve().parents[3] / "shared" / "data" / "mbpp_sanitized.jsonl"

HUMANEVAL = {
    "task_id": "HumanEval/0",
    "prompt": 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n',
    "canonical_solution": "    return sum(xs)\n",
    "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n",
    "entry_point": "total",
}
MBPP = {
    "task_id": 12,
    "prompt": "Write a function to double a number.",
    "code": "def double(n):\n    return 2 * n",
    "test_imports": ["import math"],
    "test_list": ["assert double(2) == 4", "assert double(0) == 0", "assert math.isclose(double(1.5), 3.0)"],
}
ARC = {
    "id": "Mercury_1",
    "question": {
        "stem": "Which is a planet?",
        "choices": [{"text": t, "label": lab} for t, lab in [("Sun", "A"), ("Mars", "B"), ("Moon", "C"), ("Io", "D")]],
    },
    "answerKey": "B",
}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _code_verdict(row: dict, completion: str) -> str:
    cases = tuple((c["stdin"], c["expected_stdout"]) for c in row["cases"])
    task = CodeTask(completion, tests=row["tests"], setup=row["setup"], cases=cases)
    return verify_code_batch([task], allow_unsandboxed=ALLOW)[0].status


def test_humaneval_prompt_completes_the_function_and_its_tests_check_it(tmp_path):
    path = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(HUMANEVAL) + "\n")
    [row] = load_eval_problems(ProblemsConfig(source="humaneval", path=str(path)))
    assert row["kind"] == "code" and row["problem_id"] == "HumanEval/0"
    assert "Complete the following Python function" in row["problem"] and HUMANEVAL["prompt"] in row["problem"]
    assert row["setup"] == "from typing import List"
    good = "```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```"
    bad = "```python\ndef total(xs: List[int]) -> int:\n    return len(xs)\n```"
    assert (_code_verdict(row, good), _code_verdict(row, bad)) == ("correct", "incorrect")


def test_mbpp_prompt_has_the_task_and_first_test_only(tmp_path):
    path = _jsonl(tmp_path / "mbpp.jsonl", [MBPP, {**MBPP, "task_id": 700}])
    rows = load_eval_problems(ProblemsConfig(source="mbpp", path=str(path)))
    assert [r["problem_id"] for r in rows] == ["mbpp/12", "mbpp/700"]
    assert MBPP["test_list"][0] in rows[0]["problem"] and MBPP["test_list"][1] not in rows[0]["problem"]
    assert (
        load_eval_problems(ProblemsConfig(source="mbpp", path=str(path), split="test"))[0]["problem_id"] == "mbpp/12"
    )
    assert _code_verdict(rows[0], f"```python\n{MBPP['code']}\n```") == "correct"
    assert _code_verdict(rows[0], "```python\ndef double(n):\n    return n + 2\n```") == "incorrect"


def _lcb_private(cases: list[dict]) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


def test_livecodebench_stdin_and_functional_problems(tmp_path):
    stdin_problem = {
        "question_id": "abc001_a",
        "question_content": "Read n and print 2n.",
        "starter_code": "",
        "public_test_cases": json.dumps([{"input": "3\n", "output": "6\n", "testtype": "stdin"}]),
        "private_test_cases": _lcb_private([{"input": "10\n", "output": "20\n", "testtype": "stdin"}]),
        "metadata": "{}",
    }
    functional = {
        "question_id": "2000",
        "question_content": "Return the sum of two numbers.",
        "starter_code": "class Solution:\n    def add(self, a: int, b: int) -> int:\n        ",
        "public_test_cases": json.dumps([{"input": "1\n2", "output": "3", "testtype": "functional"}]),
        "private_test_cases": _lcb_private([{"input": "5\n-5", "output": "0", "testtype": "functional"}]),
        "metadata": json.dumps({"func_name": "add"}),
    }
    rows = load_eval_problems(
        ProblemsConfig(source="livecodebench", path=str(_jsonl(tmp_path / "t.jsonl", [stdin_problem, functional])))
    )
    assert [len(r["cases"]) for r in rows] == [2, 0]
    assert "stdin" in rows[0]["problem"] and "starter code" in rows[1]["problem"]
    assert _code_verdict(rows[0], "```python\nprint(2 * int(input()))\n```") == "correct"
    assert _code_verdict(rows[0], "```python\nprint(2 * int(input()) if int(input()) < 5 else 0)\n```") == "incorrect"
    sol = "```python\nclass Solution:\n    def add(self, a, b):\n        return a + b\n```"
    assert _code_verdict(rows[1], sol) == "correct"
    assert _code_verdict(rows[1], sol.replace("a + b", "a - b")) == "incorrect"


def test_livecodebench_private_cases_refuse_pickled_objects():
    evil = base64.b64encode(zlib.compress(pickle.dumps(Path("/")))).decode()
    with pytest.raises(ValueError, match="only plain data"):
        decode_lcb_cases(evil)


def test_arc_choices_are_lettered_shuffled_and_recorded(tmp_path):
    rows = [{**ARC, "id": f"Mercury_{i}"} for i in range(20)]
    loaded = load_eval_problems(ProblemsConfig(source="arc", path=str(_jsonl(tmp_path / "arc.jsonl", rows))))
    orders = {tuple(r["choice_order"]) for r in loaded}
    assert len(orders) > 1  # a seed per problem, not one order for all
    for r in loaded:
        assert r["kind"] == "choice" and r["problem"].endswith(CHOICE_INSTRUCTION)
        assert r["choice_order"] == choice_order(r["problem_id"], 4, 0, True)
        gold_line = next(line for line in r["problem"].splitlines() if line.startswith(f"{r['answer']}) "))
        assert gold_line == f"{r['answer']}) Mars"
    again = load_eval_problems(ProblemsConfig(source="arc", path=str(tmp_path / "arc.jsonl")))
    assert again == loaded  # the same seed gives the same order
    plain = load_eval_problems(ProblemsConfig(source="arc", path=str(tmp_path / "arc.jsonl"), shuffle_choices=False))
    assert {r["answer"] for r in plain} == {"B"}


def test_gpqa_csv_shuffles_the_correct_answer_away_from_a(tmp_path):
    path = tmp_path / "gpqa_diamond.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(
            f, ["Record ID", "Question", "Correct Answer"] + [f"Incorrect Answer {i}" for i in (1, 2, 3)]
        )
        w.writeheader()
        for i in range(12):
            w.writerow(
                {
                    "Record ID": f"rec{i}",
                    "Question": f"Q{i}?",
                    "Correct Answer": "right",
                    "Incorrect Answer 1": "w1",
                    "Incorrect Answer 2": "w2",
                    "Incorrect Answer 3": "w3",
                }
            )
    rows = load_eval_problems(ProblemsConfig(source="gpqa", path=str(path)))
    assert len({r["answer"] for r in rows}) > 1
    for r in rows:
        assert f"{r['answer']}) right" in r["problem"]
        assert extract_choice(f"\\boxed{{{r['answer']}}}", "ABCD") == r["answer"]


def test_a_file_in_another_format_is_one_user_error(tmp_path):
    path = _jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError, match="not in humaneval's format"):
        load_eval_problems(ProblemsConfig(source="humaneval", path=str(path)))
    with pytest.raises(UserError, match="no such file"):
        load_eval_problems(ProblemsConfig(source="mbpp", path=str(tmp_path / "missing.jsonl")))


def test_kind_follows_the_source():
    assert ProblemsConfig(source="humaneval").kind == "code"
    assert ProblemsConfig(source="gpqa", path="g.csv").kind == "choice"
    assert ProblemsConfig(source="file", path="aime.jsonl").kind == "math"
    with pytest.raises(ValueError, match="does not fit"):
        ProblemsConfig(source="arc", path="a.jsonl", kind="code")


def test_math_sources_become_math_rows(tmp_path):
    path = _jsonl(tmp_path / "aime.jsonl", [{"id": "p1", "problem": "1+1?", "answer": 2}])
    [row] = load_eval_problems(ProblemsConfig(source="file", path=str(path)))
    assert (row["kind"], row["answer"], row["tests"], row["cases"]) == ("math", "2", "", [])


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_MBPP.is_file(), reason="the shared MBPP file is not on this machine")
def test_real_mbpp_reference_code_passes_its_tests():
    rows = load_eval_problems(ProblemsConfig(source="mbpp", path=str(SHARED_MBPP)))
    answers = {r["problem_id"]: r["answer"] for r in rows}
    tasks = [CodeTask(f"```python\n{answers[r['problem_id']]}\n```", tests=r["tests"], setup=r["setup"]) for r in rows]
    verdicts = verify_code_batch(tasks, workers=2, allow_unsandboxed=ALLOW)
    failing = [r["problem_id"] for r, v in zip(rows, verdicts, strict=True) if v.status != "correct"]
    assert len(rows) == 427 and failing == []

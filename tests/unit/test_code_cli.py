"""`ckptdpo verify --kind code|choice`: verdict columns, the summary, and one-sentence errors that write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from ckptdpo import sandbox
from commands.cli import main

UNSANDBOXED = [] if sandbox.sandbox_support().isolated else ["--allow-unsandboxed"]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_code_kind_runs_tests_and_stdin_programs(tmp_path, capsys):
    rows = [
        {"completion": "```python\ndef f(x):\n    return x + 1\n```", "tests": "assert f(1) == 2"},
        {"completion": "```python\ndef f(x):\n    return x\n```", "tests": "assert f(1) == 2"},
        {"completion": "```python\nprint(int(input()) * 2)\n```", "stdin": "4\n", "expected_stdout": "8\n"},
        {"completion": "no code here", "tests": "pass"},
    ]
    out = tmp_path / "out.parquet"
    rc = main(["verify", _jsonl(tmp_path / "in.jsonl", rows), "--kind", "code", "-o", str(out), *UNSANDBOXED])
    assert rc == 0
    assert pq.read_table(out).column("status").to_pylist() == ["correct", "incorrect", "correct", "no_answer"]
    assert "accuracy" in capsys.readouterr().out


def test_choice_kind_reads_gold_letters(tmp_path):
    rows = [{"gold": "C", "completion": "\\boxed{C}"}, {"gold": "B", "completion": "Answer: A or B"}]
    out = tmp_path / "out.parquet"
    assert main(["verify", _jsonl(tmp_path / "in.jsonl", rows), "--kind", "choice", "-o", str(out)]) == 0
    table = pq.read_table(out)
    assert table.column("status").to_pylist() == ["correct", "no_answer"]
    assert table.column("extracted_from").to_pylist() == ["box", "none"]


def test_missing_columns_are_one_sentence_and_nothing_is_written(tmp_path, capsys):
    path = _jsonl(tmp_path / "in.jsonl", [{"gold": "C", "completion": "C"}])
    out = tmp_path / "out.parquet"
    assert main(["verify", path, "--kind", "code", "-o", str(out), *UNSANDBOXED]) == 2
    assert "needs a 'tests' column" in capsys.readouterr().err
    assert main(["verify", path, "--kind", "choice", "--gold-column", "letter", "-o", str(out)]) == 2
    assert "no column 'letter'" in capsys.readouterr().err
    assert not out.exists()

"""math-verify in the killable pool: reported cases, answer forms, cut-off completions, adversarial input, the CLI."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest

from ckptdpo.verify import (
    WORKER_MEMORY_HEADROOM_BYTES,
    Pool,
    Verdict,
    WorkersUnavailable,
    run_calls,
    verify_batch,
    verify_batch_timed,
)
from ckptdpo.verify.math import check_math
from commands.cli import main as cli_main

TIMEOUT_S = 1.0
# Numbers no other test in this process verifies (the verdict cache is per process), 10 apart so n + 1 is fresh too.
_fresh = itertools.count(random.SystemRandom().randrange(10**7, 10**8) * 10, 10)


def fresh_item() -> tuple[tuple[str, str], str]:
    """A normal item whose verdict cannot come from the cache, so it proves the pool itself still works."""
    n = next(_fresh)
    return (str(n), f"Adding up gives {n}.\n\n**Final Answer**\n\\boxed{{{n}}}"), str(n)


def boxed(answer: str) -> Verdict:
    return Verdict("correct", True, answer, "box")


# --- the reported cases ---------------------------------------------------------------------------------------------


def test_currency_gold_matches_itself() -> None:
    """Issue 12, case 2: a `\\$` gold never matched, not even itself boxed."""
    assert verify_batch([("\\$18.90", "\\boxed{\\$18.90}")]) == [boxed("\\$18.90")]


def test_no_box_fallback_takes_the_stated_answer() -> None:
    """Issue 12, case 3: without a box the old fallback took the 4 of "4 + 4" and labelled a right answer wrong."""
    (v,) = verify_batch([("8", 'So the answer to the question "4 + 4" is indeed 8.')])
    assert v == Verdict("correct", True, "8", "statement")


# --- answer forms: gold, prediction, verdict ------------------------------------------------------------------------

FORMS = [
    # currency, thousands separators as MATH writes them
    ("\\$18.90", "\\boxed{18.9}", "correct"),
    ("18.90", "\\boxed{\\$18.90}", "correct"),
    ("18", "\\boxed{180}", "incorrect"),
    ("\\$1,\\!657", "\\boxed{1657}", "correct"),
    ("\\$23{,}000", "\\boxed{23,000}", "correct"),
    ("23000", "\\boxed{2300}", "incorrect"),
    ("1\\,000", "\\boxed{1000}", "correct"),
    ("1,000", "\\boxed{1,001}", "incorrect"),
    ("1450000", "\\boxed{1,450,000}", "correct"),
    ("1450000", "\\boxed{145,000}", "incorrect"),
    ("100", "\\boxed{\\$100.00}", "correct"),
    # degrees, percent
    ("30^\\circ", "\\boxed{30}", "correct"),
    ("30", "\\boxed{30^{\\circ}}", "correct"),
    ("30^\\circ", "\\boxed{60^\\circ}", "incorrect"),
    ("25\\%", "\\boxed{25 percent}", "correct"),
    ("25\\%", "\\boxed{35\\%}", "incorrect"),
    # fractions
    ("\\dfrac{3}{4}", "\\boxed{\\frac34}", "correct"),
    ("\\tfrac{3}{4}", "\\boxed{\\frac{4}{3}}", "incorrect"),
    ("0.5", "\\boxed{\\frac12}", "correct"),
    ("0.5", "\\boxed{\\frac13}", "incorrect"),
    ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\dfrac{\\sqrt3}{2}}", "correct"),
    ("-\\frac{1}{2}", "\\boxed{\\frac{1}{2}}", "incorrect"),
    ("\\$\\dfrac23 \\approx \\$0.67", "\\boxed{\\frac{2}{3}}", "correct"),
    # several answers, tuples, intervals, matrices
    ("1, 2", "\\boxed{2, 1}", "correct"),
    ("1, 2", "\\boxed{1, 3}", "incorrect"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\frac{\\pi}{2})}", "correct"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\pi)}", "incorrect"),
    ("[-2, 5)", "\\boxed{\\left[-2,5\\right)}", "correct"),
    ("[-2, 5)", "\\boxed{[-2,5]}", "incorrect"),
    ("\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}", "\\boxed{\\begin{pmatrix}1\\\\-2\\end{pmatrix}}", "correct"),
    ("\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}", "\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}", "incorrect"),
    # text answers, units, choices
    ("\\text{Monday}", "\\boxed{Monday}", "correct"),
    ("\\text{Monday}", "\\boxed{\\text{Sunday}}", "incorrect"),
    ("5\\text{ cm}", "\\boxed{5}", "correct"),
    ("5", "\\boxed{5\\text{ inches}}", "correct"),
    ("5", "\\boxed{6 \\text{ cm}}", "incorrect"),
    ("12", "The answer is 12 dollars.", "correct"),
    ("(C)", "\\boxed{C}", "correct"),
    ("\\text{(C)}", "\\boxed{\\text{(D)}}", "incorrect"),
    # AIME-style integers, expressions, equations
    ("204", "\\boxed{204}", "correct"),
    ("25", "\\boxed{025}", "correct"),
    ("204", "\\boxed{024}", "incorrect"),
    ("x^2+2x+1", "\\boxed{(x+1)^2}", "correct"),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", "correct"),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{6}}", "incorrect"),
    ("3", "\\boxed{x = 3}", "correct"),
    ("2", "\\boxed{1}\n\nWait, I made an error. \\boxed{2}", "correct"),  # several boxes: the last wins
    ("1", "\\boxed{1}\n\nWait, I made an error. \\boxed{2}", "incorrect"),
    ("4", "<think>maybe \\boxed{3}</think>\n\nThe answer is \\boxed{4}.", "correct"),
    ("3", "<think>maybe \\boxed{3}</think>\n\nThe answer is \\boxed{4}.", "incorrect"),
    ("5", "I do not know how to solve this.", "no_answer"),
    ("5", "", "no_answer"),
]


def test_answer_forms() -> None:
    verdicts = verify_batch([(g, c) for g, c, _ in FORMS], timeout_s=5.0)
    wrong = [(g, c, want, v) for (g, c, want), v in zip(FORMS, verdicts, strict=True) if v.status != want]
    assert wrong == []
    for v in verdicts:
        assert v.is_correct == {"correct": True, "incorrect": False}.get(v.status)


def test_answer_format_and_extracted_from() -> None:
    items = [("7", "\\boxed{7}"), ("7", "So the final answer is 7."), ("7", "Seven, I guess.")]
    loose = verify_batch(items)
    assert [(v.status, v.extracted_from) for v in loose] == [
        ("correct", "box"),
        ("correct", "statement"),
        ("no_answer", "none"),
    ]
    strict = verify_batch(items, answer_format="boxed")
    assert [(v.status, v.extracted_from) for v in strict] == [
        ("correct", "box"),
        ("no_answer", "none"),
        ("no_answer", "none"),
    ]
    with pytest.raises(ValueError, match="answer_format"):
        verify_batch(items, answer_format="anything")


def test_cut_off_completions_are_never_correct() -> None:
    right = "Let me see. So it is \\boxed{12}. Let me double-check that by"
    items3 = [("12", right, "length"), ("12", "<think>so \\boxed{12}, then", None), ("12", right, "stop")]
    for answer_format in ("boxed", "boxed_or_final_statement"):
        verdicts = verify_batch(items3, answer_format=answer_format)
        assert [v.status for v in verdicts] == ["no_answer", "no_answer", "correct"]
        # The same finish reasons as a keyword list.
        reasons = ["length", None, "stop"]
        kw = verify_batch([it[:2] for it in items3], answer_format=answer_format, finish_reasons=reasons)
        assert kw == verdicts
    with pytest.raises(ValueError, match="finish_reasons"):
        verify_batch([("1", "\\boxed{1}")], finish_reasons=[])


def test_bad_items_never_raise() -> None:
    (item, answer) = fresh_item()
    items = [
        (None, "\\boxed{1}"),  # no gold
        ("", "\\boxed{1}"),
        ("1", None),  # no completion
        ("1", 12345),  # not text
        "not a pair",
        ("only one",),
        (7, "\\boxed{7}"),  # numeric gold, as Parquet gives it
        ("\\$", "\\boxed{1}"),  # a gold that is only notation
        item,
    ]
    verdicts = verify_batch(items, timeout_s=TIMEOUT_S)  # type: ignore[arg-type]
    assert [v.status for v in verdicts] == [
        "error",
        "error",
        "no_answer",
        "error",
        "error",
        "error",
        "correct",
        "error",
        "correct",
    ]
    assert verdicts[-1].extracted == answer
    assert verify_batch([], timeout_s=TIMEOUT_S) == []


def test_duplicates_are_verified_once(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[int] = []
    real_run = Pool.run

    def counting_run(self, calls, timeout_s, size):
        sent.append(len(calls))
        return real_run(self, calls, timeout_s, size)

    monkeypatch.setattr(Pool, "run", counting_run)
    n = next(_fresh)
    items = [
        (str(n), f"\\boxed{{{n}}}"),
        (str(n), f"A different road to the same place.\n\n\\boxed{{{n}}}"),  # same (gold, extracted)
        (str(n), f"The answer is ${n}$."),  # the same normalised pair from a statement
        (str(n), f"\\boxed{{{n + 1}}}"),
    ]
    first = verify_batch(items, timeout_s=TIMEOUT_S)
    assert [(v.status, v.extracted_from) for v in first] == [
        ("correct", "box"),
        ("correct", "box"),
        ("correct", "statement"),
        ("incorrect", "box"),
    ]
    assert sent == [2]
    again = verify_batch(list(reversed(items)), timeout_s=TIMEOUT_S)  # all from the cache now
    assert again == list(reversed(first))
    assert sent == [2]


# --- adversarial inputs ---------------------------------------------------------------------------------------------

MEGABYTE = "Let me reconsider the whole setup from the beginning.\n\nWait, " * 18_000  # ~1 MB

ADVERSARIAL = {
    "exponent tower": "\\boxed{9^{9^{9^{9^{9}}}}}",
    "huge power": "\\boxed{10^{10^{10}}}",
    "huge factorial": "\\boxed{100000!}",
    "huge factorial of a power": "\\boxed{(10^{6})!}",
    "10,000 nested parentheses": "\\boxed{" + "(" * 10_000 + "1" + ")" * 10_000 + "}",
    "frac nested 3,000 deep": "\\boxed{" + "\\frac{" * 3_000 + "1" + "}{2}" * 3_000 + "}",
    "sqrt nested 2,000 deep": "\\boxed{" + "\\sqrt{" * 2_000 + "2" + "}" * 2_000 + "}",
    "megabyte completion, tower at the end": MEGABYTE + "\\boxed{9^{9^{9^{9}}}}",
    "megabyte completion, no box": MEGABYTE,
    "megabyte single box": "\\boxed{" + "x+" * 500_000 + "1}",
}


@pytest.fixture
def warm_pool() -> None:
    """Start the pool before a test times anything, even when the test runs alone."""
    item, answer = fresh_item()
    assert verify_batch([item], timeout_s=TIMEOUT_S, workers=2) == [boxed(answer)]


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_returns_in_time_and_pool_keeps_working(name: str, warm_pool: None) -> None:
    t0 = time.perf_counter()
    (verdict,), latency = verify_batch_timed([("7", ADVERSARIAL[name])], timeout_s=TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    assert verdict.status in ("timeout", "error", "incorrect", "no_answer"), verdict
    assert latency[0] <= TIMEOUT_S + 1.0
    assert elapsed <= TIMEOUT_S + 1.0, f"{name}: {elapsed:.2f} s"
    item, answer = fresh_item()
    assert verify_batch([item], timeout_s=TIMEOUT_S) == [boxed(answer)]


def test_budget_ends_adversarial_answers_without_a_worker(warm_pool: None) -> None:
    items = [("7", ADVERSARIAL[k]) for k in ("exponent tower", "huge factorial", "frac nested 3,000 deep")] * 30
    t0 = time.perf_counter()
    verdicts, latency = verify_batch_timed(items, timeout_s=5.0)
    assert time.perf_counter() - t0 < 1.0  # 90 items that would each hold a worker for 5 s
    assert {v.status for v in verdicts} == {"timeout"} and max(latency) == 0.0


def test_a_hang_within_the_budget_is_killed_at_its_deadline(warm_pool: None) -> None:
    # Within the budget (a symbolic exponent under a million), but sympy works on it for minutes.
    hang = "\\boxed{(x+1)^{900000}}"
    normal = [fresh_item() for _ in range(6)]
    items = [it for it, _ in normal[:3]] + [("7", hang)] + [it for it, _ in normal[3:]]
    t0 = time.perf_counter()
    verdicts, latency = verify_batch_timed(items, timeout_s=TIMEOUT_S, workers=2)
    elapsed = time.perf_counter() - t0
    assert [v for i, v in enumerate(verdicts) if i != 3] == [boxed(a) for _, a in normal]
    assert verdicts[3] == Verdict("timeout", None, "(x+1)^{900000}", "box")
    assert max(latency) <= TIMEOUT_S + 1.0
    assert elapsed < TIMEOUT_S + 3.0


def test_worker_killed_mid_item_gives_error_and_is_replaced() -> None:
    pool = Pool(WORKER_MEMORY_HEADROOM_BYTES, preload=())  # no math-verify warm-up: this is about processes
    try:
        out: list = []
        call = (time.sleep, (30,))
        runner = threading.Thread(target=lambda: out.append(pool.run([call], 60.0, 1)))
        runner.start()
        deadline = time.monotonic() + 60
        while not (pool.workers and pool.workers[0].job is not None) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(pool.workers[0].pid, signal.SIGKILL)  # as the kernel's OOM killer would
        runner.join(10)
        assert not runner.is_alive()
        (result,), _ = out[0]
        assert result[0] == "error"
        # A worker that dies while idle: the next call goes to a fresh one.
        results, _ = pool.run([(len, ("ab",))], 5.0, 1)
        assert results == [("ok", 2)]
        os.kill(pool.workers[0].pid, signal.SIGKILL)
        time.sleep(0.2)
        results, _ = pool.run([(len, ("abc",))], 5.0, 1)
        assert results == [("ok", 3)]
    finally:
        pool.shutdown()


def test_memory_limit_turns_a_memory_bomb_into_an_error() -> None:
    pool = Pool(32 << 20, preload=())  # 32 MiB of headroom
    try:
        (result,), _ = pool.run([(len, ("1" * (80 << 20),))], 30.0, 1)  # too large even to receive
        assert result[0] == "error"
        (result,), _ = pool.run([(bytearray, (200 << 20,))], 30.0, 1)  # received, but too large to allocate
        assert result == ("error", "MemoryError")
        results, _ = pool.run([(len, ("1",))], 5.0, 1)
        assert results == [("ok", 1)]
    finally:
        pool.shutdown()


# --- the pool as a library for other verifiers ----------------------------------------------------------------------


def test_run_calls_results_timeouts_and_errors() -> None:
    t0 = time.perf_counter()
    results, latency = run_calls(time.sleep, [(0,), (30,), ("not a number",)], timeout_s=TIMEOUT_S, workers=2)
    assert results[0] == ("ok", None)
    assert results[1] == ("timeout", None) and latency[1] <= TIMEOUT_S + 1.0
    assert results[2][0] == "error" and "TypeError" in results[2][1]
    assert time.perf_counter() - t0 < TIMEOUT_S + 2.0
    results, latency = run_calls(check_math, [("1", "1"), ("1", "2")], timeout_s=5.0)
    assert results == [("ok", ("correct", True)), ("ok", ("incorrect", False))] and max(latency) < 5.0


def test_run_calls_refuses_functions_of_main() -> None:
    def local() -> None:
        pass

    local.__module__ = "__main__"
    with pytest.raises(ValueError, match="__main__"):
        run_calls(local, [()], timeout_s=1.0)


@pytest.mark.parametrize(
    "python, preload, fragment",
    [("/nonexistent/python3", ("ckptdpo.verify.math",), "nonexistent"), (sys.executable, ("no_such_mod",), "no_such")],
)
def test_workers_that_cannot_start_raise_one_clear_error(python: str, preload: tuple, fragment: str) -> None:
    pool = Pool(preload=preload, python=python)
    try:
        with pytest.raises(WorkersUnavailable, match=fragment):
            pool.run([(check_math, ("1", "1"))], 5.0, 1)
    finally:
        pool.shutdown()


def test_works_from_threads() -> None:
    results: dict[int, list[Verdict]] = {}
    expected: dict[int, list[str]] = {}

    def work(k: int) -> None:
        batch = [fresh_item() for _ in range(5)]
        expected[k] = [a for _, a in batch]
        results[k] = verify_batch([it for it, _ in batch], timeout_s=TIMEOUT_S)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    for k in range(3):
        assert results[k] == [boxed(a) for a in expected[k]]


def test_shutdown_and_restart() -> None:
    from ckptdpo.verify import shutdown_pool

    shutdown_pool()
    item, answer = fresh_item()
    assert verify_batch([item], timeout_s=TIMEOUT_S) == [boxed(answer)]


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        verify_batch([("1", "\\boxed{1}")], timeout_s=0)
    with pytest.raises(ValueError):
        verify_batch([("1", "\\boxed{1}")], workers=0)


# --- CLI -------------------------------------------------------------------------------------------------------------


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_cli_happy_path(tmp_path, capsys) -> None:
    src = tmp_path / "in.jsonl"
    rows = [
        {"id": "a", "answer": "\\frac{1}{2}", "text": "<think>hmm</think> \\boxed{0.5}"},
        {"id": "b", "answer": "3", "text": "\\boxed{4}"},
        {"id": "c", "answer": "3", "text": "no idea"},
        {"id": "d", "answer": "7", "text": "\\boxed{9^{9^{9^{9^{9}}}}}"},
        {"id": "e", "answer": "12", "text": "Adding up, the final answer is 12."},
    ]
    write_jsonl(src, rows)
    out = tmp_path / "sub" / "verdicts.parquet"
    argv = ["verify", str(src), "-o", str(out), "--gold-column", "answer", "--completion-column", "text"]
    assert cli_main(argv + ["--timeout-s", str(TIMEOUT_S), "--workers", "2"]) == 0
    table = pq.read_table(out)
    assert table.column_names == ["id", "answer", "text", "status", "is_correct", "extracted", "extracted_from"]
    assert table.column("id").to_pylist() == ["a", "b", "c", "d", "e"]
    assert table.column("status").to_pylist() == ["correct", "incorrect", "no_answer", "timeout", "correct"]
    assert table.column("is_correct").to_pylist() == [True, False, None, None, True]
    assert table.column("extracted").to_pylist() == ["0.5", "4", None, "9^{9^{9^{9^{9}}}}", "12"]
    assert table.column("extracted_from").to_pylist() == ["box", "box", "none", "box", "statement"]
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "2/5" in printed and "items/s" in printed
    assert "extracted from box" in printed and "60.0%" in printed and "extracted from statement" in printed
    assert not [p for p in out.parent.iterdir() if p.name != out.name]  # no temp files left behind

    # Verifying an earlier output again replaces its verdict columns; --answer-format boxed ignores statements.
    out2 = tmp_path / "again.parquet"
    argv = ["verify", str(out), "-o", str(out2), "--gold-column", "answer", "--completion-column", "text"]
    assert cli_main(argv + ["--timeout-s", str(TIMEOUT_S), "--answer-format", "boxed"]) == 0
    again = pq.read_table(out2)
    assert again.column_names == table.column_names
    assert again.column("status").to_pylist()[4] == "no_answer"


def test_cli_finish_reason_column(tmp_path) -> None:
    src = tmp_path / "in.jsonl"
    rows = [
        {"gold": "5", "completion": "so \\boxed{5}. Let me also check", "finish_reason": "length"},
        {"gold": "5", "completion": "so \\boxed{5}.", "finish_reason": "stop"},
    ]
    write_jsonl(src, rows)
    out = tmp_path / "out.parquet"
    assert cli_main(["verify", str(src), "-o", str(out)]) == 0
    assert pq.read_table(out).column("status").to_pylist() == ["no_answer", "correct"]
    # Naming a column that is not there is a user error; nothing is written.
    out2 = tmp_path / "out2.parquet"
    assert cli_main(["verify", str(src), "-o", str(out2), "--finish-reason-column", "why"]) == 2
    assert not out2.exists()


def test_cli_missing_column_writes_nothing(tmp_path, capsys) -> None:
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"gold": "1", "output": "\\boxed{1}"}])
    out = tmp_path / "out.parquet"
    assert cli_main(["verify", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "completion" in err and err.count("\n") == 1
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [src]


def test_cli_five_megabyte_completion_is_refused(tmp_path, capsys) -> None:
    src = tmp_path / "in.jsonl"
    huge = "Wait, let me check that again. " * 170_000 + "\\boxed{1}"  # ~5 MB
    write_jsonl(src, [{"gold": "1", "completion": "\\boxed{1}"}, {"gold": "1", "completion": huge}])
    out = tmp_path / "out.parquet"
    assert cli_main(["verify", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "row 1" in err and "--max-chars" in err and err.count("\n") == 1
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [src]
    # Raising the limit, as the message says, verifies it.
    assert cli_main(["verify", str(src), "-o", str(out), "--max-chars", "6000000"]) == 0
    assert pq.read_table(out).column("status").to_pylist() == ["correct", "correct"]


@pytest.mark.parametrize(
    "extra, fragment",
    [(["--timeout-s", "0"], "--timeout-s"), (["--workers", "0"], "--workers"), (["--max-chars", "0"], "--max-chars")],
)
def test_cli_bad_options(tmp_path, capsys, extra, fragment) -> None:
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"gold": "1", "completion": "\\boxed{1}"}])
    out = tmp_path / "out.parquet"
    assert cli_main(["verify", str(src), "-o", str(out), *extra]) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()


def test_cli_output_must_be_parquet(tmp_path, capsys) -> None:
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"gold": "1", "completion": "\\boxed{1}"}])
    assert cli_main(["verify", str(src), "-o", str(tmp_path / "out.jsonl")]) == 2
    assert ".parquet" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [src]


def test_cli_mixed_column_types_is_one_sentence_and_exit_2(tmp_path):
    """A JSONL column holding a list in one row and a string in another is a user error, not a traceback."""
    import subprocess
    import sys

    src = tmp_path / "mixed.jsonl"
    src.write_text('{"gold": [1], "completion": "x"}\n{"gold": "1", "completion": "y"}\n')
    out = tmp_path / "out.parquet"
    r = subprocess.run(
        [sys.executable, "-m", "commands", "verify", str(src), "-o", str(out)], capture_output=True, text=True
    )
    assert r.returncode == 2 and "mixes value types" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_verify_config_answer_format() -> None:
    from pydantic import ValidationError

    from ckptdpo.configs.stages import VerifyConfig

    assert VerifyConfig().answer_format == "boxed_or_final_statement"
    assert VerifyConfig(answer_format="boxed").answer_format == "boxed"
    with pytest.raises(ValidationError, match="answer_format"):
        VerifyConfig(answer_format="anything")

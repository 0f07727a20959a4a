"""Answer extraction, math-verify in the killable pool (tricky and adversarial answers), and `ckptdpo verify`."""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time

import pyarrow.parquet as pq
import pytest

from ckptdpo import verify as V
from ckptdpo.verify import Verdict, extract_answer, verify_batch, verify_batch_timed
from commands.cli import main as cli_main

TIMEOUT_S = 1.0
_fresh = itertools.count(1000)


def fresh_item() -> tuple[tuple[str, str], str]:
    """A normal item whose verdict cannot come from the cache, so it proves the pool itself still works."""
    n = next(_fresh)
    return (str(n), f"Adding up gives {n}.\n\n**Final Answer**\n\\boxed{{{n}}}"), str(n)


# --- extraction ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("first \\boxed{1}, then\n\nWait, no: \\boxed{2}", "2"),  # the last box wins
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # nested braces
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not close the box
        ("\\boxed{\\left\\{ x \\right\\}}", "\\left\\{ x \\right\\}"),
        ("the answer is $\\boxed 7$", "7"),
        ("\\boxed {8}", "8"),
        ("\\fbox{9}", "9"),
        ("\\boxed{a} then \\fbox{b}", "b"),
        ("\\fbox{a} then \\boxed{b}", "b"),
        ("\\boxed{\\boxed{5}}", "5"),
        ("<think>try \\boxed{3}</think>\n\nSo the answer is \\boxed{4}.", "4"),  # after </think> first
        ("<think>it is \\boxed{3}.</think>\n\nThe answer is three.", "3"),  # then the whole text
        ("<think>\\boxed{1}</think> \\boxed{2} </think> \\boxed{6}", "6"),  # the last </think> counts
        ("I must use \\boxed{} at the end: \\boxed{12} \\boxed{}", "12"),  # empty boxes are skipped
        ("\\boxed{3}. Wait, so \\boxed{12", "3"),  # an unclosed (truncated) box is skipped
        ("\\boxedsymbol{3}", None),  # another command
        ("no box here, the answer is 5", None),
        ("", None),
    ],
)
def test_extract_answer(completion: str, expected: str | None) -> None:
    assert extract_answer(completion) == expected


def test_extract_answer_not_a_string() -> None:
    assert extract_answer(None) is None  # type: ignore[arg-type]
    assert extract_answer(123) is None  # type: ignore[arg-type]


def test_extract_answer_megabyte_completions_are_fast() -> None:
    reasoning = "Let me compute the area again.\n\nWait, that is not right. " * 100_000  # ~5.6 MB
    spam = "\\boxed{" + "{" * 40_000
    cases = [
        (reasoning + "\\boxed{17}", "17"),
        ("\\boxed{17}" + reasoning, "17"),  # the only box at the start: one backwards scan, not quadratic
        (reasoning + "</think>" + reasoning, None),
        ("\\boxed{17}" + spam * 100, None),  # unclosed brace spam: the scan budget gives up
    ]
    for text, expected in cases:
        t0 = time.perf_counter()
        got = extract_answer(text)
        elapsed = time.perf_counter() - t0
        assert got == expected
        assert elapsed < 0.5, f"extraction took {elapsed:.2f} s on {len(text):,} characters"


# --- verification: tricky answers -----------------------------------------------------------------------------------

TRICKY = [
    # (gold, completion, status, extracted)
    ("\\frac{1}{2}", "So the probability is \\boxed{0.5}.", "correct", "0.5"),
    ("0.5", "\\boxed{\\dfrac{1}{2}}", "correct", "\\dfrac{1}{2}"),
    ("0.5", "\\boxed{\\frac{1}{3}}", "incorrect", "\\frac{1}{3}"),
    ("1/2", "\\boxed{\\frac12}", "correct", "\\frac12"),
    ("1450000", "\\boxed{1,450,000}", "correct", "1,450,000"),
    ("1,450,000", "\\boxed{1450000}", "correct", "1450000"),
    ("1,450,000", "\\boxed{145,000}", "incorrect", "145,000"),
    ("(1, 2, 3)", "\\boxed{(1,2,3)}", "correct", "(1,2,3)"),
    ("(1, 2, 3)", "\\boxed{(1,3,2)}", "incorrect", "(1,3,2)"),  # tuples are ordered
    ("[0, 1)", "\\boxed{[0,1)}", "correct", "[0,1)"),
    ("[0, 1)", "\\boxed{[0,1]}", "incorrect", "[0,1]"),  # interval ends matter
    ("(-\\infty, 2]", "\\boxed{(-\\infty,2]}", "correct", "(-\\infty,2]"),
    ("\\{1,2,3\\}", "\\boxed{\\{3,2,1\\}}", "correct", "\\{3,2,1\\}"),  # sets are not
    ("\\{1,2,3\\}", "\\boxed{\\{1,2\\}}", "incorrect", "\\{1,2\\}"),
    ("Monday", "\\boxed{\\text{Monday}}", "correct", "\\text{Monday}"),
    ("Monday", "\\boxed{\\text{Tuesday}}", "incorrect", "\\text{Tuesday}"),
    ("\\text{B}", "The correct option is \\boxed{B}", "correct", "B"),
    ("B", "\\boxed{C}", "incorrect", "C"),
    ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{\\sqrt{3}}{2}}", "correct", "\\frac{\\sqrt{3}}{2}"),
    ("2\\sqrt{3}", "\\boxed{\\sqrt{12}}", "correct", "\\sqrt{12}"),
    ("5", "x = 5, so \\boxed{x=5}", "correct", "x=5"),
    ("2", "\\boxed{1}\n\nWait, I made an error. \\boxed{2}", "correct", "2"),  # several boxes: the last wins
    ("1", "\\boxed{1}\n\nWait, I made an error. \\boxed{2}", "incorrect", "2"),
    ("4", "<think>maybe \\boxed{3}</think>\n\nThe answer is \\boxed{4}.", "correct", "4"),
    ("1450000", "The answer is $1,450,000$.", "correct", "1,450,000"),  # no box: math-verify's extraction
    ("12", "so the final answer is 12.", "correct", "12"),
    ("3", "the answer: 4", "incorrect", "4"),
    ("5", "I do not know how to solve this.", "no_answer", None),
    ("5", "", "no_answer", None),
]


def test_tricky_answers() -> None:
    verdicts = verify_batch([(g, c) for g, c, _, _ in TRICKY], timeout_s=5.0)
    got = [(v.status, v.extracted) for v in verdicts]
    want = [(s, e) for _, _, s, e in TRICKY]
    assert got == want
    for v in verdicts:
        assert v.is_correct == {"correct": True, "incorrect": False}.get(v.status)


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
        "correct",
    ]
    assert verdicts[-1].extracted == answer
    assert verify_batch([], timeout_s=TIMEOUT_S) == []


def test_duplicates_are_verified_once(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[int] = []
    real_run = V._Pool.run

    def counting_run(self, jobs, timeout_s, size):
        sent.append(len(jobs))
        return real_run(self, jobs, timeout_s, size)

    monkeypatch.setattr(V._Pool, "run", counting_run)
    n = next(_fresh)
    items = [
        (str(n), f"\\boxed{{{n}}}"),
        (str(n), f"A different road to the same place.\n\n\\boxed{{{n}}}"),  # same (gold, extracted)
        (str(n), f"\\boxed{{{n + 1}}}"),
    ]
    first = verify_batch(items, timeout_s=TIMEOUT_S)
    assert [v.status for v in first] == ["correct", "correct", "incorrect"]
    assert sent == [2]
    again = verify_batch(list(reversed(items)), timeout_s=TIMEOUT_S)  # all from the cache now
    assert again == list(reversed(first))
    assert sent == [2]


# --- verification: adversarial inputs -----------------------------------------------------------------------------

MEGABYTE = "Let me reconsider the whole setup from the beginning.\n\nWait, " * 18_000  # ~1 MB

ADVERSARIAL = {
    "exponent tower": "\\boxed{9^{9^{9^{9^{9}}}}}",
    "huge power": "\\boxed{10^{10^{10}}}",
    "huge factorial": "\\boxed{100000!}",
    "huge factorial of a power": "\\boxed{(10^{6})!}",
    "10,000 nested parentheses": "\\boxed{" + "(" * 10_000 + "1" + ")" * 10_000 + "}",
    "megabyte completion, tower at the end": MEGABYTE + "\\boxed{9^{9^{9^{9}}}}",
    "megabyte completion, no box": MEGABYTE,
    "megabyte single box": "\\boxed{" + "x+" * 500_000 + "1}",
}


@pytest.fixture
def warm_pool() -> None:
    """Start the pool (and its fork server) before a test times anything, even when the test runs alone."""
    item, answer = fresh_item()
    assert verify_batch([item], timeout_s=TIMEOUT_S, workers=2) == [Verdict("correct", True, answer)]


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_returns_in_time_and_pool_keeps_working(name: str, warm_pool: None) -> None:
    t0 = time.perf_counter()
    (verdict,), latency = verify_batch_timed([("7", ADVERSARIAL[name])], timeout_s=TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    assert verdict.status in ("timeout", "error", "incorrect", "no_answer"), verdict
    assert latency[0] <= TIMEOUT_S + 1.0
    # The wall time also covers a worker start after a kill (a fork of the preloaded fork server).
    assert elapsed <= TIMEOUT_S + 1.0, f"{name}: {elapsed:.2f} s"
    item, answer = fresh_item()
    assert verify_batch([item], timeout_s=TIMEOUT_S) == [Verdict("correct", True, answer)]


def test_hanging_items_do_not_stall_the_rest_of_a_batch(warm_pool: None) -> None:
    normal = [fresh_item() for _ in range(12)]
    items = [it for it, _ in normal[:6]] + [("7", ADVERSARIAL["exponent tower"])]
    items += [it for it, _ in normal[6:]] + [("1", ADVERSARIAL["10,000 nested parentheses"])]
    t0 = time.perf_counter()
    verdicts, latency = verify_batch_timed(items, timeout_s=TIMEOUT_S, workers=2)
    elapsed = time.perf_counter() - t0
    statuses = [v.status for v in verdicts]
    assert statuses[6] == "timeout" and statuses[-1] == "timeout"
    assert [v for i, v in enumerate(verdicts) if i not in (6, len(items) - 1)] == [
        Verdict("correct", True, a) for _, a in normal
    ]
    assert max(latency) <= TIMEOUT_S + 1.0
    assert elapsed < 2 * TIMEOUT_S + 3.0  # two workers: the two hangs overlap with the normal items


def test_worker_killed_mid_item_gives_error_and_is_replaced() -> None:
    pool = V._Pool(V.WORKER_MEMORY_HEADROOM_BYTES)
    try:
        out: list = []
        job = V._Job("box", "7", "9^{9^{9^{9^{9}}}}")
        runner = threading.Thread(target=lambda: out.append(pool.run([job], 30.0, 1)))
        runner.start()
        deadline = time.monotonic() + 30
        while not (pool.workers and pool.workers[0].job is not None) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        os.kill(pool.workers[0].proc.pid, signal.SIGKILL)  # as the kernel's OOM killer would
        runner.join(10)
        assert not runner.is_alive()
        (result,), _ = out[0]
        assert result == ("error", None, "9^{9^{9^{9^{9}}}}")
        # A worker that dies while idle: the next job goes to a fresh one.
        results, _ = pool.run([V._Job("box", "2", "2")], 5.0, 1)
        assert results == [("correct", True, "2")]
        os.kill(pool.workers[0].proc.pid, signal.SIGKILL)
        pool.workers[0].proc.join(5)
        results, _ = pool.run([V._Job("box", "3", "3")], 5.0, 1)
        assert results == [("correct", True, "3")]
    finally:
        pool.shutdown()


def test_memory_limit_turns_a_memory_bomb_into_an_error() -> None:
    pool = V._Pool(32 << 20)  # 32 MiB of headroom
    try:
        bomb = V._Job("box", "1" * (80 << 20), "1")  # an 80 MB gold answer cannot even be received
        (result,), _ = pool.run([bomb], 30.0, 1)
        assert result[0] == "error"
        results, _ = pool.run([V._Job("box", "1", "1")], 5.0, 1)
        assert results == [("correct", True, "1")]
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
        assert results[k] == [Verdict("correct", True, a) for a in expected[k]]


def test_shutdown_and_restart() -> None:
    V.shutdown_pool()
    item, answer = fresh_item()
    assert verify_batch([item], timeout_s=TIMEOUT_S) == [Verdict("correct", True, answer)]


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
    ]
    write_jsonl(src, rows)
    out = tmp_path / "sub" / "verdicts.parquet"
    argv = ["verify", str(src), "-o", str(out), "--gold-column", "answer", "--completion-column", "text"]
    assert cli_main(argv + ["--timeout-s", str(TIMEOUT_S), "--workers", "2"]) == 0
    table = pq.read_table(out)
    assert table.column_names == ["id", "answer", "text", "status", "is_correct", "extracted"]
    assert table.column("id").to_pylist() == ["a", "b", "c", "d"]
    assert table.column("status").to_pylist() == ["correct", "incorrect", "no_answer", "timeout"]
    assert table.column("is_correct").to_pylist() == [True, False, None, None]
    assert table.column("extracted").to_pylist() == ["0.5", "4", None, "9^{9^{9^{9^{9}}}}"]
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "1/4" in printed and "items/s" in printed
    assert not [p for p in out.parent.iterdir() if p.name != out.name]  # no temp files left behind

    # Verifying an earlier output again replaces its verdict columns.
    out2 = tmp_path / "again.parquet"
    argv = ["verify", str(out), "-o", str(out2), "--gold-column", "answer", "--completion-column", "text"]
    assert cli_main(argv + ["--timeout-s", str(TIMEOUT_S)]) == 0
    assert pq.read_table(out2).column_names == table.column_names


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

"""Checkpoint location, paragraph counts, resampling schedules and the `ckptdpo checkpoints` command."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptdpo.checkpoints import (
    POLICIES,
    Checkpoint,
    count_paragraphs,
    locate_checkpoints,
    schedule_resample_points,
    split_at_checkpoint,
    trajectory_stats,
)
from commands.cli import main

DEFAULT = ("Wait", "Alternatively", "But")


def reference_checkpoints(text: str, markers=DEFAULT) -> list[tuple[int, str]]:
    """Independent char-by-char scan: (offset, marker) of each marker that starts a paragraph and is a whole word."""
    found = []
    for i in range(2, len(text) + 1):
        if text[i - 2] != "\n" or text[i - 1] != "\n":
            continue
        hits = []
        for m in markers:
            if text[i : i + len(m)] != m:
                continue
            end = i + len(m)
            ends_word = m[-1].isalnum() or m[-1] == "_"
            if ends_word and end < len(text) and (text[end].isalnum() or text[end] == "_"):
                continue
            hits.append(m)
        if hits:
            found.append((i, max(hits, key=len)))
    return found


# --- locate_checkpoints: examples ----------------------------------------------------------------------------------


def test_finds_markers_after_paragraph_breaks_only():
    text = "Wait at the start.\n\nWait, no.\n\nSo x = 1.\nBut a line break is not a paragraph."
    text += "\n\nBut then y.\n\nAlternatively"
    cps = locate_checkpoints(text)
    assert [(cp.index, cp.marker) for cp in cps] == [(1, "Wait"), (2, "But"), (3, "Alternatively")]
    for cp in cps:
        assert text[cp.char - 2 : cp.char] == "\n\n"
        assert text.startswith(cp.marker, cp.char)
    assert cps[0].char == text.index("Wait, no.")
    assert cps[2].char == len(text) - len("Alternatively")  # a marker at the very end counts


@pytest.mark.parametrize(
    "after, is_checkpoint",
    [
        (",", True),
        (".", True),
        (" ", True),
        ("!", True),
        ("'s", True),
        ("\n", True),
        ("", True),
        ("ing", False),  # Waiting
        ("2", False),
        ("_", False),
        ("é", False),  # a unicode letter continues the word
        ("٣", False),  # Arabic-Indic digit: still a word character
    ],
)
def test_whole_word(after, is_checkpoint):
    cps = locate_checkpoints("x\n\nWait" + after)
    assert (len(cps) == 1) is is_checkpoint
    if is_checkpoint:
        assert cps[0] == Checkpoint(index=1, char=3, marker="Wait")


def test_false_markers_and_case():
    text = "a\n\nButterfly\n\nWaiting\n\nwait,\n\nWAIT\n\nBUT\n\nalternatively\n\nAlternative\n\n Wait\n\nx Wait"
    assert locate_checkpoints(text) == []


def test_extra_newlines_and_text_start():
    # "\n\n\nWait": the last two newlines are the paragraph break, so the marker is a checkpoint.
    assert locate_checkpoints("a\n\n\nWait") == [Checkpoint(1, 4, "Wait")]
    assert locate_checkpoints("a\n\n\n\n\nBut") == [Checkpoint(1, 6, "But")]
    # The start of the text is no paragraph break, but a literal "\n\n" at the start is.
    assert locate_checkpoints("Wait, what?") == []
    assert locate_checkpoints("\n\nWait") == [Checkpoint(1, 2, "Wait")]
    # "\r\n\r\n" is not "\n\n".
    assert locate_checkpoints("a\r\n\r\nWait") == []
    assert locate_checkpoints("") == []


def test_custom_markers_longest_wins_and_regex_escaping():
    text = "a\n\nBut then x\n\nBut y\n\nHmm, ok\n\nHmm? no\n\na.b c\n\naxb d"
    cps = locate_checkpoints(text, ["But", "But then", "Hmm,", "a.b"])
    assert [cp.marker for cp in cps] == ["But then", "But", "Hmm,", "a.b"]
    # A marker that ends with punctuation ends its own word: "Hmm,x" still counts.
    assert [cp.marker for cp in locate_checkpoints("a\n\nHmm,x", ["Hmm,"])] == ["Hmm,"]
    # Duplicates in the marker list change nothing.
    assert locate_checkpoints(text, ["But", "But"]) == locate_checkpoints(text, ["But"])


@pytest.mark.parametrize("markers", [(), ("",), (" Wait",), ("Wait ",), ("\nWait",)])
def test_bad_markers(markers):
    with pytest.raises(ValueError):
        locate_checkpoints("a\n\nWait", markers)


# --- locate_checkpoints: properties against the reference scan -----------------------------------------------------

PIECES = ["\n", "\n\n", "\n\n\n", "Wait", "Waiting", "But", "Butterfly", "Alternatively", "wait", " ", ",", ".", "x"]
PIECES += ["_", "é", "2", "\r", "But then", "Hmm,"]
texts = st.lists(st.sampled_from(PIECES) | st.text(max_size=3), max_size=60).map("".join)


@settings(max_examples=400, deadline=None)
@given(texts)
def test_matches_reference_scan(text):
    cps = locate_checkpoints(text)
    assert [(cp.char, cp.marker) for cp in cps] == reference_checkpoints(text)
    assert [cp.index for cp in cps] == list(range(1, len(cps) + 1))
    for cp in cps:
        assert text[cp.char - 2 : cp.char] == "\n\n"
        prefix, suffix = split_at_checkpoint(text, cp)
        assert prefix + suffix == text
        assert prefix == text[: cp.char]
        assert suffix.startswith(cp.marker)
    # Every checkpoint opens a non-empty paragraph.
    assert len(cps) <= count_paragraphs(text)


@settings(max_examples=200, deadline=None)
@given(
    texts, st.lists(st.sampled_from(["Wait", "But", "But then", "Hmm,", "x", "é", "Wait."]), min_size=1, max_size=4)
)
def test_custom_markers_match_reference_scan(text, markers):
    cps = locate_checkpoints(text, markers)
    assert [(cp.char, cp.marker) for cp in cps] == reference_checkpoints(text, markers)


@settings(max_examples=300, deadline=None)
@given(st.characters())
def test_word_boundary_matches_isalnum_for_any_character(ch):
    cps = locate_checkpoints("a\n\nWait" + ch)
    assert (len(cps) == 1) is not (ch.isalnum() or ch == "_")


# --- paragraphs, split, stats ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", 0),
        ("one", 1),
        ("one\ntwo", 1),
        ("one\n\ntwo", 2),
        ("one\n\n\ntwo", 2),
        ("one\n\n\n\ntwo", 2),
        ("\n\none\n\n", 1),
        ("one\n\n   \n\ntwo", 2),
        ("\n\n\n\n", 0),
    ],
)
def test_count_paragraphs(text, expected):
    assert count_paragraphs(text) == expected


def test_split_rejects_foreign_checkpoint():
    text = "a\n\nWait, b"
    (cp,) = locate_checkpoints(text)
    assert split_at_checkpoint(text, cp) == ("a\n\n", "Wait, b")
    with pytest.raises(ValueError):
        split_at_checkpoint("a\n\nBut, b", cp)
    with pytest.raises(ValueError):
        split_at_checkpoint(text, Checkpoint(1, 99, "Wait"))


def test_trajectory_stats_by_correctness():
    texts = [
        "p\n\nWait, q\n\nBut r",  # 3 paragraphs, 2 checkpoints
        "p",  # 1, 0
        "p\n\nq\n\nWait\n\nWait\n\nWait",  # 5, 3
        "p\n\nq",  # 2, 0
    ]
    stats = trajectory_stats(texts, [True, False, False, None])
    assert stats["all"] == {
        "count": 4,
        "paragraphs": {"mean": 2.75, "median": 2.5, "max": 5},
        "checkpoints": {"mean": 1.25, "median": 1.0, "max": 3},
    }
    assert stats["correct"]["count"] == 1 and stats["correct"]["checkpoints"]["max"] == 2
    assert stats["incorrect"]["paragraphs"] == {"mean": 3.0, "median": 3.0, "max": 5}
    assert stats["unknown"]["count"] == 1
    assert set(trajectory_stats(texts)) == {"all"}
    assert trajectory_stats([], [])["correct"]["paragraphs"]["mean"] is None
    with pytest.raises(ValueError):
        trajectory_stats(texts, [True])


# --- schedules ------------------------------------------------------------------------------------------------------


def test_seed_schedule_example():
    assert schedule_resample_points(5) == [1, 1, 1, 1, 1, 2, 2, 3, 3, 4, 5]
    assert schedule_resample_points(1) == [1]
    assert schedule_resample_points(2) == [1, 1, 2, 2]


@pytest.mark.parametrize("n", range(1, 11))
def test_seed_schedule_small_n_draw_counts(n):
    draws = Counter(schedule_resample_points(n, "seed"))
    assert set(draws) == set(range(1, n + 1))
    assert draws[1] == n
    doubled = [i for i in range(2, n + 1) if draws[i] == 2]
    assert doubled == list(range(2, 2 + math.ceil((n - 1) / 2)))
    assert all(draws[i] == 1 for i in range(2 + len(doubled), n + 1))


@pytest.mark.parametrize("n", [11, 12, 19, 20, 37, 100, 2298])
def test_seed_schedule_deciles_above_ten(n):
    points = schedule_resample_points(n)
    assert len(points) == 10 == len(set(points))
    assert points[0] == 1 and points[-1] <= n
    # Exactly one draw in each tenth of the list; tenth t holds checkpoints floor(n*t/10)+1 .. floor(n*(t+1)/10).
    for t in range(10):
        assert sum(n * t // 10 < p <= n * (t + 1) // 10 for p in points) == 1


def test_decile_positions():
    assert schedule_resample_points(100) == [1, 11, 21, 31, 41, 51, 61, 71, 81, 91]
    assert schedule_resample_points(100, "decile") == schedule_resample_points(100)
    assert schedule_resample_points(5, "decile") == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert len(schedule_resample_points(3, "decile")) == 10


def test_other_policies():
    assert schedule_resample_points(4, "all") == [1, 2, 3, 4]
    assert schedule_resample_points(40, "all") == list(range(1, 41))
    assert schedule_resample_points(4, "uniform") == [1, 2, 3, 4]
    assert schedule_resample_points(19, "uniform") == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19]
    assert schedule_resample_points(3, "front") == [1, 1, 1, 2, 2, 3]
    front = Counter(schedule_resample_points(50, "front"))
    assert len(front) == 10 and sorted(front.values(), reverse=True) == list(range(10, 0, -1))
    assert min(front) == 1 and max(front) == 50 and front[1] == 10 and front[50] == 1


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 10, 11, 13, 64, 1000])
def test_every_policy_is_monotone_and_in_range(policy, n):
    points = schedule_resample_points(n, policy)
    assert points == sorted(points)
    assert all(1 <= p <= n for p in points)
    assert (points == []) is (n == 0)


def test_schedule_errors():
    with pytest.raises(ValueError, match="seed, uniform, all, decile, front"):
        schedule_resample_points(5, "late")
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(ValueError):
            schedule_resample_points(bad)


def test_schedule_accepts_numpy_ints():
    np = pytest.importorskip("numpy")
    assert schedule_resample_points(np.int64(5)) == schedule_resample_points(5)


# --- CLI ------------------------------------------------------------------------------------------------------------


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"sample_id": "s1", "completion": "a\n\nWait, b\n\nBut c", "status": "correct"},
    {"sample_id": "s2", "completion": "a\n\nb\n\nWaiting\n\nWait", "status": "incorrect"},
    {"sample_id": "s3", "completion": "a", "status": "no_answer"},
]


def test_cli_prints_table_by_correctness_and_writes_json(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "t.jsonl", ROWS)
    out = tmp_path / "out" / "cps.json"
    assert main(["checkpoints", str(src), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for group in ("all", "correct", "incorrect", "unknown"):
        assert group in printed
    records = json.loads(out.read_text())
    assert [r["sample_id"] for r in records] == ["s1", "s2", "s3"]
    assert [r["is_correct"] for r in records] == [True, False, None]
    assert records[0]["checkpoints"] == [
        {"index": 1, "char": 3, "marker": "Wait"},
        {"index": 2, "char": 12, "marker": "But"},
    ]
    assert [r["num_checkpoints"] for r in records] == [2, 1, 0]
    assert [r["num_paragraphs"] for r in records] == [3, 4, 1]


def test_cli_without_verdicts_and_custom_markers(tmp_path, capsys):
    rows = [{"text": "a\n\nHmm, b\n\nWait c"}, {"text": "a\n\nHmm"}]
    src = _write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "cps.json"
    argv = ["checkpoints", str(src), "--completion-column", "text", "--markers", "Hmm", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "incorrect" not in printed
    assert [r["num_checkpoints"] for r in json.loads(out.read_text())] == [1, 1]


def test_cli_is_correct_column_in_parquet(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "t.parquet"
    pq.write_table(pa.table({"completion": ["a\n\nWait", "b"], "is_correct": [True, False]}), src)
    assert main(["checkpoints", str(src)]) == 0
    assert "incorrect" in capsys.readouterr().out


@pytest.mark.parametrize(
    "rows, extra, needle",
    [
        ([{"text": "a"}], [], "completion"),
        ([{"completion": "a"}], ["--verdict-column", "ok"], "ok"),
        ([{"completion": "a", "status": "maybe"}], [], "status"),
        ([{"completion": None}, {"completion": "a"}], [], "completion"),
        ([{"completion": "a"}], ["--markers", " , "], "--markers"),
    ],
)
def test_cli_user_errors_exit_2_and_write_nothing(tmp_path, capsys, rows, extra, needle):
    src = _write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "cps.json"
    assert main(["checkpoints", str(src), "--json", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_missing_file_exit_2(tmp_path, capsys):
    assert main(["checkpoints", str(tmp_path / "nope.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_unwritable_json_exit_2(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "t.jsonl", ROWS)
    (tmp_path / "taken").write_text("a file, not a folder")
    assert main(["checkpoints", str(src), "--json", str(tmp_path / "taken" / "cps.json")]) == 2
    assert "--json" in capsys.readouterr().err

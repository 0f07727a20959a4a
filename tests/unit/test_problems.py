"""Problem loading (files, Hugging Face datasets), row validation, and the seeded demo generator."""

from __future__ import annotations

import json
import re
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ckptdpo.configs import ProblemsConfig
from ckptdpo.errors import UserError
from ckptdpo.problems import DEFAULT_DEMO_MIX, generate_demo_items, generate_demo_problems, load_problems
from ckptdpo.schemas import PROBLEMS, make_table
from ckptdpo.shards import content_id


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def file_cfg(path, **kw) -> ProblemsConfig:
    return ProblemsConfig(source="file", path=str(path), **kw)


ROWS = [
    {"id": "a-1", "problem": "What is 1 + 1?", "answer": "2"},
    {"id": "a-2", "problem": "  What is 2 + 2?\n", "answer": " 4 "},
    {"id": "a-3", "problem": "Solve $x^2 = 9$ for $x > 0$.", "answer": "3"},
]


def test_jsonl_rows_match_the_schema_and_keep_ids(tmp_path):
    ps = load_problems(file_cfg(write_jsonl(tmp_path / "p.jsonl", ROWS)))
    assert [r["problem_id"] for r in ps.rows] == ["a-1", "a-2", "a-3"]
    assert ps.rows[1]["problem"] == "What is 2 + 2?" and ps.rows[1]["answer"] == "4"
    assert ps.num_invalid == 0 and ps.invalid == []
    assert ps.source == f"file:{tmp_path / 'p.jsonl'}"
    assert {r["source"] for r in ps.rows} == {ps.source}
    make_table(ps.rows, PROBLEMS)  # exact columns


def test_relative_path_resolves_against_base_dir(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", ROWS)
    ps = load_problems(file_cfg("p.jsonl"), base_dir=tmp_path)
    assert len(ps.rows) == 3 and ps.source == "file:p.jsonl"
    with pytest.raises(UserError, match="not found"):
        load_problems(file_cfg("p.jsonl"), base_dir=tmp_path / "elsewhere")


def test_parquet_and_json_array_load_the_same_rows(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    (tmp_path / "p.json").write_text(json.dumps(ROWS))
    jsonl = load_problems(file_cfg(write_jsonl(tmp_path / "p.jsonl", ROWS))).rows
    parquet = load_problems(file_cfg(tmp_path / "p.parquet")).rows
    array = load_problems(file_cfg(tmp_path / "p.json")).rows
    strip = lambda rows: [{k: v for k, v in r.items() if k != "source"} for r in rows]  # noqa: E731
    assert strip(jsonl) == strip(parquet) == strip(array)


def test_unreadable_parquet_is_a_user_error(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="bad.parquet"):
        load_problems(file_cfg(tmp_path / "bad.parquet"))


def test_gsm8k_mapping_takes_the_text_after_the_last_marker(tmp_path):
    records = [
        {"question": "Janet sells eggs...", "answer": "She makes 9 * 2 = <<9*2=18>>18 dollars.\n#### 18"},
        {"question": "A house costs...", "answer": "Step #### one\n#### 1,450,000"},
        {"question": "Negative?", "answer": "#### -3.5"},
    ]
    cfg = file_cfg(write_jsonl(tmp_path / "gsm8k.jsonl", records), problem_field="question", answer_format="gsm8k")
    ps = load_problems(cfg)
    assert [r["answer"] for r in ps.rows] == ["18", "1450000", "-3.5"]
    assert ps.rows[0]["problem"] == "Janet sells eggs..."
    # No ids in GSM8K: content hashes, deterministic across loads.
    assert ps.rows[0]["problem_id"] == content_id("Janet sells eggs...", "18")
    assert load_problems(cfg).rows == ps.rows


def test_gsm8k_answer_without_marker_is_invalid(tmp_path):
    records = [{"question": "q1", "answer": "#### 5"}, {"question": "q2", "answer": "just 7"}]
    cfg = file_cfg(write_jsonl(tmp_path / "g.jsonl", records), problem_field="question", answer_format="gsm8k")
    with pytest.raises(UserError, match=r"row 2: answer has no '####'"):
        load_problems(cfg)


def test_missing_problem_column_suggests_the_field(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 1"}])
    with pytest.raises(UserError, match="set problems.problem_field: question"):
        load_problems(file_cfg(path))


def test_deepscaler_mapping_ignores_extra_columns(tmp_path):
    records = [
        {"problem": "Find $\\log_z w$.", "answer": "60", "solution": "long text"},
        {"problem": "Compute $\\frac{1}{2}+\\frac{1}{3}$.", "answer": "\\frac{5}{6}", "solution": "..."},
    ]
    (tmp_path / "deepscaler.json").write_text(json.dumps(records))
    ps = load_problems(file_cfg(tmp_path / "deepscaler.json"))
    assert [r["answer"] for r in ps.rows] == ["60", "\\frac{5}{6}"]
    assert all(len(r["problem_id"]) == 20 for r in ps.rows)  # no id column: content hashes


def test_hf_local_save_to_disk_dir_and_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"question": "q1", "answer": "x #### 1"}, {"question": "q2", "answer": "#### 2"}])
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "gsm8k"))
    cfg = ProblemsConfig(source="hf", path="gsm8k", split="test", problem_field="question", answer_format="gsm8k")
    ps = load_problems(cfg, base_dir=tmp_path)
    assert [(r["problem"], r["answer"]) for r in ps.rows] == [("q1", "1"), ("q2", "2")]
    assert ps.source == "hf:gsm8k:test"
    with pytest.raises(UserError, match="no split 'train'"):
        load_problems(cfg.model_copy(update={"split": "train"}), base_dir=tmp_path)
    # A single saved Dataset (no splits) loads whatever the split name.
    ds.save_to_disk(str(tmp_path / "single"))
    assert len(load_problems(cfg.model_copy(update={"path": str(tmp_path / "single")})).rows) == 2


def test_hf_local_data_folder(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "data_folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS)
    ps = load_problems(ProblemsConfig(source="hf", path=str(folder), split="train"))
    assert [r["problem_id"] for r in ps.rows] == ["a-1", "a-2", "a-3"]


def test_hub_name_offline_names_the_fix(tmp_path):
    cfg = ProblemsConfig(source="hf", path="openai/gsm8k", subset="main")
    with pytest.raises(UserError, match="save_to_disk"):
        load_problems(cfg, base_dir=tmp_path, offline=True)


def test_bad_rows_are_listed_with_row_numbers(tmp_path):
    records = [
        {"id": "1", "problem": "ok", "answer": "1"},
        {"id": "2", "problem": "", "answer": "1"},
        {"id": "3", "problem": "no answer"},
        {"id": "4", "problem": ["a list"], "answer": "  "},
        {"id": "5", "problem": "ok too", "answer": None},
    ]
    with pytest.raises(UserError) as e:
        load_problems(file_cfg(write_jsonl(tmp_path / "p.jsonl", records)))
    msg = str(e.value)
    assert "4 of 5 rows" in msg
    assert "row 2: empty problem" in msg and "row 3: missing answer" in msg and "row 5: missing answer" in msg
    assert "row 4: problem is a list, not text; empty answer" in msg
    assert "row 1:" not in msg and "skip_invalid: true" in msg


def test_long_lists_of_bad_rows_are_cut(tmp_path):
    records = [{"problem": f"p{i}", "answer": ""} for i in range(25)]
    with pytest.raises(UserError, match=r"row 10: empty answer, and 15 more\);") as e:
        load_problems(file_cfg(write_jsonl(tmp_path / "p.jsonl", records)))
    assert "row 11:" not in str(e.value)


def test_skip_invalid_counts_and_reports(tmp_path):
    records = [{"problem": "p1", "answer": "1"}, {"problem": "p2", "answer": ""}, {"answer": "3"}]
    ps = load_problems(file_cfg(write_jsonl(tmp_path / "p.jsonl", records), skip_invalid=True))
    assert [r["problem"] for r in ps.rows] == ["p1"]
    assert ps.num_invalid == 2 and ps.invalid == [(2, "empty answer"), (3, "missing problem")]


def test_duplicate_ids_with_different_content_are_an_error(tmp_path):
    records = [
        {"id": "x", "problem": "p1", "answer": "1"},
        {"id": "y", "problem": "p1", "answer": "1"},  # same text, other id: allowed
        {"id": "x", "problem": "p2", "answer": "2"},
    ]
    with pytest.raises(UserError, match=r"row 3: id 'x' already used.*id_field: null"):
        load_problems(file_cfg(write_jsonl(tmp_path / "p.jsonl", records)))
    ps = load_problems(file_cfg(tmp_path / "p.jsonl", id_field=None))
    assert len(ps.rows) == 2 and ps.num_duplicates == 1  # p1/1 twice hashes to one id


def test_exact_repeats_are_dropped_and_counted(tmp_path):
    records = [{"id": "x", "problem": "p1", "answer": "1"}] * 3 + [{"id": "y", "problem": "p2", "answer": "2"}]
    ps = load_problems(file_cfg(write_jsonl(tmp_path / "p.jsonl", records)))
    assert [r["problem_id"] for r in ps.rows] == ["x", "y"] and ps.num_duplicates == 2


def test_empty_or_missing_ids_fall_back_to_content_hashes(tmp_path):
    records = [{"id": "", "problem": "p1", "answer": "1"}, {"id": None, "problem": "p2", "answer": "2"}]
    records.append({"id": 7, "problem": "p3", "answer": "3"})
    ps = load_problems(file_cfg(write_jsonl(tmp_path / "p.jsonl", records)))
    assert [r["problem_id"] for r in ps.rows] == [content_id("p1", "1"), content_id("p2", "2"), "7"]


def test_limit_applies_after_validation(tmp_path):
    records = [{"problem": "p1", "answer": ""}] + [{"problem": f"p{i}", "answer": str(i)} for i in range(2, 7)]
    ps = load_problems(file_cfg(write_jsonl(tmp_path / "p.jsonl", records), limit=3, skip_invalid=True))
    assert [r["problem"] for r in ps.rows] == ["p2", "p3", "p4"] and ps.num_invalid == 1
    with pytest.raises(UserError, match="row 1"):  # every row is validated, not just the first `limit`
        load_problems(file_cfg(tmp_path / "p.jsonl", limit=3))


def test_numbers_as_answers_become_plain_strings(tmp_path):
    answers = [27, 27.0, 0.5, -3, 1e20, True, float("nan")]
    records = [{"problem": f"p{i}", "answer": a} for i, a in enumerate(answers)]
    # NaN is not valid JSON for most readers; Parquet holds it fine, but mixed types need JSON.
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ps = load_problems(file_cfg(path, skip_invalid=True))
    assert [r["answer"] for r in ps.rows] == ["27", "27", "0.5", "-3", "100000000000000000000"]
    assert [why for _, why in ps.invalid] == ["answer is a boolean", "answer is nan"]


def test_no_usable_rows_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": "", "answer": "1"}])
    with pytest.raises(UserError, match="no usable problems"):
        load_problems(file_cfg(path, skip_invalid=True))


# --- demo generator --------------------------------------------------------------------------------------------------

# Independent formulas per template: the numbers are read back from the problem text, not taken from the generator.
FORMULAS = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "add_mul": lambda a, b, c: a + b * c,
    "word_add": lambda a, b: a + b,
    "word_sub": lambda a, b: a - b,
    "word_mul": lambda a, b: a * b,
    "word_add_sub": lambda a, b, c: a + b - c,
    "word_mul_add": lambda a, b, c: a * b + c,
}
SHAPES = {
    "add": r"What is \d+ \+ \d+\?|Compute \d+ \+ \d+\.",
    "sub": r"What is \d+ - \d+\?",
    "mul": r"What is \d+ × \d+\?",
    "add_mul": r"What is \d+ \+ \d+ × \d+\?",
    "word_add": r".* has \d+ \w+ and buys \d+ more\. .*",
    "word_sub": r".* had \d+ \w+ and gave \d+ to .*left\?",
    "word_mul": r"A \w+ holds \d+ \w+\. .* buys \d+ of them\. .*",
    "word_add_sub": r".* has \d+ \w+, buys \d+ more and then gives away \d+\. .*",
    "word_mul_add": r".* buys \d+ \w+ with \d+ \w+ in each \w+ and finds \d+ more \w+\. .*",
}


def test_demo_gold_answers_are_correct():
    items = generate_demo_items(400, seed=3, mix={1: 1, 2: 1, 3: 1, 4: 1, 5: 1})
    assert set(FORMULAS) == {it.kind for it in items}  # every template is exercised
    for it in items:
        assert re.fullmatch(SHAPES[it.kind], it.problem), it.problem
        numbers = tuple(int(n) for n in re.findall(r"\d+", it.problem))
        assert numbers == it.operands, it.problem
        assert it.answer == FORMULAS[it.kind](*numbers), it.problem
        assert it.answer >= 0
        row = it.row("x")
        assert row["answer"] == str(FORMULAS[it.kind](*numbers)) and row["source"] == "demo"


def test_demo_is_deterministic_and_seeded():
    a = generate_demo_problems(50, seed=0)
    assert a == generate_demo_problems(50, seed=0)
    b = generate_demo_problems(50, seed=1)
    assert [r["problem"] for r in a] != [r["problem"] for r in b]
    assert generate_demo_problems(20, seed=0) == a[:20]  # prefix-stable
    make_table(a, PROBLEMS)
    assert [r["problem_id"] for r in a] == [f"demo-0-{i}" for i in range(50)]
    assert len({r["problem"] for r in a}) == 50  # distinct while the levels have unused problems


def test_demo_ids_stay_unique_when_a_level_runs_out():
    rows = generate_demo_problems(120, seed=0, mix={1: 1.0})  # level 1 has only 50 distinct problems
    assert len({r["problem"] for r in rows}) == 50
    assert len({r["problem_id"] for r in rows}) == 120


def test_demo_mix_controls_levels():
    levels = Counter(it.level for it in generate_demo_items(100, seed=0))
    total = sum(DEFAULT_DEMO_MIX.values())
    for level, weight in DEFAULT_DEMO_MIX.items():
        assert abs(levels[level] - 100 * weight / total) <= 1
    only_hard = generate_demo_items(10, seed=0, mix={5: 1.0})
    assert {it.level for it in only_hard} == {5}
    with pytest.raises(ValueError, match="demo mix"):
        generate_demo_items(10, seed=0, mix={9: 1.0})


def test_load_problems_demo_source_uses_config():
    cfg = ProblemsConfig(source="demo", num_problems=12, seed=5, demo_mix={1: 1, 2: 1})
    ps = load_problems(cfg)
    assert ps.source == "demo" and len(ps.rows) == 12 and ps.num_invalid == 0
    assert ps.rows == generate_demo_problems(12, 5, mix={1: 1, 2: 1})
    assert len(load_problems(cfg.model_copy(update={"limit": 4})).rows) == 4
    with pytest.raises(ValueError, match="demo_mix"):
        ProblemsConfig(demo_mix={0: 1.0})

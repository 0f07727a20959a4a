"""Pair statistics over Arrow columns give what the per-row definition gives."""

from __future__ import annotations

import pyarrow as pa

from ckptdpo.summary import summarize_pairs

ROWS = [
    {"pair_type": "r2w", "problem_id": "p1", "round": 1, "checkpoint_index": 1, "prompt_tokens": 10,
     "chosen_tokens": 4, "rejected_tokens": 7, "extra": "ignored"},
    {"pair_type": "w2r", "problem_id": "p1", "round": 2, "checkpoint_index": 3, "prompt_tokens": 20,
     "chosen_tokens": 5, "rejected_tokens": 9},
    {"pair_type": "r2w", "problem_id": "p2", "round": 1, "checkpoint_index": 1, "prompt_tokens": 30,
     "chosen_tokens": 6, "rejected_tokens": 2},
    {"pair_type": "dto", "problem_id": "p3", "round": None, "checkpoint_index": None, "prompt_tokens": 40,
     "chosen_tokens": 8, "rejected_tokens": 12},
]  # fmt: skip


def test_pair_summary_counts_and_token_statistics():
    s = summarize_pairs(ROWS, generated_tokens=2000)
    assert s["num_pairs"] == 4 and s["problems_with_pairs"] == 3
    assert s["by_type"] == {"r2w": 2, "w2r": 1, "dto": 1}
    assert s["by_round"] == {"1": {"r2w": 2}, "2": {"w2r": 1}, "None": {"dto": 1}}
    assert s["by_checkpoint_index"] == {"1": 2, "3": 1, "None": 1}
    assert s["tokens"]["prompt"] == {"mean": 25.0, "median": 25, "max": 40}
    assert s["tokens"]["chosen"] == {"mean": 5.75, "median": 5.5, "max": 8}
    assert s["pairs_per_1k_generated_tokens"] == 2.0


def test_rows_and_a_table_give_the_same_summary_and_empty_is_zero():
    columns = ["pair_type", "problem_id", "round", "checkpoint_index", "prompt_tokens", "chosen_tokens",
               "rejected_tokens"]  # fmt: skip
    table = pa.Table.from_pylist([{k: r[k] for k in columns} for r in ROWS])
    assert summarize_pairs(table, 2000) == summarize_pairs(ROWS, 2000)
    empty = summarize_pairs([], 0)
    assert empty["num_pairs"] == 0 and empty["tokens"]["chosen"]["mean"] is None

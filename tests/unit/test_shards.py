"""Shards and manifests: readers use the manifest's list, damage is detected, tolerated failures are redone."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from ckptdpo.errors import UserError
from ckptdpo.shards import (
    StageNotDone,
    damaged_shards,
    listed_shards,
    prepare_stage,
    read_manifest,
    read_stage,
    read_stats,
    write_manifest,
    write_shard,
)


def _stage(tmp_path: Path, n: int = 3, failed=None) -> Path:
    stage = tmp_path / "stage"
    assert prepare_stage(stage, "k1") is False
    for i in range(n):
        write_shard(stage, i, pa.table({"x": list(range(i * 10, i * 10 + 5))}))
    write_manifest(stage, config_hash="k1", failed=failed)
    return stage


def test_readers_read_the_manifests_list_not_a_glob(tmp_path: Path):
    stage = _stage(tmp_path)
    write_shard(stage, 7, pa.table({"x": [99]}))  # a stray file no manifest lists
    assert [p.name for p in listed_shards(stage)] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert read_stage(stage).num_rows == 15


def test_a_missing_or_truncated_shard_is_reported_and_rewritten_under_the_same_key(tmp_path: Path):
    stage = _stage(tmp_path)
    (stage / "part-00001.parquet").unlink()
    with pytest.raises(StageNotDone, match="part-00001.parquet"):
        read_stage(stage)
    assert damaged_shards(stage) == ["part-00001.parquet"]
    p2 = stage / "part-00002.parquet"
    p2.write_bytes(p2.read_bytes()[:-5])
    assert damaged_shards(stage) == ["part-00001.parquet", "part-00002.parquet"]
    kept = (stage / "part-00000.parquet").stat().st_mtime_ns
    assert prepare_stage(stage, "k1") is False  # not done: the damaged shards must be written again
    assert sorted(p.name for p in stage.glob("part-*")) == ["part-00000.parquet"]
    assert (stage / "part-00000.parquet").stat().st_mtime_ns == kept


def test_a_same_size_rewrite_is_caught_by_the_hash(tmp_path: Path):
    stage = _stage(tmp_path)
    p = stage / "part-00000.parquet"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    assert damaged_shards(stage) == ["part-00000.parquet"]


def test_tolerated_failures_are_listed_and_their_shards_redone_next_time(tmp_path: Path):
    stage = _stage(tmp_path, failed=[{"shard": "part-00002.parquet", "ids": ["p7"]}])
    assert read_manifest(stage)["failed"] == [{"shard": "part-00002.parquet", "ids": ["p7"]}]
    assert prepare_stage(stage, "k1") is False
    assert sorted(p.name for p in stage.glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]


def test_an_intact_stage_is_done(tmp_path: Path):
    stage = _stage(tmp_path)
    assert prepare_stage(stage, "k1") is True


def test_garbage_manifest_or_stats_is_one_sentence(tmp_path: Path):
    stage = _stage(tmp_path)
    (stage / "_manifest.json").write_text("{garbage")
    with pytest.raises(UserError, match=r"_manifest.json: the stage manifest is damaged"):
        read_manifest(stage)
    (tmp_path / "stats.json").write_text("[1, 2")
    with pytest.raises(UserError, match=r"stats.json: the run statistics file is damaged"):
        read_stats(tmp_path)
    (stage / "_manifest.json").write_text(json.dumps({"no": "shards"}))
    with pytest.raises(UserError, match="no shard list"):
        read_manifest(stage)


def test_a_damaged_sub_stage_makes_its_parent_stage_not_done(tmp_path: Path):
    parent = tmp_path / "resample"
    assert prepare_stage(parent, "top") is False
    sub = parent / "pairs"
    prepare_stage(sub, "sub")
    write_shard(sub, 0, pa.table({"x": [1, 2]}))
    write_manifest(sub, config_hash="sub")
    write_manifest(parent, config_hash="top")
    assert prepare_stage(parent, "top") is True
    (sub / "part-00000.parquet").unlink()
    assert prepare_stage(parent, "top") is False
    assert (sub / "_manifest.json").exists()  # the sub-stage's own plan rewrites what is missing
    assert prepare_stage(sub, "sub") is False

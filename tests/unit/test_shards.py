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


# --- issue 26: forged manifests, shards of another schema, temporary files, a full disk -------------------------


def _forge(stage: Path, index: int, name: str, source: Path) -> None:
    """List `name` as shard `index` in the manifest with the size, hash and rows of `source` (a consistent forgery)."""
    import hashlib

    import pyarrow.parquet as pq

    m = json.loads((stage / "_manifest.json").read_text())
    data = source.read_bytes()
    rows = pq.ParquetFile(source).metadata.num_rows
    m["shards"][index] = {"name": name, "num_rows": rows, "num_bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip
    (stage / "_manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("name", ["../secret.parquet", "ABSOLUTE", "sub/part-00000.parquet", "..", ".hidden", ""])
def test_a_shard_name_that_is_not_a_file_of_the_stage_is_a_damaged_manifest(tmp_path: Path, name: str):
    stage = _stage(tmp_path)
    outside = tmp_path / "secret.parquet"
    name = str(outside) if name == "ABSOLUTE" else name
    outside.write_bytes((stage / "part-00000.parquet").read_bytes())
    before = outside.read_bytes()
    _forge(stage, 0, name, outside)
    assert read_manifest(stage) is None  # never followed: as if the stage had no manifest
    with pytest.raises(StageNotDone, match=r"_manifest.json: the stage manifest is damaged .*not a file name"):
        listed_shards(stage)
    assert prepare_stage(stage, "k1") is False  # the stage is redone
    assert outside.read_bytes() == before and not (stage / "_manifest.json").exists()


def test_a_shard_that_is_a_link_is_damaged_and_its_target_left_alone(tmp_path: Path):
    stage = _stage(tmp_path)
    outside = tmp_path / "secret.parquet"
    outside.write_bytes((stage / "part-00001.parquet").read_bytes())
    (stage / "part-00001.parquet").unlink()
    (stage / "part-00001.parquet").symlink_to(outside)  # same bytes, so size and hash match the manifest
    assert damaged_shards(stage) == ["part-00001.parquet"]
    with pytest.raises(StageNotDone, match="part-00001.parquet"):
        read_stage(stage)
    assert prepare_stage(stage, "k1") is False
    assert not (stage / "part-00001.parquet").exists() and outside.exists()


def test_a_failed_entry_outside_the_stage_is_a_damaged_manifest_and_deletes_nothing(tmp_path: Path):
    outside = tmp_path / "keep.parquet"
    outside.write_bytes(b"precious")
    stage = _stage(tmp_path, failed=[{"shard": "../keep.parquet", "ids": ["p1"]}])
    assert read_manifest(stage) is None
    assert prepare_stage(stage, "k1") is False
    assert outside.read_bytes() == b"precious"


def test_a_shard_of_another_schema_is_damaged_named_and_rewritten(tmp_path: Path):
    stage = _stage(tmp_path)
    other = tmp_path / "other.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"y": ["a", "b"]}), other)
    (stage / "part-00001.parquet").write_bytes(other.read_bytes())
    _forge(stage, 1, "part-00001.parquet", other)  # size, hash and rows all match the file: only its columns differ
    assert damaged_shards(stage) == ["part-00001.parquet"]
    with pytest.raises(StageNotDone, match=r"part-00001.parquet.*columns"):
        listed_shards(stage) and read_stage(stage)
    assert prepare_stage(stage, "k1") is False
    assert sorted(p.name for p in stage.glob("part-*")) == ["part-00000.parquet", "part-00002.parquet"]


def test_an_expected_schema_from_the_caller_is_checked_too(tmp_path: Path):
    from ckptdpo.shards import check_shards_present

    stage = _stage(tmp_path)
    assert prepare_stage(stage, "k1", schema=pa.schema([("x", pa.int64())])) is True
    with pytest.raises(StageNotDone, match=r"part-00000.parquet: this shard is not one of its stage's .*is_correct"):
        check_shards_present(stage, schema=pa.schema([("is_correct", pa.bool_())]))
    assert damaged_shards(stage, schema=pa.schema([("is_correct", pa.bool_())])) == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"
    ]  # fmt: skip


def test_reading_a_column_a_shard_lacks_names_the_shard(tmp_path: Path):
    from ckptdpo.shards import read_shard

    stage = _stage(tmp_path)
    with pytest.raises(StageNotDone, match=r"part-00000.parquet.*is_correct"):
        read_shard(stage / "part-00000.parquet", ["is_correct"])
    with pytest.raises(StageNotDone, match=r"part-0000\d.parquet.*is_correct"):
        read_stage(stage, ["is_correct"])


def test_temporary_files_of_an_earlier_run_are_removed_when_the_stage_is_prepared(tmp_path: Path):
    stage = tmp_path / "stage"
    prepare_stage(stage, "k1")
    write_shard(stage, 0, pa.table({"x": [1]}))
    stale = [stage / ".part-00001.parquet.tmp-4242", stage / "._manifest.json.tmp-4242"]
    for p in stale:
        p.write_bytes(b"half")
    assert prepare_stage(stage, "k1") is False
    assert not any(p.exists() for p in stale) and (stage / "part-00000.parquet").exists()


def test_a_write_that_fails_leaves_no_temporary_file_and_a_full_disk_is_named(tmp_path: Path, monkeypatch):
    import errno

    import pyarrow.parquet as pq

    from ckptdpo.shards import DiskFull, atomic_write_bytes

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    stage = tmp_path / "stage"
    with pytest.raises(DiskFull, match=r"no space left .*part-00003.parquet"):
        write_shard(stage, 3, pa.table({"x": [1]}))
    assert list(stage.iterdir()) == []
    monkeypatch.setattr("os.fsync", full)
    with pytest.raises(DiskFull, match="stats.json"):
        atomic_write_bytes(tmp_path / "stats.json", b"{}")
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]


def test_a_shard_with_list_columns_is_its_own_stages_after_a_parquet_round_trip(tmp_path: Path):
    """Parquet reads a list's item field back as `element`: that is no other schema (the checkpoints stage's lists)."""
    from ckptdpo.schemas import CHECKPOINTS, make_table
    from ckptdpo.shards import check_shards_present, prepare_stage

    row = {"sample_id": "s", "problem_id": "p", "is_correct": True, "completion_tokens": 3, "num_paragraphs": 2,
           "num_checkpoints": 1, "checkpoint_chars": [4], "checkpoint_markers": ["Wait"]}  # fmt: skip
    stage = tmp_path / "checkpoints"
    write_shard(stage, 0, make_table([row], CHECKPOINTS))
    write_manifest(stage, config_hash="k")
    assert check_shards_present(stage, schema=CHECKPOINTS) == [stage / "part-00000.parquet"]
    assert prepare_stage(stage, "k", schema=CHECKPOINTS) is True  # done, nothing to rewrite

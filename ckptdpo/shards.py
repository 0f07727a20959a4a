"""Atomic Parquet shards, per-stage manifests, readers and content ids.

Layout: `<run_dir>/<stage>/part-00000.parquet ... _manifest.json`. The manifest is written last, so its
existence means the stage completed. Shards are written to a temporary name, fsynced and renamed, so a
crash never leaves a half-written shard under a name a reader would pick up.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ckptdpo import __version__
from ckptdpo.errors import UserError
from ckptdpo.schemas import SCHEMA_VERSION

MANIFEST = "_manifest.json"
PENDING = "_pending.json"
SHARD_GLOB = "part-*.parquet"


class StageNotDone(UserError):
    """A stage directory has no manifest: the stage never completed."""


def content_id(*parts: Any) -> str:
    """Deterministic id from content (problem, prompt, parent, checkpoint, seed...), never from row numbers."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def shard_path(stage_dir: str | Path, index: int) -> Path:
    return Path(stage_dir) / f"part-{index:05d}.parquet"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp name in the same directory, fsync, rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_shard(stage_dir: str | Path, index: int, table: pa.Table) -> Path:
    """Write one shard atomically; returns its final path."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    final = shard_path(stage_dir, index)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        pq.write_table(table, f, compression="zstd")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(stage_dir)
    return final


def list_shards(stage_dir: str | Path) -> list[Path]:
    """Complete shards only: temp files start with a dot and never match."""
    return sorted(Path(stage_dir).glob(SHARD_GLOB))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(stage_dir: str | Path) -> dict[str, Any] | None:
    p = Path(stage_dir) / MANIFEST
    if not p.exists():
        return None
    return json.loads(p.read_text())


def is_done(stage_dir: str | Path, config_hash: str | None = None) -> bool:
    """Done exactly when the manifest exists (and, if given, was written under this config hash)."""
    m = read_manifest(stage_dir)
    return m is not None and (config_hash is None or m.get("config_hash") == config_hash)


def prepare_stage(stage_dir: str | Path, config_hash: str) -> bool:
    """Get a stage directory ready for (re)computation under `config_hash`.

    Returns True when the stage is already complete under this hash. Shards left by an interrupted run
    under the same hash are kept (they are complete by construction, so the run resumes from them);
    anything written under another hash is removed first, manifest before shards, so the directory is never
    mistaken for a finished stage.
    """
    stage_dir = Path(stage_dir)
    if is_done(stage_dir, config_hash):
        return True
    pending = stage_dir / PENDING
    same = pending.exists() and json.loads(pending.read_text()).get("config_hash") == config_hash
    if stage_dir.exists() and not same:
        (stage_dir / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(stage_dir)
    if not same:
        atomic_write_bytes(pending, json.dumps({"config_hash": config_hash}).encode())
    else:
        (stage_dir / MANIFEST).unlink(missing_ok=True)
    return False


def write_manifest(
    stage_dir: str | Path,
    *,
    config_hash: str,
    stats: dict[str, Any] | None = None,
    inputs: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write `_manifest.json` last: row counts and hashes of every shard, schema and code version."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for p in list_shards(stage_dir):
        shards.append({"name": p.name, "num_rows": pq.ParquetFile(p).metadata.num_rows, "sha256": file_sha256(p)})
    manifest = {
        "num_rows": sum(s["num_rows"] for s in shards),
        "num_shards": len(shards),
        "shards": shards,
        "schema_version": SCHEMA_VERSION,
        "config_hash": config_hash,
        "code_version": __version__,
        "inputs": inputs or {},
        "stats": stats or {},
    }
    atomic_write_bytes(stage_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    (stage_dir / PENDING).unlink(missing_ok=True)
    return manifest


def stage_fingerprint(stage_dir: str | Path) -> str:
    """Content hash of a completed stage (from its manifest's shard hashes): the input part of cache keys."""
    m = read_manifest(stage_dir)
    if m is None:
        raise StageNotDone(f"{stage_dir}: no {MANIFEST}; run that stage first.")
    return hashlib.sha256(json.dumps([s["sha256"] for s in m["shards"]]).encode()).hexdigest()[:16]


def _require_done(stage_dir: Path) -> None:
    if not (stage_dir / MANIFEST).exists():
        raise StageNotDone(f"{stage_dir}: no {MANIFEST}, so the stage never completed; run it (again) first.")


def read_stage(stage_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read a completed stage as one table; refuses a directory without a manifest."""
    stage_dir = Path(stage_dir)
    _require_done(stage_dir)
    shards = list_shards(stage_dir)
    if not shards:
        raise StageNotDone(f"{stage_dir}: the manifest lists no shards.")
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in shards])


def iter_stage(
    stage_dir: str | Path, columns: list[str] | None = None, batch_size: int = 4096
) -> Iterator[pa.RecordBatch]:
    """Stream a completed stage batch by batch, for stages too large to hold in memory."""
    stage_dir = Path(stage_dir)
    _require_done(stage_dir)
    for p in list_shards(stage_dir):
        yield from pq.ParquetFile(p).iter_batches(batch_size=batch_size, columns=columns)


def read_shard(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns)


STATS_FILE = "stats.json"


def update_stats(run_dir: str | Path, section: str, data: dict[str, Any]) -> dict[str, Any]:
    """Replace one section of `<run_dir>/stats.json` atomically (under a lock, so concurrent stages don't clobber)."""
    import fcntl

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".stats.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = run_dir / STATS_FILE
        stats = json.loads(path.read_text()) if path.exists() else {}
        stats[section] = data
        atomic_write_bytes(path, json.dumps(stats, indent=2, sort_keys=True, default=str).encode())
    return stats


def read_stats(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / STATS_FILE
    return json.loads(path.read_text()) if path.exists() else {}

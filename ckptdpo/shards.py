"""Atomic Parquet shards, per-stage manifests, readers and content ids.

Layout: `<run_dir>/<stage>/part-00000.parquet ... _manifest.json`. The manifest is written last, so its
existence means the stage completed. Shards are written to a temporary name, fsynced and renamed, so a
crash never leaves a half-written shard under a name a reader would pick up.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
log = logging.getLogger(__name__)


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
    """The shard files present in a directory (temp files start with a dot and never match): for writers.

    Readers of a finished stage use `listed_shards`, the manifest's list, so a stray or missing file is noticed.
    """
    return sorted(Path(stage_dir).glob(SHARD_GLOB))


def listed_shards(stage_dir: str | Path) -> list[Path]:
    """The shards a finished stage's manifest lists, in order; a stage without a manifest is an error."""
    stage_dir = Path(stage_dir)
    m = read_manifest(stage_dir)
    if m is None:
        raise StageNotDone(f"{stage_dir}: no {MANIFEST}, so the stage never completed; run it (again) first.")
    return [stage_dir / s["name"] for s in m["shards"]]


def damaged_shards(stage_dir: str | Path, manifest: dict[str, Any] | None = None) -> list[str]:
    """Names of the manifest's shards that are missing or differ from it: size first, then sha256 when the size
    matches (a truncated or rewritten file is caught either way)."""
    stage_dir = Path(stage_dir)
    m = manifest if manifest is not None else read_manifest(stage_dir)
    bad = []
    for s in (m or {}).get("shards", []):
        p = stage_dir / s["name"]
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            bad.append(s["name"])
            continue
        if ("num_bytes" in s and size != s["num_bytes"]) or file_sha256(p) != s["sha256"]:
            bad.append(s["name"])
    return bad


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json_file(path: Path, what: str) -> Any:
    """A JSON file the project wrote; a damaged one is one sentence naming it and the fix, not a traceback."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(
            f"{path}: the {what} is damaged (not valid JSON); delete it and run again to recompute it."
        ) from None


def read_manifest(stage_dir: str | Path) -> dict[str, Any] | None:
    p = Path(stage_dir) / MANIFEST
    if not p.exists():
        return None
    m = read_json_file(p, "stage manifest")
    if not isinstance(m, dict) or not isinstance(m.get("shards"), list):
        raise UserError(f"{p}: the stage manifest is damaged (no shard list); delete it and run again.")
    return m


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
    m = read_manifest(stage_dir)
    if m is not None and m.get("config_hash") == config_hash:
        redo = set(damaged_shards(stage_dir, m)) | {f["shard"] for f in m.get("failed", [])}
        if not redo and not _damaged_substages(stage_dir):
            return True
        # Same key, so the intact shards are kept and only the damaged, missing or failed ones are rewritten.
        if redo:
            log.warning("%s: %d shard(s) damaged, missing or with failed rows (%s); rewriting them", stage_dir,
                        len(redo), ", ".join(sorted(redo)[:5]))  # fmt: skip
        atomic_write_bytes(stage_dir / PENDING, json.dumps({"config_hash": config_hash}).encode())
        (stage_dir / MANIFEST).unlink()
        for name in redo:
            (stage_dir / name).unlink(missing_ok=True)
        return False
    pending = stage_dir / PENDING
    same = pending.exists() and read_json_file(pending, "pending-stage marker").get("config_hash") == config_hash
    if stage_dir.exists() and not same:
        (stage_dir / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(stage_dir)
    if not same:
        atomic_write_bytes(pending, json.dumps({"config_hash": config_hash}).encode())
    else:
        (stage_dir / MANIFEST).unlink(missing_ok=True)
    return False


def _damaged_substages(stage_dir: Path) -> list[Path]:
    """Sub-stages (a folder below with its own manifest, like resample/pairs) whose shards are damaged: the parent
    stage is then not done either, so its flow runs again and the sub-stage rewrites what is damaged."""
    bad = []
    for manifest in stage_dir.glob(f"*/**/{MANIFEST}"):
        sub = manifest.parent
        if damaged_shards(sub, read_manifest(sub)):
            bad.append(sub)
    return bad


def write_manifest(
    stage_dir: str | Path,
    *,
    config_hash: str,
    stats: dict[str, Any] | None = None,
    inputs: dict[str, str] | None = None,
    failed: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write `_manifest.json` last: row count, size and hash of every shard, schema and code version.

    `failed` lists rows a failure budget tolerated (`{"shard": name, "ids": [...]}`): the next run rewrites those
    shards, so tolerated failures are retried rather than forgotten.
    """
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for p in list_shards(stage_dir):
        rows = pq.ParquetFile(p).metadata.num_rows
        shards.append({"name": p.name, "num_rows": rows, "num_bytes": p.stat().st_size, "sha256": file_sha256(p)})
    manifest = {
        "num_rows": sum(s["num_rows"] for s in shards),
        "num_shards": len(shards),
        "shards": shards,
        "schema_version": SCHEMA_VERSION,
        "config_hash": config_hash,
        "code_version": __version__,
        "inputs": inputs or {},
        "stats": stats or {},
        "failed": failed or [],
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


def check_shards_present(stage_dir: str | Path, fix: str = "run the stage again to rewrite it") -> list[Path]:
    """The manifest's shards after a cheap check (present, same size); damage is a sentence, not an ArrowInvalid."""
    stage_dir = Path(stage_dir)
    m = read_manifest(stage_dir)
    if m is None:
        raise StageNotDone(f"{stage_dir}: no {MANIFEST}, so the stage never completed; run it (again) first.")
    for s in m["shards"]:
        p = stage_dir / s["name"]
        if not p.exists() or ("num_bytes" in s and p.stat().st_size != s["num_bytes"]):
            raise StageNotDone(f"{p}: this shard is missing or damaged (it differs from {MANIFEST}); {fix}.")
    return [stage_dir / s["name"] for s in m["shards"]]


def read_stage(stage_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read a completed stage as one table, from the manifest's list of shards."""
    stage_dir = Path(stage_dir)
    shards = check_shards_present(stage_dir)
    if not shards:
        raise StageNotDone(f"{stage_dir}: the manifest lists no shards.")
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in shards])


def iter_stage(
    stage_dir: str | Path, columns: list[str] | None = None, batch_size: int = 4096
) -> Iterator[pa.RecordBatch]:
    """Stream a completed stage batch by batch, for stages too large to hold in memory."""
    for p in check_shards_present(Path(stage_dir)):
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
        stats = read_json_file(path, "run statistics file") if path.exists() else {}
        stats[section] = data
        atomic_write_bytes(path, json.dumps(stats, indent=2, sort_keys=True, default=str).encode())
    return stats


def read_stats(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / STATS_FILE
    return read_json_file(path, "run statistics file") if path.exists() else {}

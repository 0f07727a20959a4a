"""Atomic Parquet shards, per-stage manifests, readers and content ids.

Layout: `<run_dir>/<stage>/part-00000.parquet ... _manifest.json`. The manifest is written last, so its
existence means the stage completed. Shards are written to a temporary name, fsynced and renamed, so a
crash never leaves a half-written shard under a name a reader would pick up; a write that fails removes its
temporary file, and preparing a stage removes those an interrupted run left.

A manifest lists plain file names of its own directory, with their size, sha256, rows and the stage's columns: a
name that leads anywhere else makes the manifest damaged (never followed: the stage is redone), and a shard whose
size, hash or columns differ from the manifest (or from the schema its caller expects) is damaged like a truncated
one: named and rewritten by the next run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
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
TEMP_GLOB = ".*.tmp-*"
log = logging.getLogger(__name__)


class StageNotDone(UserError):
    """A stage directory has no (usable) manifest or a shard differs from it: the stage is not complete."""


class DiskFull(OSError):
    """A write ran out of space or quota: the fix is space on that device, not a retry (the message says where)."""


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
    with _temporary(path) as tmp:
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
    with _temporary(final) as tmp:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    _fsync_dir(stage_dir)
    return final


@contextmanager
def _temporary(final: Path) -> Iterator[Path]:
    """The temporary name `final` is written under; removed when the write fails, a full disk named as such."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(
                e.errno,
                f"no space left on the device writing {final}; free space there and run the same command again "
                "(finished shards are kept)",
            ) from e
        raise


def remove_temporary_files(directory: str | Path) -> list[Path]:
    """Remove the temporary files an interrupted or failed write left in `directory` (not below it)."""
    stale = sorted(Path(directory).glob(TEMP_GLOB))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def list_shards(stage_dir: str | Path) -> list[Path]:
    """The shard files present in a directory (temp files start with a dot and never match): for writers.

    Readers of a finished stage use `listed_shards`, the manifest's list, so a stray or missing file is noticed.
    """
    return sorted(Path(stage_dir).glob(SHARD_GLOB))


def listed_shards(stage_dir: str | Path) -> list[Path]:
    """The shards a finished stage's manifest lists, in order; a stage without a usable manifest is an error."""
    stage_dir = Path(stage_dir)
    m = read_manifest(stage_dir)
    if m is None:
        raise _not_done(stage_dir)
    return [stage_dir / s["name"] for s in m["shards"]]


def damaged_shards(
    stage_dir: str | Path, manifest: dict[str, Any] | None = None, schema: pa.Schema | None = None
) -> list[str]:
    """Names of the manifest's shards that are missing or differ from it: size first, then sha256 when the size
    matches (a truncated or rewritten file is caught either way), then the columns (`schema`'s when the caller
    knows the stage's schema, else those the manifest recorded), so a shard of another stage is caught too."""
    stage_dir = Path(stage_dir)
    m = manifest if manifest is not None else read_manifest(stage_dir)
    return [s["name"] for s in (m or {}).get("shards", []) if _shard_damage(stage_dir, s, _expected(m, schema))]


def _shard_damage(stage_dir: Path, entry: dict[str, Any], columns: list[list[str]] | None) -> str | None:
    """What is wrong with one listed shard, in a few words; None when it is what the manifest says."""
    p = stage_dir / entry["name"]
    if p.is_symlink():
        return "a link, not a file of this stage"  # it could lead anywhere, as a name with a path could
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        return "missing"
    if "num_bytes" in entry and size != entry["num_bytes"]:
        return f"{size} bytes, not {entry['num_bytes']}"
    if file_sha256(p) != entry["sha256"]:
        return "its sha256 differs"
    return _columns_differ(p, columns)


def _columns_differ(path: Path, columns: list[list[str]] | None) -> str | None:
    if columns is None:
        return None
    try:
        found = columns_of(pq.read_schema(path))
    except (pa.ArrowException, OSError) as e:
        return f"not a Parquet file ({e})"
    if found != columns:
        return f"columns {_names(found)} where its stage has {_names(columns)}"
    return None


def columns_of(schema: pa.Schema) -> list[list[str]]:
    """A schema as the manifest records it: [name, type] per column, in order."""
    return [[f.name, _type_name(f.type)] for f in schema]


def _type_name(t: pa.DataType) -> str:
    """A column's type, without the name of a list's item field (Parquet reads `item` back as `element`)."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{_type_name(t.value_type)}>"
    if pa.types.is_struct(t):
        return "struct<" + ", ".join(f"{f.name}: {_type_name(f.type)}" for f in t) + ">"
    return str(t)


def _names(columns: list[list[str]]) -> str:
    shown = ", ".join(f"{n}: {t}" for n, t in columns[:6])
    return f"({shown}{', ...' if len(columns) > 6 else ''})"


def _expected(manifest: dict[str, Any] | None, schema: pa.Schema | None) -> list[list[str]] | None:
    if schema is not None:
        return columns_of(schema)
    return (manifest or {}).get("columns")


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
    """The stage's manifest; None when there is none, or when it is damaged in a way that is safe to redo (a shard
    name that is not a file of this directory: never followed). Invalid JSON is a UserError naming the file."""
    return _load_manifest(Path(stage_dir))[0]


def _load_manifest(stage_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None), (None, what makes it damaged), or (None, None) without a manifest."""
    p = stage_dir / MANIFEST
    if not p.exists():
        return None, None
    m = read_json_file(p, "stage manifest")
    if not isinstance(m, dict) or not isinstance(m.get("shards"), list):
        raise UserError(f"{p}: the stage manifest is damaged (no shard list); delete it and run again.")
    problem = _manifest_problem(m)
    return (None, problem) if problem else (m, None)


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """What makes a parsed manifest unusable: entries that are not shards of this directory, or malformed."""
    names = []
    for i, s in enumerate(m["shards"]):
        if not isinstance(s, dict):
            return f"shards[{i}] is not an entry"
        name = s.get("name")
        if not is_plain_name(name):
            return f"shard name {name!r} is not a file name in this stage's directory"
        if not isinstance(s.get("sha256"), str) or not _is_count(s.get("num_rows")):
            return f"shard {name} has no sha256 or row count"
        if "num_bytes" in s and not _is_count(s["num_bytes"]):
            return f"shard {name} has a size of {s['num_bytes']!r}"
        names.append(name)
    if len(set(names)) != len(names):
        return "it lists a shard twice"
    failed = m.get("failed") or []
    if not isinstance(failed, list) or not all(isinstance(f, dict) and is_plain_name(f.get("shard")) for f in failed):
        return "a failed-rows entry names a file outside this stage's directory"
    columns = m.get("columns")
    if columns is not None and not (
        isinstance(columns, list) and all(isinstance(c, list) and len(c) == 2 for c in columns)
    ):
        return "its columns are not [name, type] pairs"
    return None


def is_plain_name(name: Any) -> bool:
    """A file name inside a stage directory: no path separator, not `.`/`..`, not hidden (temporary files are)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not name.startswith(".")
        and not any(c in name for c in "/\\\0")
    )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _not_done(stage_dir: Path) -> StageNotDone:
    """Why a stage cannot be read: no manifest, or a damaged one (redone by running the stage again)."""
    problem = _load_manifest(stage_dir)[1]
    if problem:
        return StageNotDone(
            f"{stage_dir / MANIFEST}: the stage manifest is damaged ({problem}); run stage {stage_dir.name} again "
            "to redo it."
        )
    return StageNotDone(f"{stage_dir}: no {MANIFEST}, so the stage never completed; run it (again) first.")


def is_done(stage_dir: str | Path, config_hash: str | None = None) -> bool:
    """Done exactly when the manifest exists (and, if given, was written under this config hash)."""
    m = read_manifest(stage_dir)
    return m is not None and (config_hash is None or m.get("config_hash") == config_hash)


def prepare_stage(stage_dir: str | Path, config_hash: str, schema: pa.Schema | None = None) -> bool:
    """Get a stage directory ready for (re)computation under `config_hash`.

    Returns True when the stage is already complete under this hash. Shards left by an interrupted run
    under the same hash are kept (they are complete by construction, so the run resumes from them);
    anything written under another hash is removed first, manifest before shards, so the directory is never
    mistaken for a finished stage. A listed shard that is missing, differs from the manifest or has other columns
    than `schema` (the stage's output schema, when the caller knows it) is rewritten; a damaged manifest (a shard
    name outside the directory) is never followed: the stage is redone. Temporary files of interrupted writes go.
    """
    stage_dir = Path(stage_dir)
    if stage_dir.is_dir():
        remove_temporary_files(stage_dir)
    m, problem = _load_manifest(stage_dir)
    if problem:
        log.warning("%s: the stage manifest is damaged (%s); redoing the stage", stage_dir / MANIFEST, problem)
    if m is not None and m.get("config_hash") == config_hash:
        columns = _expected(m, schema)
        damage = {s["name"]: _shard_damage(stage_dir, s, columns) for s in m["shards"]}
        redo = {name for name, why in damage.items() if why} | {f["shard"] for f in m.get("failed", [])}
        if not redo and not _damaged_substages(stage_dir):
            return True
        # Same key, so the intact shards are kept and only the damaged, missing or failed ones are rewritten.
        if redo:
            reasons = [f"{name}: {damage.get(name) or 'failed rows'}" for name in sorted(redo)[:5]]
            log.warning("%s: %d shard(s) damaged, missing or with failed rows (%s); rewriting them", stage_dir,
                        len(redo), "; ".join(reasons))  # fmt: skip
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
        m, problem = _load_manifest(sub)
        if problem or damaged_shards(sub, m):
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
    shards, schemas = [], []
    for p in list_shards(stage_dir):
        meta = pq.ParquetFile(p)
        schemas.append(columns_of(meta.schema_arrow))
        rows = meta.metadata.num_rows
        shards.append({"name": p.name, "num_rows": rows, "num_bytes": p.stat().st_size, "sha256": file_sha256(p)})
    if any(c != schemas[0] for c in schemas):
        log.warning("%s: the shards do not share one schema; their columns are not recorded", stage_dir)
    manifest = {
        "num_rows": sum(s["num_rows"] for s in shards),
        "num_shards": len(shards),
        "shards": shards,
        # Every shard's columns: a shard of another stage (right size and hash in a hand-edited entry) is damaged.
        "columns": schemas[0] if schemas and all(c == schemas[0] for c in schemas) else None,
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
    stage_dir = Path(stage_dir)
    m = read_manifest(stage_dir)
    if m is None:
        raise _not_done(stage_dir)
    return hashlib.sha256(json.dumps([s["sha256"] for s in m["shards"]]).encode()).hexdigest()[:16]


def check_shards_present(
    stage_dir: str | Path, fix: str = "run the stage again to rewrite it", schema: pa.Schema | None = None
) -> list[Path]:
    """The manifest's shards after a cheap check (present, same size, the columns of `schema` or else those the
    manifest recorded: footers only); damage is a sentence naming the shard, not an ArrowInvalid minutes later."""
    stage_dir = Path(stage_dir)
    m = read_manifest(stage_dir)
    if m is None:
        raise _not_done(stage_dir)
    for s in m["shards"]:
        p = stage_dir / s["name"]
        if p.is_symlink() or not p.exists() or ("num_bytes" in s and p.stat().st_size != s["num_bytes"]):
            raise StageNotDone(f"{p}: this shard is missing or damaged (it differs from {MANIFEST}); {fix}.")
        differ = _columns_differ(p, _expected(m, schema))
        if differ:
            raise StageNotDone(f"{p}: this shard is not one of its stage's ({differ}); {fix}.")
    return [stage_dir / s["name"] for s in m["shards"]]


def read_stage(stage_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read a completed stage as one table, from the manifest's list of shards."""
    stage_dir = Path(stage_dir)
    shards = check_shards_present(stage_dir)
    if not shards:
        raise StageNotDone(f"{stage_dir}: the manifest lists no shards.")
    return pa.concat_tables([read_shard(p, columns=columns) for p in shards])


def iter_stage(
    stage_dir: str | Path, columns: list[str] | None = None, batch_size: int = 4096
) -> Iterator[pa.RecordBatch]:
    """Stream a completed stage batch by batch, for stages too large to hold in memory."""
    for p in check_shards_present(Path(stage_dir)):
        with _readable(p, columns):
            yield from pq.ParquetFile(p).iter_batches(batch_size=batch_size, columns=columns)


def read_shard(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """One shard's table; a file that is not a readable shard with these columns is a sentence naming it."""
    with _readable(Path(path), columns):
        return pq.read_table(path, columns=columns)


@contextmanager
def _readable(path: Path, columns: list[str] | None) -> Iterator[None]:
    try:
        yield
    except (pa.ArrowException, OSError) as e:
        try:
            names = pq.read_schema(path).names
        except (pa.ArrowException, OSError):
            names = None
        missing = [c for c in columns or [] if names is not None and c not in names]
        what = f"has no column {', '.join(missing)}" if missing else f"cannot be read ({type(e).__name__}: {e})"
        raise StageNotDone(
            f"{path}: this shard {what}, so it is not a complete shard of stage {path.parent.name}; run that stage "
            "again to rewrite it."
        ) from None


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

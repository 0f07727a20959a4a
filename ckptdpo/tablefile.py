"""Reading user-supplied tables (JSONL, JSON, Parquet) with errors that name the file and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ckptdpo.errors import UserError


def read_table_file(path: str | Path, required: list[str] | None = None) -> pa.Table:
    """Read a JSONL/JSON/Parquet file into a table; missing file, bad rows or missing columns are UserErrors."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found; check the path.")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise UserError(f"{path}: not a readable Parquet file ({type(e).__name__}); re-export it.") from None
    elif suffix in (".jsonl", ".json"):
        try:
            table = pa.Table.from_pylist(read_json_records(path))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            msg = " ".join(str(e).split())[:200]
            raise UserError(
                f"{path}: a column mixes value types ({msg}); give each field one type in every row."
            ) from None
    else:
        raise UserError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet.")
    missing = [c for c in (required or []) if c not in table.column_names]
    if missing:
        raise UserError(
            f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(table.column_names) or 'none'}); "
            "rename them or pass the column names."
        )
    return table


def read_json_records(path: Path) -> list[dict]:
    """JSON Lines (one object per line) or a JSON array of objects."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the file ({e}); check its encoding (UTF-8) and permissions.") from None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON at line {e.lineno}; fix the file.") from None
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path}: line {lineno} is not valid JSON; fix or remove that line.") from None
    bad = [i for i, r in enumerate(records, 1) if not isinstance(r, dict)]
    if bad:
        raise UserError(f"{path}: record(s) {bad[:10]} are not JSON objects; each line must be an object.")
    return records

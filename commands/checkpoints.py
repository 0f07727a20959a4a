"""`ckptdpo checkpoints INPUT`: paragraph and checkpoint statistics, optionally checkpoints as JSON."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ckptdpo.checkpoints import VERDICT_STATUSES, count_paragraphs, locate_checkpoints, trajectory_stats
from ckptdpo.errors import UserError


def _verdicts_from_column(path: str, name: str, values: list) -> list[bool | None]:
    """A verdict column holds booleans (is_correct) or verdict statuses; anything else is a user error."""
    out: list[bool | None] = []
    for row, v in enumerate(values, 1):
        if v is None or isinstance(v, bool):
            out.append(v)
        elif isinstance(v, str) and v in VERDICT_STATUSES:
            out.append(VERDICT_STATUSES[v])
        else:
            raise UserError(
                f"{path}: column {name!r} row {row} holds {v!r}; a verdict column must hold true/false or one of "
                f"{', '.join(VERDICT_STATUSES)}."
            )
    return out


def _fmt(x: float | None, stat: str) -> str:
    if x is None:
        return "-"
    return f"{x:,}" if stat == "max" else f"{x:,.1f}"


def checkpoints_command(args: argparse.Namespace) -> int:
    """`ckptdpo checkpoints INPUT`: paragraph and checkpoint statistics, optionally checkpoints as JSON.

    The JSON is a list with one record per input row: `row` (0-based), `sample_id` or `id` when the input has one,
    `is_correct` when it has a verdict column, `num_paragraphs`, `num_checkpoints` and `checkpoints` ({index, char,
    marker}).
    """
    from rich.console import Console
    from rich.table import Table

    from ckptdpo.shards import atomic_write_bytes
    from ckptdpo.tablefile import read_table_file

    markers = tuple(m.strip() for m in args.markers.split(",") if m.strip())
    if not markers:
        raise UserError(f"--markers {args.markers!r} names no marker; pass comma-separated words like Wait,But.")
    required = [args.completion_column] + ([args.verdict_column] if args.verdict_column else [])
    table = read_table_file(args.input, required=required)
    detected = next((c for c in ("is_correct", "status") if c in table.column_names), None)
    verdict_column = args.verdict_column or detected

    texts = table.column(args.completion_column).to_pylist()
    bad = [i for i, t in enumerate(texts, 1) if not isinstance(t, str)]
    if bad:
        raise UserError(
            f"{args.input}: column {args.completion_column!r} is empty or not text in row(s) {bad[:10]}; "
            "fix those rows or pass --completion-column."
        )
    is_correct = None
    if verdict_column is not None:
        is_correct = _verdicts_from_column(args.input, verdict_column, table.column(verdict_column).to_pylist())

    stats = trajectory_stats(texts, is_correct, markers)
    console = Console()
    # Groups as columns, statistics as rows: at most five columns, so it fits an 80-column terminal.
    groups = {name: g for name, g in stats.items() if name == "all" or g["count"] > 0}
    out = Table(title=str(args.input), caption=f"checkpoint markers: {', '.join(markers)}")
    out.add_column("per trajectory")
    for name in groups:
        out.add_column(name, justify="right")
    out.add_row("trajectories", *(f"{g['count']:,}" for g in groups.values()))
    for what in ("paragraphs", "checkpoints"):
        for stat in ("mean", "median", "max"):
            out.add_row(f"{what} {stat}", *(_fmt(g[what][stat], stat) for g in groups.values()))
    console.print(out)

    if args.json_out:
        ids = next((c for c in ("sample_id", "id") if c in table.column_names), None)
        id_values = table.column(ids).to_pylist() if ids else None
        records = []
        for i, text in enumerate(texts):
            rec: dict = {"row": i}
            if id_values is not None:
                rec[ids] = id_values[i]
            if is_correct is not None:
                rec["is_correct"] = is_correct[i]
            cps = locate_checkpoints(text, markers)
            rec["num_paragraphs"] = count_paragraphs(text)
            rec["num_checkpoints"] = len(cps)
            rec["checkpoints"] = [asdict(cp) for cp in cps]
            records.append(rec)
        try:
            atomic_write_bytes(args.json_out, json.dumps(records, ensure_ascii=False, default=str).encode("utf-8"))
        except OSError as e:
            msg = f"{args.json_out}: cannot write the JSON file ({e.strerror}); pass a writable --json path."
            raise UserError(msg) from None
        console.print(f"wrote checkpoints of {len(records):,} trajectories to {args.json_out}")
    return 0

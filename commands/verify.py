"""`ckptdpo verify INPUT --output OUT.parquet`: verdict columns added to the input, and a summary table."""

from __future__ import annotations

import argparse
import collections
import time
from typing import Any

from ckptdpo.errors import UserError
from ckptdpo.verify import (
    ANSWER_FORMATS,
    DEFAULT_MAX_CHARS,
    EXTRACTED_FROM,
    STATUSES,
    Verdict,
    WorkersUnavailable,
    verify_batch,
)

VERDICT_COLUMNS = ("status", "is_correct", "extracted", "extracted_from")


def _check_options(args: argparse.Namespace) -> None:
    from pathlib import Path

    if Path(args.output).suffix.lower() != ".parquet":
        raise UserError(f"--output {args.output}: verdicts are written as Parquet; give a path ending in .parquet.")
    if not args.timeout_s > 0:
        raise UserError(f"--timeout-s {args.timeout_s}: the per-item limit must be a positive number of seconds.")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: give at least 1 worker process, or leave it out to use every CPU.")
    max_chars = getattr(args, "max_chars", DEFAULT_MAX_CHARS)
    if max_chars is not None and max_chars < 1:
        raise UserError(f"--max-chars {max_chars}: the completion length limit must be a positive number.")
    answer_format = getattr(args, "answer_format", "boxed_or_final_statement")
    if answer_format not in ANSWER_FORMATS:
        raise UserError(f"--answer-format {answer_format}: choose one of {', '.join(ANSWER_FORMATS)}.")


def _read_items(args: argparse.Namespace) -> tuple[Any, list[tuple]]:
    """The input table and its (gold, completion, finish_reason) items; refuses over-long completions."""
    from ckptdpo.tablefile import read_table_file

    gold_col, completion_col = args.gold_column, args.completion_column
    table = read_table_file(args.input, required=[gold_col, completion_col])
    completions = table.column(completion_col).to_pylist()
    max_chars = getattr(args, "max_chars", DEFAULT_MAX_CHARS)
    for row, c in enumerate(completions):
        if isinstance(c, str) and max_chars is not None and len(c) > max_chars:
            raise UserError(
                f"{args.input}: row {row} has a {len(c):,}-character {completion_col!r}, over the limit of "
                f"{max_chars:,}; truncate it or raise --max-chars."
            )
    # A finish reason says whether a completion was cut off at its token limit (never `correct` then).
    reason_col = getattr(args, "finish_reason_column", "finish_reason")
    if reason_col and reason_col in table.column_names:
        reasons = [r if isinstance(r, str) else None for r in table.column(reason_col).to_pylist()]
    elif reason_col and reason_col != "finish_reason":
        raise UserError(f"{args.input}: no column {reason_col!r}; name an existing one with --finish-reason-column.")
    else:
        reasons = [None] * len(completions)
    golds = table.column(gold_col).to_pylist()
    return table, list(zip(golds, completions, reasons, strict=True))


def _verify_all(items: list[tuple], args: argparse.Namespace) -> tuple[list[Verdict], float]:
    from rich.console import Console
    from rich.progress import Progress

    answer_format = getattr(args, "answer_format", "boxed_or_final_statement")
    verdicts: list[Verdict] = []
    chunk = 512  # progress granularity; large enough that the pool stays busy between chunks
    t0 = time.perf_counter()
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("verifying", total=len(items))
        for lo in range(0, len(items), chunk):
            batch = items[lo : lo + chunk]
            try:
                verdicts.extend(
                    verify_batch(batch, timeout_s=args.timeout_s, workers=args.workers, answer_format=answer_format)
                )
            except WorkersUnavailable as e:
                raise UserError(f"{e} Nothing was written.") from e
            progress.update(task, advance=len(batch))
    return verdicts, time.perf_counter() - t0


def _write(table: Any, verdicts: list[Verdict], output: str) -> None:
    import io
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ckptdpo.shards import atomic_write_bytes

    # Re-verifying an earlier output replaces its verdict columns rather than failing on duplicates.
    table = table.drop_columns([c for c in VERDICT_COLUMNS if c in table.column_names])
    table = table.append_column("status", pa.array([v.status for v in verdicts], pa.string()))
    table = table.append_column("is_correct", pa.array([v.is_correct for v in verdicts], pa.bool_()))
    table = table.append_column("extracted", pa.array([v.extracted for v in verdicts], pa.string()))
    table = table.append_column("extracted_from", pa.array([v.extracted_from for v in verdicts], pa.string()))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    atomic_write_bytes(Path(output), buf.getvalue())


def _print_summary(verdicts: list[Verdict], wall: float, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    counts = collections.Counter(v.status for v in verdicts)
    sources = collections.Counter(v.extracted_from for v in verdicts)
    n = len(verdicts)

    def share(k: int) -> str:
        return f"{k / n:.1%}" if n else "-"

    summary = Table(title=title)
    summary.add_column("status")
    summary.add_column("count", justify="right")
    summary.add_column("share", justify="right")
    for status in STATUSES:
        summary.add_row(status, str(counts[status]), share(counts[status]))
    summary.add_section()
    # How sure the labels are: a boxed answer, an explicit final statement, or no answer found.
    for source in EXTRACTED_FROM:
        summary.add_row(f"extracted from {source}", str(sources[source]), share(sources[source]))
    summary.add_section()
    summary.add_row("accuracy", f"{counts['correct']}/{n}", share(counts["correct"]))
    summary.add_row("wall time", f"{wall:.2f} s", f"{n / wall:,.0f} items/s" if wall > 0 else "-")
    Console().print(summary)


def verify_command(args: argparse.Namespace) -> int:
    """`ckptdpo verify INPUT --output OUT.parquet`: verdict columns added to the input, and a summary table."""
    _check_options(args)
    table, items = _read_items(args)
    verdicts, wall = _verify_all(items, args)
    _write(table, verdicts, args.output)
    _print_summary(verdicts, wall, f"verify: {args.input} -> {args.output}")
    return 0

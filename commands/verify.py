"""`ckptdpo verify INPUT --output OUT.parquet`: verdict columns added to the input, and a summary table."""

from __future__ import annotations

import argparse
import collections
import time

from ckptdpo.errors import UserError
from ckptdpo.verify import DEFAULT_MAX_CHARS, STATUSES, Verdict, verify_batch


def verify_command(args: argparse.Namespace) -> int:
    """`ckptdpo verify INPUT --output OUT.parquet`: verdict columns added to the input, and a summary table."""
    import io
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from ckptdpo.shards import atomic_write_bytes
    from ckptdpo.tablefile import read_table_file

    gold_col, completion_col = args.gold_column, args.completion_column
    max_chars = getattr(args, "max_chars", DEFAULT_MAX_CHARS)
    output = Path(args.output)
    if output.suffix.lower() != ".parquet":
        raise UserError(f"--output {output}: verdicts are written as Parquet; give a path ending in .parquet.")
    if not args.timeout_s > 0:
        raise UserError(f"--timeout-s {args.timeout_s}: the per-item limit must be a positive number of seconds.")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: give at least 1 worker process, or leave it out to use every CPU.")
    if max_chars is not None and max_chars < 1:
        raise UserError(f"--max-chars {max_chars}: the completion length limit must be a positive number.")

    table = read_table_file(args.input, required=[gold_col, completion_col])
    golds = table.column(gold_col).to_pylist()
    completions = table.column(completion_col).to_pylist()
    for row, c in enumerate(completions):
        if isinstance(c, str) and max_chars is not None and len(c) > max_chars:
            raise UserError(
                f"{args.input}: row {row} has a {len(c):,}-character {completion_col!r}, over the limit of "
                f"{max_chars:,}; truncate it or raise --max-chars."
            )

    items = list(zip(golds, completions, strict=True))
    verdicts: list[Verdict] = []
    chunk = 512  # progress granularity; large enough that the pool stays busy between chunks
    t0 = time.perf_counter()
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("verifying", total=len(items))
        for lo in range(0, len(items), chunk):
            verdicts.extend(verify_batch(items[lo : lo + chunk], timeout_s=args.timeout_s, workers=args.workers))
            progress.update(task, advance=len(items[lo : lo + chunk]))
    wall = time.perf_counter() - t0

    # Re-verifying an earlier output replaces its verdict columns rather than failing on duplicates.
    for name in ("status", "is_correct", "extracted"):
        if name in table.column_names:
            table = table.drop_columns([name])
    table = table.append_column("status", pa.array([v.status for v in verdicts], pa.string()))
    table = table.append_column("is_correct", pa.array([v.is_correct for v in verdicts], pa.bool_()))
    table = table.append_column("extracted", pa.array([v.extracted for v in verdicts], pa.string()))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    atomic_write_bytes(output, buf.getvalue())

    counts = collections.Counter(v.status for v in verdicts)
    n = len(verdicts)
    summary = Table(title=f"verify: {args.input} -> {output}")
    summary.add_column("status")
    summary.add_column("count", justify="right")
    summary.add_column("share", justify="right")
    for status in STATUSES:
        summary.add_row(status, str(counts[status]), f"{counts[status] / n:.1%}" if n else "-")
    summary.add_section()
    summary.add_row("accuracy", f"{counts['correct']}/{n}", f"{counts['correct'] / n:.1%}" if n else "-")
    summary.add_row("wall time", f"{wall:.2f} s", f"{n / wall:,.0f} items/s" if wall > 0 else "-")
    Console().print(summary)
    return 0

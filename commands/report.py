"""`ckptdpo report RUN_DIR` and `ckptdpo compare RUN_A RUN_B`."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ckptdpo.report import build_report, compare_rows, format_number, read_eval_section


def report_command(args: argparse.Namespace) -> int:
    path = build_report(Path(args.run_dir))
    print(path)
    return 0


def compare_table(run_a: Path, run_b: Path):
    """A rich table of two runs' eval metrics side by side, with B - A."""
    from rich.table import Table

    a, b = read_eval_section(run_a), read_eval_section(run_b)
    name_a, name_b = str(run_a), str(run_b)
    table = Table(title="ckptdpo compare (eval metrics)")
    for col, justify in (
        ("benchmark", "left"),
        ("model", "left"),
        ("metric", "left"),
        (name_a, "right"),
        (name_b, "right"),
        ("B - A", "right"),
    ):
        table.add_column(col, justify=justify, overflow="fold")
    last = None
    for bench, model, label, va, vb in compare_rows(a, b):
        delta = vb - va if va is not None and vb is not None else None
        shown = (bench, model) if (bench, model) != last else ("", "")
        last = (bench, model)
        sign = "" if delta is None or delta <= 0 or math.isclose(delta, 0) else "+"
        table.add_row(
            *shown,
            label,
            format_number(va, 4),
            format_number(vb, 4),
            "-" if delta is None else sign + format_number(delta, 4),
        )
    return table


def compare_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    Console().print(compare_table(Path(args.run_a), Path(args.run_b)))
    return 0

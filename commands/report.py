"""`ckptdpo report RUN_DIR` and `ckptdpo compare RUN_A RUN_B`."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from ckptdpo.report import (
    ETA_B_VS_A,
    build_report,
    compare_intervals,
    compare_rows,
    cost_matched_view,
    format_number,
    read_eval_section,
)


def report_command(args: argparse.Namespace) -> int:
    from tasks.registry import report_sections

    path = build_report(Path(args.run_dir), report_sections())
    print(path)
    return 0


def _interval(iv: dict[str, Any] | None, ratio: bool = False) -> str:
    """'[+0.0420, +0.2100] significant' for a difference; '[0.95, 1.31] no significant change' for a ratio."""
    if not iv or iv.get("low") is None or not math.isfinite(iv["low"]):
        return "-"
    fmt = "{:.4f}" if ratio else "{:+.4f}"
    verdict = "significant" if iv.get("significant") else "no significant change"
    return f"[{fmt.format(iv['low'])}, {fmt.format(iv['high'])}] {verdict}"


def compare_table(run_a: Path, run_b: Path):
    """A rich table of two runs' eval metrics side by side, with B - A and, where both runs have the eval shards,
    its 95% paired bootstrap interval over the problems both evaluated."""
    from rich.table import Table

    a, b = read_eval_section(run_a), read_eval_section(run_b)
    intervals = compare_intervals(run_a, run_b, a, b)
    name_a, name_b = str(run_a), str(run_b)
    table = Table(title="ckptdpo compare (eval metrics; 95% CI: paired bootstrap over problems)")
    for col, justify in (
        ("benchmark", "left"),
        ("model", "left"),
        ("metric", "left"),
        (name_a, "right"),
        (name_b, "right"),
        ("B - A", "right"),
        ("95% CI of B - A", "left"),
    ):
        table.add_column(col, justify=justify, overflow="fold")
    last = None
    for bench, model, label, va, vb in compare_rows(a, b):
        if last is not None and (bench, model) != last:
            _eta_row(table, intervals.get((*last, ETA_B_VS_A)))
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
            _interval(intervals.get((bench, model, label))),
        )
    if last is not None:
        _eta_row(table, intervals.get((*last, ETA_B_VS_A)))
    return table


def _eta_row(table, iv: dict[str, Any] | None) -> None:
    if iv:
        table.add_row("", "", ETA_B_VS_A, "", "", format_number(iv["estimate"], 4), _interval(iv, ratio=True))


def cost_matched_tables(run_dir: Path) -> list:
    """The run's base / DPO / GRPO view as rich renderables (what the report's cost-matched section shows): the
    costs, the three models side by side, the paired comparisons and the headline; [] without a GRPO baseline."""
    from rich.table import Table
    from rich.text import Text

    view = cost_matched_view(run_dir)
    if view is None:
        return []
    # Text, not markup: the sentences hold "[low, high]" intervals that rich would read as tags.
    out: list = [Text(f"{run_dir}: base, DPO on the factory's pairs, GRPO baseline", style="bold")]
    out.append(Text(view["budget_text"]))
    for title, (header, rows) in (
        ("side by side", view["models"]),
        ("paired differences (b − a)", view["comparisons"]),
    ):
        if not rows:
            continue
        table = Table(title=f"{run_dir}: {title}")
        for i, col in enumerate(header):
            table.add_column(col, justify="left" if i < 2 else "right", overflow="fold")
        for row in rows:
            table.add_row(*(Text(c) for c in row))
        out.append(table)
    out += [Text(f"- {line}") for line in view["headline"]]
    return out


def compare_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    run_a, run_b = Path(args.run_a), Path(args.run_b)
    console.print(compare_table(run_a, run_b))
    for run_dir in dict.fromkeys([run_a, run_b]):
        for part in cost_matched_tables(run_dir):
            console.print(part)
    return 0

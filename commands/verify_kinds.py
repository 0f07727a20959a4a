"""`ckptdpo verify INPUT --kind code|choice --output OUT.parquet`: the code and multiple-choice verifiers.

`--kind code` reads `completion` and `tests` (Python run after the code extracted from the completion, in the same
sandboxed interpreter; correct when it exits 0) and, when present, `stdin` / `expected_stdout` (a program-style
problem) and `setup` (run before the code). `--kind choice` reads `gold` (a letter) and `completion`. Both write the
same verdict columns and print the same summary table as math.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from ckptdpo.errors import UserError


def _code_tasks(table: Any, args: argparse.Namespace) -> list:
    from ckptdpo.verify.code import CodeTask

    n = table.num_rows

    def column(name: str) -> list:
        return table.column(name).to_pylist() if name in table.column_names else [None] * n

    completions, tests, setup = column(args.completion_column), column("tests"), column("setup")
    stdin, expected = column("stdin"), column("expected_stdout")
    if "tests" not in table.column_names and "expected_stdout" not in table.column_names:
        raise UserError(f"{args.input}: --kind code needs a 'tests' column (or 'stdin' and 'expected_stdout').")
    tasks = []
    for i in range(n):
        if (stdin[i] is None) != (expected[i] is None) and "stdin" in table.column_names:
            raise UserError(f"{args.input}: row {i} has only one of 'stdin' and 'expected_stdout'; give both or none.")
        cases = ((stdin[i], expected[i]),) if expected[i] is not None else ()
        tasks.append(CodeTask(completions[i], tests=tests[i] or "", setup=setup[i] or "", cases=cases))
    return tasks


def _read(path: str, required: list[str]) -> Any:
    """The input table; JSON rows may leave optional columns out (`stdin` on a functional problem), so every column
    any row has is kept, not just the first row's."""
    from pathlib import Path

    import pyarrow as pa

    from ckptdpo.tablefile import read_json_records, read_table_file

    if Path(path).suffix.lower() not in (".jsonl", ".json") or not Path(path).is_file():
        return read_table_file(path, required=required)
    records = read_json_records(Path(path))
    columns = list(dict.fromkeys(k for r in records for k in r))
    missing = [c for c in required if c not in columns]
    if missing:
        raise UserError(f"{path}: no column {missing[0]!r} (columns: {', '.join(columns)}); add it or name another.")
    return pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in records])


def verify_kind_command(args: argparse.Namespace) -> int:
    """The body of `ckptdpo verify --kind code|choice`; nothing is written when an input or the sandbox fails."""
    from commands.verify import _check_options, _print_summary, _write

    _check_options(args)
    t0 = time.perf_counter()
    if args.kind == "choice":
        from ckptdpo.verify.choice import verify_choice_batch

        table = _read(args.input, [args.gold_column, args.completion_column])
        golds, completions = (table.column(c).to_pylist() for c in (args.gold_column, args.completion_column))
        items = list(zip(golds, completions, strict=True))
        verdicts = verify_choice_batch(items)
    else:
        from ckptdpo.sandbox import SandboxLimits
        from ckptdpo.verify.code import verify_code_batch

        table = _read(args.input, [args.completion_column])
        limits = SandboxLimits(cpu_s=max(1, int(args.timeout_s)), wall_s=args.timeout_s)
        verdicts = verify_code_batch(
            _code_tasks(table, args), limits=limits, workers=args.workers, allow_unsandboxed=args.allow_unsandboxed
        )
    wall = time.perf_counter() - t0
    _write(table, verdicts, args.output)
    _print_summary(verdicts, wall, f"verify --kind {args.kind}: {args.input} -> {args.output}")
    return 0

"""Code verification: extract the program from a completion and run it against its tests in the sandbox.

A candidate is the last fenced code block after `</think>` (the whole text when there is none). It is checked by:

- `tests`: Python run after the candidate in the same interpreter (HumanEval's `check(f)`, MBPP's asserts,
  LiveCodeBench's functional calls); the candidate is correct when the program exits 0;
- `cases`: (stdin, expected stdout) pairs for program-style problems, each run in the same sandboxed process with
  its own stdin and a fresh `__main__`, compared line by line with trailing whitespace ignored.

Every candidate runs in its own sandboxed interpreter (`ckptdpo.sandbox`); its limits hold for all of its cases.
Verdicts: correct | incorrect (a failing test, a crash, an exception, a wrong output) | no_answer (no code block) |
timeout (wall-clock or CPU limit) | error (nothing to test the code with). A sandbox that cannot be built raises
SandboxError: that is never recorded as a verdict.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ckptdpo.sandbox import Program, SandboxError, SandboxLimits, run_programs

_THINK_END = "</think>"
# An opening fence with an optional info string, the body, and a closing fence at the start of a line.
_FENCE = re.compile(r"^[ \t]*```[^\n`]*\n(.*?)^[ \t]*```", re.S | re.M)
MAX_EXTRACTED_CHARS = 100_000
CASES_FAILED_EXIT = 3


@dataclass(frozen=True)
class CodeTask:
    """One candidate to check: the completion and how to test it."""

    completion: str | None
    tests: str = ""
    setup: str = ""  # run before the candidate: imports the problem's prompt had (HumanEval's `from typing ...`)
    cases: tuple[tuple[str, str], ...] = ()  # (stdin, expected stdout)


def extract_code(completion: str | None) -> str | None:
    """The body of the last fenced code block after the last `</think>` (or in the whole text without one)."""
    if not isinstance(completion, str) or not completion.strip():
        return None
    cut = completion.rfind(_THINK_END)
    region = completion[cut + len(_THINK_END) :] if cut >= 0 else completion
    blocks = [m.group(1) for m in _FENCE.finditer(region)]
    code = next((b for b in reversed(blocks) if b.strip()), None)
    return code if code is None or len(code) <= MAX_EXTRACTED_CHARS else None


# Runs the candidate once per case with that case's stdin, in this one sandboxed process; exit 3 on a wrong output.
_CASES_HARNESS = r"""
import io as _io, json as _json, os as _os, sys as _sys
_CODE = compile(_json.loads({code}), "solution.py", "exec")
def _lines(text):
    return [line.rstrip() for line in text.strip().splitlines()]
for _n, (_stdin, _expected) in enumerate(_json.loads({cases})):
    _out = _io.TextIOWrapper(_io.BytesIO(), encoding="utf-8")
    with open("_case_stdin", "w", encoding="utf-8") as _f:
        _f.write(_stdin)
    _fd = _os.open("_case_stdin", _os.O_RDONLY)
    if _fd != 0:  # 0 when the previous case's `open(0)` closed it
        _os.dup2(_fd, 0)  # so `open(0)` and `os.read(0, ...)` read the case too, not only `input()`
        _os.close(_fd)
    _sys.stdin = open(0, encoding="utf-8", closefd=False)
    _sys.stdout = _out
    try:
        exec(_CODE, {{"__name__": "__main__"}})
    except SystemExit as _e:
        if _e.code not in (None, 0):
            raise
    finally:
        _sys.stdout = _sys.__stdout__
    _out.flush()
    _got = _out.buffer.getvalue().decode("utf-8", "replace")
    if _lines(_got) != _lines(_expected):
        print(f"case {{_n}}: wrong output", file=_sys.stderr)
        raise SystemExit({exit_code})
"""


def build_program(task: CodeTask, code: str) -> str:
    """The program run for one candidate: setup, the candidate (or the cases harness around it), then the tests."""
    parts = [task.setup] if task.setup.strip() else []
    if task.cases:
        body = "\n".join(parts + [code])
        parts = [
            _CASES_HARNESS.format(
                code=repr(json.dumps(body)),
                cases=repr(json.dumps([list(c) for c in task.cases])),
                exit_code=CASES_FAILED_EXIT,
            )
        ]
        if task.tests.strip():  # functional tests then run against the candidate's definitions too
            parts = [task.setup, code, parts[0]]
    else:
        parts.append(code)
    if task.tests.strip():
        parts.append(task.tests)
    return "\n\n".join(p for p in parts if p)


def verify_code_batch(
    tasks: Sequence[CodeTask],
    *,
    limits: SandboxLimits | None = None,
    workers: int | None = None,
    allow_unsandboxed: bool = False,
) -> list:
    """Verdicts (ckptdpo.verify.Verdict) per task, in order; never raises on a bad candidate.

    Raises SandboxUnavailable when this machine cannot isolate programs and `allow_unsandboxed` is not set.
    """
    from ckptdpo.verify import Verdict  # the package re-exports this module, so import at call time

    verdicts: list = [None] * len(tasks)
    programs: list[Program] = []
    owners: list[tuple[int, str]] = []
    for i, task in enumerate(tasks):
        code = extract_code(task.completion)
        if code is None:
            verdicts[i] = Verdict("no_answer", None, None)
        elif not task.tests.strip() and not task.cases:
            verdicts[i] = Verdict("error", None, code)  # nothing to check it against
        else:
            programs.append(Program(build_program(task, code)))
            owners.append((i, code))
    results = run_programs(programs, limits, workers=workers, allow_unsandboxed=allow_unsandboxed)
    broken = [r for r in results if not r.started]
    if broken:
        # No candidate can cause this (it is reported before any of its code runs), so it is not a verdict: fail the
        # batch, and with it the shard, instead of recording correct code as wrong.
        detail = (broken[0].stderr.strip().splitlines() or [broken[0].status])[-1]
        raise SandboxError(f"the sandbox failed for {len(broken)} of {len(results)} candidates: {detail}")
    for (i, code), res in zip(owners, results, strict=True):
        status = {"ok": "correct", "failed": "incorrect"}.get(res.status, res.status)
        ok = True if status == "correct" else False if status == "incorrect" else None
        verdicts[i] = Verdict(status, ok, code)
    return verdicts

"""Verdicts from a Prefect task equal those from an unguarded script, `python -c`, a script on stdin and a thread."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tests.unit.test_verify_callers import ITEMS, expected, run_callers


def test_prefect_task_script_dash_c_stdin_and_thread_agree(prefect_harness, tmp_path: Path) -> None:
    from prefect import flow, task

    from ckptdpo.verify import verify_batch

    @task
    def verify_in_task(items: list[list]) -> list[list]:
        return [list(dataclasses.astuple(v)) for v in verify_batch([tuple(it) for it in items], timeout_s=5.0)]

    @flow
    def verify_flow(items: list[list]) -> list[list]:
        return verify_in_task.submit(items).result()  # a task run in Prefect's worker thread

    want = expected()
    assert verify_flow(ITEMS) == want
    outputs = run_callers(tmp_path)
    assert set(outputs) == {"script", "dash_c", "stdin"}
    for name, out in outputs.items():
        assert out["main"] == want, name
        assert out["thread"] == want, name

"""The report step: the pipeline writes `<run_dir>/report/index.html` at the end of every run."""

from __future__ import annotations

from prefect import flow

from tasks.eval import write_report


@flow(name="report")
def report_step(run_dir: str) -> str:
    """Write the run report and publish it as Prefect artifacts; returns the report's path."""
    return write_report(run_dir)

"""The report step: the pipeline writes `<run_dir>/report/index.html` at the end of every run and publishes it to
the Prefect UI as a markdown artifact with its figures and plots embedded."""

from __future__ import annotations

from prefect import flow

from tasks.report import publish_report, write_report


@flow(name="report", flow_run_name="report {run_dir}")
def report_step(run_dir: str) -> str:
    """Write the run report and publish it as Prefect artifacts; returns the report's path."""
    path = write_report(run_dir)
    publish_report(run_dir, path)
    return path

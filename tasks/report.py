"""The run report in the Prefect UI: a markdown artifact with the key figures and every plot embedded.

The HTML report is a file on the worker's disk, which a browser on another machine cannot open (a `file://` link
from the UI leads nowhere). The artifact carries what matters itself: the headline, the metrics table and the
report's plots as `data:` PNG images, under a key per run directory so two runs never overwrite each other's.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from ckptdpo.report import headline_markdown
from tasks.planning import artifact_key

_IMG = re.compile(r'<img src="(data:image/png;base64,[A-Za-z0-9+/=]+)" alt="([^"]*)">')
MAX_PLOTS = 12  # the artifact lives in Prefect's database: the figures, not a copy of every page


def report_markdown(run_dir: Path, report_html: str) -> str:
    """The headline and metrics of `run_dir`, then each plot of its HTML report as an embedded image."""
    plots = _IMG.findall(report_html)[:MAX_PLOTS]
    lines = [headline_markdown(run_dir)]
    if plots:
        lines.append("## Plots\n")
    for src, alt in plots:
        lines.append(f"![{html.unescape(alt).replace(']', ')')}]({src})\n")
    return "\n".join(lines)


@task(name="publish_report", retries=1, retry_delay_seconds=5)
def publish_report(run_dir: str, report_path: str) -> str:
    """Publish the report as a markdown artifact keyed by the run directory; returns the artifact key."""
    key = artifact_key(run_dir, "report")
    markdown = report_markdown(Path(run_dir), Path(report_path).read_text())
    create_markdown_artifact(markdown=markdown, key=key, description=f"ckptdpo report of {run_dir}")
    return key


@task(name="write_report", retries=1, retry_delay_seconds=5)
def write_report(run_dir: str) -> str:
    """Write `<run_dir>/report/index.html` (self-contained HTML); returns its path."""
    from ckptdpo.report import build_report
    from tasks.registry import report_sections

    return str(build_report(Path(run_dir), report_sections()))

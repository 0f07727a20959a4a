"""The report page: the overview, then the sections the caller lists (the stage registry gives each stage's, in
pipeline order), CSS that keeps every table inside the page, the atomic write, and the headline as Markdown for a
Prefect artifact."""

from __future__ import annotations

import html
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ckptdpo.report.data as data
import ckptdpo.report.evaluation as evaluation
from ckptdpo.errors import UserError
from ckptdpo.report.draw import format_number, note
from ckptdpo.shards import atomic_write_bytes, read_manifest, read_stats

log = logging.getLogger(__name__)

REPORT_DIR = "report"
REPORT_FILE = "index.html"

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 1.5em; color: #222; line-height: 1.45; }
p, li { overflow-wrap: anywhere; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd;
       padding-bottom: 0.2em; margin-top: 1.8em; } h3 { font-size: 1.0em; margin: 1.2em 0 0.3em; }
nav a { margin-right: 1em; font-size: 0.9em; } .sub { color: #666; margin-top: 0; }
img { max-width: 100%; height: auto; display: block; } .note { color: #777; font-style: italic; }
.caption { color: #555; font-size: 0.9em; } .error { color: #b00020; }
.table-wrap { max-width: 100%; overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: right; }
table.metrics th { white-space: normal; vertical-align: bottom; } table.metrics td { white-space: nowrap; }
table.cross td { white-space: normal; min-width: 5em; }
th { background: #f4f4f4; } td:first-child, td:nth-child(2), .overview th { text-align: left; }
.overview td { text-align: left; } .headline li { margin: 0.2em 0; }
"""


def _skipped_notes(run_dir: Path) -> str:
    skipped = data.eval_manifest_stats(run_dir).get("skipped_models") or {}
    return "".join(note(f"model {name} not evaluated: {why}.") for name, why in skipped.items())


def section_overview(stats: dict[str, Any], run_dir: Path, lines: list[str]) -> str:
    rows = []
    problems = stats.get("problems") or {}
    if problems:
        rows.append(("problems", f"{format_number(problems.get('num_problems'))} ({problems.get('source', '')})"))
    gen = stats.get("generate") or {}
    if gen:
        text = f"{format_number(gen.get('num_samples'))}, {format_number(gen.get('completion_tokens'))} tokens"
        rows.append(("trajectories", text))
    ver = stats.get("verify") or {}
    if ver:
        rows.append(("accuracy of trajectories", format_number(ver.get("accuracy"))))
    pairs = (stats.get("resample") or {}).get("pairs") or {}
    if pairs:
        by_type = ", ".join(f"{k} {v:,}" for k, v in (pairs.get("by_type") or {}).items()) or "none"
        per_1k = format_number(pairs.get("pairs_per_1k_generated_tokens"))
        rows.append(("resample pairs", f"{by_type} ({per_1k} per 1k generated tokens)"))
    collected = (read_manifest(run_dir / "pairs") or {}).get("stats") or {}
    if collected.get("by_type"):
        rows.append(("all pairs", ", ".join(f"{k} {v:,}" for k, v in collected["by_type"].items())))
    train = stats.get("train") or {}
    if train:
        keys = [k for k, v in train.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)][:5]
        rows.append(("train", ", ".join(f"{k} {format_number(train[k])}" for k in keys)))
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    out = f'<table class="overview">{body}</table>' if rows else note("stats.json holds no stage yet.")
    return out + (f'<ul class="headline">{items}</ul>' if items else "")


class ReportRun:
    """What the sections read, each loaded once on first use."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.stats = read_stats(run_dir)
        self.section = data.eval_section(self.stats)
        self._cache: dict[str, Any] = {}

    def get(self, name: str, fn: Callable[[], Any]) -> Any:
        if name not in self._cache:
            self._cache[name] = fn()
        return self._cache[name]

    def traj(self):
        return self.get("traj", lambda: data.load_trajectories(self.run_dir))

    def pairs(self):
        return self.get("pairs", lambda: data.load_pairs(self.run_dir))

    def intervals(self) -> dict[str, Any]:
        return self.get("intervals", lambda: data.eval_intervals(self.run_dir, self.section))

    def dto_figures(self) -> data.DTOFigures | None:
        results = self.get("dto", lambda: data.load_dto_results(self.run_dir))
        return None if results is None else data.dto_figures(results)

    def dto_pairs(self) -> list[tuple[int, int]]:
        pairs = self.pairs()
        if pairs is None:
            return []
        cols = (pairs.column(c).to_pylist() for c in ("pair_type", "chosen_tokens", "rejected_tokens"))
        return [(c, r) for t, c, r in zip(*cols, strict=True) if t == "dto" and c and r]

    def headline(self) -> list[str]:
        return evaluation.headline(self.section, self.intervals())

    def reference(self) -> str:
        """The model the others are compared with (the first evaluated)."""
        return data.eval_manifest_stats(self.run_dir).get("reference") or ""

    def eval_or(self, fn: Callable[[], str]) -> str:
        return fn() if self.section else evaluation.no_eval()


@dataclass(frozen=True)
class ReportSection:
    """One section of the report: its anchor, its title, and what draws it from the run (HTML)."""

    anchor: str
    title: str
    draw: Callable[[ReportRun], str]


OVERVIEW = ReportSection("overview", "Overview", lambda run: section_overview(run.stats, run.run_dir, run.headline()))


def skipped_notes(run: ReportRun) -> str:
    return _skipped_notes(run.run_dir)


def render_report(run_dir: Path, sections: Sequence[ReportSection]) -> str:
    """The report's HTML for one run directory: the overview, then `sections` in order."""
    run_dir = Path(run_dir)
    run = ReportRun(run_dir)
    listed = [OVERVIEW, *sections]
    parts = []
    for section in listed:
        try:
            body = section.draw(run)
        except Exception as e:  # one broken section must not cost the whole report
            log.exception("report section %s failed", section.anchor)
            body = f'<p class="error">this section could not be drawn: {html.escape(f"{type(e).__name__}: {e}")}</p>'
        parts.append(f'<section id="{section.anchor}"><h2>{html.escape(section.title)}</h2>{body}</section>')
    nav = "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in listed)
    name = data.load_recipe_name(run_dir)
    title = f"ckptdpo report: {name or run_dir.name}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # An empty icon, so the browser does not request /favicon.ico next to a file:// page.
        f'<link rel="icon" href="data:,"><title>{html.escape(title)}</title><style>{CSS}</style></head><body>'
        f'<h1>{html.escape(title)}</h1><p class="sub">{html.escape(str(run_dir))}</p><nav>{nav}</nav>'
        + "".join(parts)
        + "</body></html>\n"
    )


def build_report(run_dir: Path, sections: Sequence[ReportSection]) -> Path:
    """Write `<run_dir>/report/index.html` atomically; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory; pass the directory a run wrote (with stats.json).")
    path = run_dir / REPORT_DIR / REPORT_FILE
    atomic_write_bytes(path, render_report(run_dir, sections).encode())
    return path


def headline_markdown(run_dir: Path) -> str:
    """The report's headline (with intervals) and metrics table as Markdown, for a Prefect artifact."""
    run = ReportRun(Path(run_dir))
    lines = [f"# ckptdpo report: {run_dir}", "", f"Report: `{Path(run_dir) / REPORT_DIR / REPORT_FILE}`", ""]
    lines += [f"- {line}" for line in run.headline()]
    if run.section:
        header, rows = evaluation.metric_rows(run.section, run.intervals())
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"

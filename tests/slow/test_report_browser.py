"""The report in headless Chromium: every plot is drawn, no plotted point lies outside its axes, and the page never
scrolls sideways (wide tables scroll inside their own box). Needs chromium (`make browser`) and playwright."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ckptdpo.report import build_report
from tasks.registry import report_sections
from tests.unit.test_report import PLOTTED, make_run

pytestmark = pytest.mark.slow

# Reads, in the page, every figure's embedded data and checks each point against its axes' limits.
CHECK_FIGURES = """() => [...document.querySelectorAll('script.figure-data')].map(s => {
  const fig = JSON.parse(s.textContent);
  const img = s.previousElementSibling;
  const outside = [];
  for (const ax of fig.axes) {
    const [x0, x1] = [...ax.xlim].sort((a, b) => a - b), [y0, y1] = [...ax.ylim].sort((a, b) => a - b);
    for (const [x, y] of ax.points) if (x < x0 || x > x1 || y < y0 || y > y1) outside.push([ax.title, x, y]);
    // A marker on the very edge is drawn cut in half: markers must sit strictly inside (1% of the range).
    const f = ax.xscale === 'log' ? Math.log : (v => v);
    const [fx0, fx1] = [f(x0), f(x1)], mx = 0.01 * (fx1 - fx0), my = 0.01 * (y1 - y0);
    for (const [x, y] of ax.markers)
      if (!(f(x) > fx0 + mx && f(x) < fx1 - mx && y > y0 + my && y < y1 - my))
        outside.push(['marker', ax.title, x, y]);
  }
  const box = img.getBoundingClientRect();
  return {alt: fig.alt, tag: img.tagName, drawn: img.complete && img.naturalWidth > 0, width: box.width,
          points: fig.axes.reduce((n, ax) => n + ax.points.length, 0), outside};
})"""
LAYOUT = """() => ({page: document.documentElement.scrollWidth, view: window.innerWidth,
  tables: [...document.querySelectorAll('table.metrics')].map(t => ({
    wrapped: t.parentElement.classList.contains('table-wrap'),
    box: t.parentElement.getBoundingClientRect().right <= document.body.getBoundingClientRect().right + 1}))})"""


def chromium_path() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail("chromium is not installed: run `make browser` (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    # Three benchmark kinds make the metrics tables as wide as they get.
    run_dir = make_run(
        tmp_path_factory.mktemp("browser") / "run", kinds={"math": "math", "code": "code", "mc": "choice"}
    )
    return build_report(run_dir, report_sections())


@pytest.mark.parametrize("width", [1200, 760])
def test_report_in_headless_chromium(report: Path, width: int):
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(report.resolve().as_uri(), wait_until="load")
            figures = page.evaluate(CHECK_FIGURES)
            layout = page.evaluate(LAYOUT)
            heading = page.inner_text("h1")
            shot = report.parent / f"screenshot-{width}.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    assert heading == "ckptdpo report: synthetic"
    assert len(figures) == len(PLOTTED), [f["alt"] for f in figures]
    for fig in figures:
        assert fig["tag"] == "IMG" and fig["drawn"] and fig["width"] > 0, fig["alt"]
        assert fig["points"] > 0 and fig["outside"] == [], json.dumps(fig)
    assert layout["page"] <= layout["view"], layout  # the page itself never scrolls sideways
    assert layout["tables"] and all(t["wrapped"] and t["box"] for t in layout["tables"]), layout
    assert shot.stat().st_size > 50_000  # a full page of plots, not a blank screenshot

"""The run report (`ckptdpo report RUN_DIR`): one self-contained HTML page with plots, and `ckptdpo compare`.

Every section reads what the run left (stage shards with only the columns it plots, stats.json, the training
summary) and shows a short "not run" note where that is missing, so a report can be written after any stage.
Plots are PNGs drawn with matplotlib's object API (no pyplot, no global backend switch) and embedded as base64,
each followed by the data it plots as JSON. Every base-vs-trained difference carries a paired bootstrap interval
over problems (`ckptdpo.metrics.paired_eval_intervals`).

Modules: `data` (readers and the one definition of each DTO and interval figure), `draw` (figures and formatting),
`sections` (the data factory), `evaluation` (eval plots, tables per benchmark kind, headline), `baseline` (base,
DPO and the cost-matched GRPO baseline side by side, with costs), `page` (the page), `compare` (two runs).
"""

from __future__ import annotations

from ckptdpo.report.baseline import (
    comparison_rows,
    cost_matched_headline,
    cost_matched_rows,
    cost_matched_view,
    model_costs,
    section_cost_matched,
)
from ckptdpo.report.compare import COMPARED, ETA_B_VS_A, compare_intervals, compare_rows, read_eval_section
from ckptdpo.report.data import (
    DTOFigures,
    benchmark_kinds,
    dto_figures,
    eval_intervals,
    eval_section,
    load_dto_results,
    load_grpo_summary,
    load_pairs,
    load_recipe_name,
    load_train_summary,
    load_trajectories,
    pair_intervals,
    read_eval_rows,
    run_intervals,
)
from ckptdpo.report.draw import COLORS, MODEL_COLORS, NOT_RUN, format_counts, format_number, interval_text
from ckptdpo.report.evaluation import cross_rows, headline, metric_rows
from ckptdpo.report.page import (
    CSS,
    REPORT_DIR,
    REPORT_FILE,
    ReportRun,
    ReportSection,
    build_report,
    headline_markdown,
    render_report,
    skipped_notes,
)
from ckptdpo.report.sections import (
    section_checkpoints,
    section_dto,
    section_lengths,
    section_pair_quality,
    section_pairs,
    section_rounds,
    section_training,
)

__all__ = [
    "COLORS",
    "COMPARED",
    "ETA_B_VS_A",
    "CSS",
    "DTOFigures",
    "MODEL_COLORS",
    "NOT_RUN",
    "REPORT_DIR",
    "REPORT_FILE",
    "ReportRun",
    "ReportSection",
    "benchmark_kinds",
    "build_report",
    "compare_intervals",
    "compare_rows",
    "comparison_rows",
    "cost_matched_headline",
    "cost_matched_rows",
    "cost_matched_view",
    "cross_rows",
    "dto_figures",
    "eval_intervals",
    "eval_section",
    "format_counts",
    "format_number",
    "headline",
    "headline_markdown",
    "interval_text",
    "load_dto_results",
    "load_grpo_summary",
    "load_pairs",
    "load_recipe_name",
    "load_train_summary",
    "load_trajectories",
    "metric_rows",
    "model_costs",
    "pair_intervals",
    "read_eval_rows",
    "read_eval_section",
    "render_report",
    "run_intervals",
    "section_checkpoints",
    "section_cost_matched",
    "section_dto",
    "section_lengths",
    "section_pair_quality",
    "section_pairs",
    "section_rounds",
    "section_training",
    "skipped_notes",
]

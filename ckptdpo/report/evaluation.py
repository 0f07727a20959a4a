"""The report's eval sections: pass@k curves, accuracy vs tokens, metrics tables per benchmark kind, the
cross-benchmark base-vs-trained table with paired bootstrap intervals, and the headline sentences."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from ckptdpo.report.data import KINDS
from ckptdpo.report.draw import MODEL_COLORS, caption, figure, format_number, img, interval_text, note, padded, signed

Section = Mapping[str, Mapping[str, Mapping[str, Any]]]
Intervals = Mapping[str, Mapping[str, Mapping[str, Any]]]


def model_color(names: Sequence[str], name: str) -> str:
    return MODEL_COLORS[list(names).index(name) % len(MODEL_COLORS)]


def _width(n: int) -> float:
    return 4.2 if n > 1 else 6.4


def section_pass_at_k(section: Section) -> str:
    fig, axes = figure(len(section), width=_width(len(section)))
    for ax, (bench, models) in zip(axes, section.items(), strict=True):
        names, ks_seen, values = list(models), [], []
        for name, m in models.items():
            curve = {int(k): v for k, v in (m.get("pass_at_k_curve") or {}).items()}
            cons = {int(k): v for k, v in (m.get("cons_at_k") or {}).items()}
            color = model_color(names, name)
            for data, style, label in ((curve, "o-", "pass@k"), (cons, "x--", "cons@k")):
                if data:
                    ks = sorted(data)
                    ax.plot(ks, [data[k] for k in ks], style, color=color, markersize=3, label=f"{name} {label}")
                    ks_seen += ks
                    values += [data[k] for k in ks]
        ax.set_xscale("log", base=2)
        lo, hi = min(ks_seen, default=1), max(ks_seen, default=2)
        ax.set_xlim(lo / 1.25, hi * 1.25)
        ax.set_ylim(*padded(values, floor=0, ceiling=1))
        ax.set_xlabel("k")
        ax.set_title(bench)
        ax.legend(fontsize=8)
    text = (
        "Unbiased pass@k (solid) and majority-vote cons@k (dashed, the expectation over subsets of k of the n "
        "samples, so cons@1 = pass@1); the method aims to lift pass@1 toward pass@k."
    )
    return img(fig, "pass@k curves per benchmark and model") + caption(text)


def section_accuracy_tokens(section: Section) -> str:
    fig, axes = figure(len(section), width=_width(len(section)))
    for ax, (bench, models) in zip(axes, section.items(), strict=True):
        names = list(models)
        points = {n: (m.get("mean_tokens"), m.get("pass_at_1")) for n, m in models.items()}
        points = {n: p for n, p in points.items() if None not in p}
        for name, (x, y) in points.items():
            ax.scatter([x], [y], s=60, color=model_color(names, name), label=name, zorder=3)
        ref = names[0]
        for name, (x, y) in points.items():
            if name != ref and ref in points:
                x0, y0 = points[ref]
                ax.annotate("", xy=(x, y), xytext=(x0, y0), arrowprops={"arrowstyle": "->", "color": "#888888"})
        ax.set_xlim(*padded([p[0] for p in points.values()], floor=0))
        ax.set_ylim(*padded([p[1] for p in points.values()], floor=0, ceiling=1))
        ax.set_xlabel("mean tokens")
        ax.set_ylabel("pass@1")
        ax.set_title(bench)
        ax.legend(fontsize=8)
    return img(fig, "accuracy vs tokens per benchmark") + caption(
        "Up and to the left is better: more accurate with fewer tokens. Arrows start at the reference model."
    )


def metric_rows(section: Section, intervals: Intervals | None = None) -> tuple[list[str], list[list[str]]]:
    """The metrics table: a header and one row of formatted cells per (benchmark, model); with `intervals`, the
    pass@1 difference to the reference model and its paired bootstrap interval."""
    ks = sorted({int(k) for models in section.values() for m in models.values() for k in m.get("pass_at_k") or {}})
    header = [
        "benchmark",
        "model",
        "problems",
        "pass@1",
        *[f"pass@{k}" for k in ks if k > 1],
        *[f"cons@{k}" for k in ks],
        "mean tokens",
        "tokens (incorrect)",
        "length",
        "loop",
        "eta",
        "AES",
    ]
    if intervals is not None:
        header.append("Δ pass@1 vs reference [95% CI]")
    rows = []
    for bench, models in section.items():
        for name, m in models.items():
            pk, ck = m.get("pass_at_k") or {}, m.get("cons_at_k") or {}
            row = [
                bench,
                name,
                format_number(m.get("num_problems")),
                format_number(m.get("pass_at_1")),
                *[format_number(pk.get(str(k))) for k in ks if k > 1],
                *[format_number(ck.get(str(k))) for k in ks],
                format_number(m.get("mean_tokens")),
                format_number(m.get("mean_tokens_incorrect")),
                format_number(m.get("length_share")),
                format_number(m.get("loop_share")),
                format_number(m.get("eta")),
                format_number(m.get("aes")),
            ]
            if intervals is not None:
                iv = (intervals.get(bench) or {}).get(name) or {}
                row.append(interval_text(iv.get("pass_at_1"), what="") or "-")
            rows.append(row)
    return header, rows


def _table(header: list[str], rows: list[list[str]], cls: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    # The wrapper scrolls sideways when a wide table cannot wrap enough; the page itself never does.
    table = f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    return f'<div class="table-wrap">{table}</div>'


def by_kind(section: Section, kinds: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The eval section split by benchmark kind, math / code / choice first, then any other kind."""
    order = list(KINDS) + sorted(set(kinds.values()) - set(KINDS))
    return {k: {b: m for b, m in section.items() if kinds.get(b) == k} for k in order if k in kinds.values()}


def cross_rows(section: Section, intervals: Intervals) -> tuple[list[str], list[list[str]]]:
    """One row per (benchmark, non-reference model): reference -> model for pass@1, pass@k (largest k), mean tokens
    and eta, each difference with its paired bootstrap interval over the benchmark's problems."""
    header = ["benchmark", "models", "problems", "pass@1", "pass@k", "mean tokens", "eta", "verdict on pass@1"]
    rows = []
    for bench, models in section.items():
        names = list(models)
        ref = models[names[0]]
        for name in names[1:]:
            m, iv = models[name], (intervals.get(bench) or {}).get(name) or {}
            kmax = max((int(k) for k in m.get("pass_at_k") or {} if int(k) > 1), default=None)
            pk = "-"
            if kmax and str(kmax) in (ref.get("pass_at_k") or {}):
                pk = f"pass@{kmax} {_arrow(ref['pass_at_k'][str(kmax)], m['pass_at_k'][str(kmax)])}"
                pk += _bracket((iv.get("pass_at_k") or {}).get(str(kmax)))
            p1 = iv.get("pass_at_1") or {}
            verdict = "-" if not p1 else "significant change" if p1.get("significant") else "no significant change"
            rows.append(
                [
                    bench,
                    f"{names[0]} → {name}",
                    format_number(iv.get("num_problems", m.get("num_problems"))),
                    _arrow(ref.get("pass_at_1"), m.get("pass_at_1")) + _bracket(iv.get("pass_at_1")),
                    pk,
                    _arrow(ref.get("mean_tokens"), m.get("mean_tokens")) + _bracket(iv.get("mean_tokens"), 0),
                    format_number(m.get("eta")) + _bracket(iv.get("eta")),
                    verdict,
                ]
            )
    return header, rows


def _arrow(a: Any, b: Any) -> str:
    return f"{format_number(a)} → {format_number(b)}"


def _bracket(iv: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not iv or iv.get("low") is None:
        return ""
    if iv.get("null", 0) == 0:
        return f" (Δ {signed(iv['estimate'], digits)} [{signed(iv['low'], digits)}, {signed(iv['high'], digits)}])"
    return f" [{format_number(iv['low'], digits)}, {format_number(iv['high'], digits)}]"


def section_tables(section: Section, kinds: Mapping[str, str], intervals: Intervals, notes: str, ref: str) -> str:
    parts = []
    for kind, benches in by_kind(section, kinds).items():
        header, rows = metric_rows(benches, intervals)
        parts.append(f"<h3>{html.escape(kind)} benchmarks</h3>" + _table(header, rows, "metrics"))
    header, rows = cross_rows(section, intervals)
    if rows:
        parts.append("<h3>base vs trained, every benchmark</h3>" + _table(header, rows, "metrics cross"))
        parts.append(
            caption(
                "Δ: trained minus reference; [low, high]: 95% paired bootstrap interval over the benchmark's problems "
                "(2,000 resamples, the same problems for both models); eta's no-change value is 1. An interval that "
                "holds the no-change value means no significant change."
            )
        )
    parts.append(
        caption(
            "length / loop: share of samples cut at max_tokens / stopped by the loop guard. eta = (acc/acc_ref) x "
            f"(tokens_ref/tokens) and AES (O1-Pruner) compare with the reference model{f' ({ref})' if ref else ''}; "
            "tokens (incorrect) counts every sample not verified correct; cons@k is the majority vote's accuracy "
            "averaged over every subset of k samples."
        )
    )
    return "".join(parts) + notes


def headline(section: Section, intervals: Intervals | None = None) -> list[str]:
    """One sentence per benchmark: pass@1, the pass@k gap, mean tokens and eta, reference -> each other model, each
    difference with its interval and "no significant change" where the interval holds the no-change value."""
    intervals = intervals or {}
    lines = []
    for bench, models in section.items():
        names = list(models)
        ref = models[names[0]]
        for name in names[1:]:
            m, iv = models[name], (intervals.get(bench) or {}).get(name) or {}
            parts = [f"pass@1 {_arrow(ref.get('pass_at_1'), m.get('pass_at_1'))}" + _paren(iv.get("pass_at_1"))]
            kmax = max((int(k) for k in m.get("pass_at_k") or {}), default=None)
            if kmax and kmax > 1 and str(kmax) in (ref.get("pass_at_k") or {}):
                gaps = [x["pass_at_k"][str(kmax)] - (x.get("pass_at_1") or 0) for x in (ref, m)]
                parts.append(f"pass@{kmax} − pass@1 gap {gaps[0]:.3f} → {gaps[1]:.3f}")
                parts.append(
                    f"pass@{kmax} {_arrow(ref['pass_at_k'][str(kmax)], m['pass_at_k'][str(kmax)])}"
                    + _paren((iv.get("pass_at_k") or {}).get(str(kmax)))
                )
            parts.append(
                f"mean tokens {_arrow(ref.get('mean_tokens'), m.get('mean_tokens'))}"
                + _paren(iv.get("mean_tokens"), 0)
            )
            if m.get("eta") is not None:
                parts.append(f"eta {format_number(m['eta'])}" + _paren(iv.get("eta"), ratio=True))
            lines.append(f"{bench}, {names[0]} → {name}: " + ", ".join(parts) + ".")
        if len(names) == 1:
            lines.append(
                f"{bench}, {names[0]}: pass@1 {format_number(ref.get('pass_at_1'))}, mean tokens "
                f"{format_number(ref.get('mean_tokens'))}."
            )
    return lines


def _paren(iv: Mapping[str, Any] | None, digits: int = 3, ratio: bool = False) -> str:
    if not iv or iv.get("low") is None:
        return ""
    if ratio:
        text = f"95% CI [{format_number(iv['low'], digits)}, {format_number(iv['high'], digits)}]"
    else:
        text = (
            f"Δ {signed(iv['estimate'], digits)}, 95% CI [{signed(iv['low'], digits)}, {signed(iv['high'], digits)}]"
        )
    return f" ({text}; {'significant' if iv.get('significant') else 'no significant change'})"


def no_eval(what: str = "") -> str:
    return note(f"not run: no eval stage in this run{what}.")

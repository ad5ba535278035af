"""The `--html` report: one self-contained page, inline SVG charts, no network.

Owns: rendering a report dictionary (`simulator.report.build_report`) as HTML: the
counts, a latency histogram per kind (log-spaced bins, percentile marks) and
throughput over time. Pure: takes values, returns a string.
Must not: compute verdicts or read files.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from simulator.stats import HistogramBin, histogram

__all__ = ["render_html"]

W, H, PAD = 560, 200, 36
COLORS = {"sent": "#1f77b4", "acked": "#2ca02c", "delivered": "#d62728"}


def render_html(report: Mapping[str, Any], samples: Mapping[str, Sequence[float]]) -> str:
    title = f"gatepass-sim {report['scenario']['name']}"
    verdict = "OK" if report["ok"] else "FAILED: " + "; ".join(report["failures"])
    charts = "".join(
        _section(
            f"{kind} latency (ms)",
            _histogram_svg(histogram(list(values)), report["latency_ms"].get(kind, {})),
        )
        for kind, values in samples.items()
        if values
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}
section{{display:inline-block;margin:1em;vertical-align:top}}.ok{{color:#2ca02c}}.bad{{color:#d62728}}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="{"ok" if report["ok"] else "bad"}"><b>{html.escape(verdict)}</b></p>
{_table("devices", report["devices"])}{_table("messages", report["messages"])}
{_latency_table(report["latency_ms"])}
{_section("throughput (messages per second)", _throughput_svg(report["throughput"]))}
{charts}
<h2>report</h2><pre>{html.escape(json.dumps(_without(report, "throughput"), indent=2))}</pre>
</body></html>
"""


def _without(report: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k != key}


def _table(name: str, values: Mapping[str, Any]) -> str:
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in values)
    row = "".join(f"<td>{html.escape(str(v))}</td>" for v in values.values())
    return f"<h2>{html.escape(name)}</h2><table><tr>{head}</tr><tr>{row}</tr></table>"


def _latency_table(latency: Mapping[str, Mapping[str, Any]]) -> str:
    cols = ("count", "p50", "p95", "p99", "max")
    head = "<th></th>" + "".join(f"<th>{c}</th>" for c in cols)
    rows = "".join(
        f"<tr><th>{html.escape(kind)}</th>"
        + "".join(f"<td>{'' if s.get(c) is None else s.get(c)}</td>" for c in cols)
        + "</tr>"
        for kind, s in latency.items()
    )
    return f"<h2>latency (ms)</h2><table><tr>{head}</tr>{rows}</table>"


def _section(title: str, svg: str) -> str:
    return f"<section><h3>{html.escape(title)}</h3>{svg}</section>"


def _histogram_svg(bins: Sequence[HistogramBin], marks: Mapping[str, Any]) -> str:
    if not bins:
        return "<p>no samples</p>"
    top = max(b.count for b in bins) or 1
    width = (W - 2 * PAD) / len(bins)
    bars = []
    for i, b in enumerate(bins):
        h = (H - 2 * PAD) * b.count / top
        x, y = PAD + i * width, H - PAD - h
        bars.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(width - 1, 1):.1f}" height="{h:.1f}" '
            f'fill="#1f77b4"><title>{b.low:.2f}-{b.high:.2f} ms: {b.count}</title></rect>'
        )
    lo, hi = bins[0].low, bins[-1].high
    labels = (
        f'<text x="{PAD}" y="{H - 10}" font-size="11">{lo:.2f}</text>'
        f'<text x="{W - PAD}" y="{H - 10}" font-size="11" text-anchor="end">{hi:.1f} ms</text>'
        f'<text x="{PAD - 4}" y="{PAD}" font-size="11" text-anchor="end">{top}</text>'
    )

    lines = []
    for name, color in (("p50", "#2ca02c"), ("p99", "#d62728")):
        value = marks.get(name)
        if value is None or value <= 0:
            continue
        frac = (math.log10(max(value, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
        x = PAD + frac * (W - 2 * PAD)
        lines.append(
            f'<line x1="{x:.1f}" y1="{PAD - 10}" x2="{x:.1f}" y2="{H - PAD}" stroke="{color}" '
            f'stroke-dasharray="4 2"/><text x="{x + 2:.1f}" y="{PAD - 12}" font-size="11" '
            f'fill="{color}">{name} {value:.1f}</text>'
        )
    return _svg("".join(bars) + labels + "".join(lines))


def _throughput_svg(rows: Sequence[Mapping[str, int]]) -> str:
    if not rows:
        return "<p>no messages</p>"
    top = max(max(r.get(k, 0) for k in COLORS) for r in rows) or 1
    span = max(len(rows) - 1, 1)
    paths = []
    for kind, color in COLORS.items():
        points = " ".join(
            f"{PAD + (W - 2 * PAD) * r['t'] / span:.1f},"
            f"{H - PAD - (H - 2 * PAD) * r.get(kind, 0) / top:.1f}"
            for r in rows
        )
        paths.append(f'<polyline points="{points}" fill="none" stroke="{color}"/>')
    legend = "".join(
        f'<text x="{PAD + 90 * i}" y="14" font-size="11" fill="{c}">{k}</text>'
        for i, (k, c) in enumerate(COLORS.items())
    )
    axes = (
        f'<text x="{PAD - 4}" y="{PAD}" font-size="11" text-anchor="end">{top}/s</text>'
        f'<text x="{W - PAD}" y="{H - 10}" font-size="11" text-anchor="end">{span} s</text>'
    )
    return _svg("".join(paths) + legend + axes)


def _svg(body: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}"><rect width="{W}" height="{H}" fill="#fafafa"/>'
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#999"/>'
        f"{body}</svg>"
    )

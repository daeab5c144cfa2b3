"""The replay report: one self-contained HTML file (plotly, its JavaScript inlined), readable
offline: the KPI table, fleet power against the budget with and without the policies, caps over
time, and the actions and orient's findings on a timeline."""

from __future__ import annotations

import html
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from agent.replay.engine import ASSUMPTIONS, ReplayReport, SetResult

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")
RECORDED = "#555555"
PLOT_CONFIG = {"displaylogo": False, "responsive": True}


def _x(report: ReplayReport, times: list[float]) -> list[Any]:
    """Unix time as dates; twin time as hours from the start."""
    if report.time_base == "unix":
        return [datetime.fromtimestamp(t, UTC) for t in times]
    return [(t - report.start_s) / 3600.0 for t in times]


def _x_title(report: ReplayReport) -> str:
    return "time (UTC)" if report.time_base == "unix" else "twin time (h)"


def _nan_to_none(values: list[float]) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values]


def power_figure(report: ReplayReport) -> go.Figure:
    fig = go.Figure()
    first = report.sets[0].timeline
    x = _x(report, first.time_s)
    budget = _nan_to_none(first.budget_w)
    if any(b is not None for b in budget):
        fig.add_trace(
            go.Scatter(
                x=x, y=budget, name="budget", line={"color": "black", "dash": "dash", "width": 2}
            )
        )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=first.fleet_obs_w,
            name="recorded (without the policies)",
            line={"color": RECORDED, "width": 1.5},
        )
    )
    for i, result in enumerate(report.sets):
        tl = result.timeline
        color = COLORS[i % len(COLORS)]
        xs = _x(report, tl.time_s)
        fig.add_trace(
            go.Scatter(
                x=xs + xs[::-1],
                y=tl.fleet_cf_hi_w + tl.fleet_cf_lo_w[::-1],
                fill="toself",
                fillcolor=_alpha(color, 0.18),
                line={"width": 0},
                hoverinfo="skip",
                name=f"{result.policy_set.name}: 90% interval",
                showlegend=True,
            )
        )
        fig.add_trace(
            go.Scatter(x=xs, y=tl.fleet_cf_w, name=result.policy_set.name, line={"color": color})
        )
    fig.update_layout(
        title="Fleet power against the budget: as recorded, and under each policy set",
        xaxis_title=_x_title(report),
        yaxis_title="fleet power (W, GPUs + node overhead)",
        height=460,
        legend={"orientation": "h", "y": -0.2},
        margin={"l": 70, "r": 20, "t": 60, "b": 40},
    )
    return fig


def caps_figure(report: ReplayReport) -> go.Figure:
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    first = report.sets[0].timeline
    x = _x(report, first.time_s)
    fig.add_trace(
        go.Scatter(
            x=x,
            y=_nan_to_none(first.mean_cap_obs_w),
            name="mean cap, recorded",
            line={"color": RECORDED},
        ),
        secondary_y=False,
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=first.capped_obs,
            name="GPUs held by their cap, recorded",
            line={"color": RECORDED, "dash": "dot"},
        ),
        secondary_y=True,
    )
    for i, result in enumerate(report.sets):
        tl = result.timeline
        color = COLORS[i % len(COLORS)]
        xs = _x(report, tl.time_s)
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=_nan_to_none(tl.mean_cap_cf_w),
                name=f"mean cap, {result.policy_set.name}",
                line={"color": color},
            ),
            secondary_y=False,
        )
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=tl.capped_cf,
                name=f"GPUs held by their cap, {result.policy_set.name}",
                line={"color": color, "dash": "dot"},
            ),
            secondary_y=True,
        )
    fig.update_layout(
        title="Power caps over time",
        xaxis_title=_x_title(report),
        height=420,
        legend={"orientation": "h", "y": -0.25},
        margin={"l": 70, "r": 70, "t": 60, "b": 40},
    )
    fig.update_yaxes(title_text="mean power cap (W)", secondary_y=False)
    fig.update_yaxes(title_text="GPUs whose cap binds", secondary_y=True)
    return fig


def timeline_figure(report: ReplayReport) -> go.Figure:
    fig = go.Figure()
    rows: list[str] = []
    findings = report.learned.findings
    if findings:
        kinds = sorted({f.kind for f in findings})
        for kind in kinds:
            mine = [f for f in findings if f.kind == kind]
            label = f"orient: {kind}"
            rows.append(label)
            fig.add_trace(
                go.Scatter(
                    x=_x(report, [f.time_s for f in mine]),
                    y=[label] * len(mine),
                    mode="markers",
                    marker={"symbol": "x", "size": 9, "color": "#444444"},
                    name=label,
                    text=[f.target for f in mine],
                    hovertemplate="%{text}<extra>" + html.escape(label) + "</extra>",
                )
            )
    for i, result in enumerate(report.sets):
        color = COLORS[i % len(COLORS)]
        by_kind: dict[str, list[Any]] = {}
        for event in result.events:
            by_kind.setdefault(event.kind, []).append(event)
        for kind, events in sorted(by_kind.items()):
            label = f"{result.policy_set.name}: {kind}"
            rows.append(label)
            fig.add_trace(
                go.Scatter(
                    x=_x(report, [e.time_s for e in events]),
                    y=[label] * len(events),
                    mode="markers",
                    marker={
                        "size": [6 + 2 * math.log2(1 + e.count) for e in events],
                        "color": color,
                        "opacity": 0.7,
                    },
                    name=label,
                    text=[f"{e.target} ({e.count}) by {e.policy}" for e in events],
                    hovertemplate="%{text}<extra>" + html.escape(label) + "</extra>",
                )
            )
    if not rows:
        rows = ["no actions, no findings"]
        fig.add_trace(
            go.Scatter(
                x=_x(report, [report.start_s, report.end_s]),
                y=rows * 2,
                mode="lines",
                line={"color": "#cccccc"},
                name=rows[0],
            )
        )
    fig.update_layout(
        title="Actions (dry-run, per policy set) and orient's findings on the recorded trace",
        xaxis_title=_x_title(report),
        height=max(260, 90 + 36 * len(rows)),
        showlegend=False,
        margin={"l": 260, "r": 20, "t": 60, "b": 40},
    )
    fig.update_yaxes(categoryorder="array", categoryarray=rows[::-1])
    return fig


def _alpha(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return html.escape(str(value))


def _range(interval: Any, digits: int) -> str:
    if not interval or interval[0] is None:
        return ""
    return f' <span class="iv">[{_fmt(interval[0], digits)}, {_fmt(interval[1], digits)}]</span>'


def kpi_table(report: ReplayReport) -> str:
    head = (
        "<tr><th>run</th><th>energy (kWh)</th><th>throughput vs recorded</th>"
        "<th>seconds above budget</th><th>actions (targets, by kind)</th><th>drains</th></tr>"
    )
    base = report.baseline
    body = [
        "<tr class='base'><td>as recorded</td>"
        f"<td>{_fmt(base['energy_kwh'])}</td><td>1.000</td>"
        f"<td>{_fmt(base['budget_violation_s'], 0)}</td>"
        f"<td>{_actions(base['actions'])} <span class='iv'>(cap changes seen)</span></td>"
        f"<td>{base['drains']}</td></tr>"
    ]
    for result in report.sets:
        body.append(_row(result))
    return f"<table class='kpi'>{head}{''.join(body)}</table>"


def _row(result: SetResult) -> str:
    k = result.kpis
    iv = k["interval"]
    return (
        f"<tr><td>{html.escape(result.policy_set.name)}</td>"
        f"<td>{_fmt(k['energy_kwh'])}{_range(iv['energy_kwh'], 3)}</td>"
        f"<td>{_fmt(k['throughput_ratio'], 4)}{_range(iv['throughput_ratio'], 4)}</td>"
        f"<td>{_fmt(k['budget_violation_s'], 0)}{_range(iv['budget_violation_s'], 0)}</td>"
        f"<td>{_actions(k['actions'])}</td><td>{k['drains']}</td></tr>"
    )


def _actions(actions: dict[str, int]) -> str:
    parts = [f"{html.escape(kind)} {n}" for kind, n in actions.items() if n]
    return ", ".join(parts) or "none"


STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 24px;
       color: #222; max-width: 1400px; }
h1 { font-size: 22px; margin-bottom: 4px; }
.meta { color: #555; margin-bottom: 16px; }
table.kpi { border-collapse: collapse; margin: 12px 0 20px 0; }
table.kpi th, table.kpi td { border: 1px solid #ccc; padding: 6px 10px; text-align: left; }
table.kpi th { background: #f3f3f3; }
tr.base td { background: #fafafa; }
.iv { color: #777; font-size: 90%; }
.plot { margin: 18px 0; border: 1px solid #eee; }
ul.notes li, ul.assume li { margin: 3px 0; }
"""


def render_html(report: ReplayReport) -> str:
    figures = [
        ("power", power_figure(report)),
        ("caps", caps_figure(report)),
        ("timeline", timeline_figure(report)),
    ]
    divs = [
        "<div class='plot'>"
        + fig.to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=f"plot-{name}",
            config=PLOT_CONFIG,
        )
        + "</div>"
        for name, fig in figures
    ]
    span_h = (report.end_s - report.start_s + report.step_s) / 3600.0
    if report.time_base == "unix":
        start = datetime.fromtimestamp(report.start_s, UTC).isoformat(timespec="seconds")
        when = f"from {start}, "
    else:
        when = "twin time, "
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) or "<li>none</li>"
    assumptions = "".join(f"<li>{html.escape(a)}</li>" for a in ASSUMPTIONS)
    errors = [e for r in report.sets for e in r.errors]
    error_html = (
        "<h2>Cycle errors</h2><ul>"
        + "".join(f"<li>{html.escape(e)}</li>" for e in errors[:20])
        + "</ul>"
        if errors
        else ""
    )
    data = json.dumps(report.to_json(), default=str)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>ooda replay: {html.escape(Path(report.trace).name)}</title>
<style>{STYLE}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<h1>ooda replay: {html.escape(Path(report.trace).name)}</h1>
<div class="meta">{report.steps} steps of {report.step_s:g} s ({when}{span_h:.1f} h), up to
{report.gpus} GPUs; a cycle every {report.interval_s:g} s, dry-run; replayed in
{report.wall_s:.1f} s ({report.sim_speed():,.0f} simulated seconds per second).</div>
<h2>KPIs (90% intervals in brackets)</h2>
{kpi_table(report)}
<h2>Notes</h2><ul class="notes">{notes}</ul>
{"".join(divs)}
{error_html}
<h2>What the estimate assumes</h2><ul class="assume">{assumptions}</ul>
<script type="application/json" id="replay-data">{html.escape(data, quote=False)}</script>
</body></html>
"""


def write_report(report: ReplayReport, path: Path) -> int:
    """Write the report; returns its size in bytes."""
    text = render_html(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return len(text.encode("utf-8"))

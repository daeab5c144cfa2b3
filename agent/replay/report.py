"""The replay report: one self-contained HTML file, readable offline.

It opens with the verdict (which policy set wins on energy, throughput and the budget, by how
much against the recording and the runner-up, and how often it wins across the model's
parameter draws), the budget, and why a trace is uneventful when it is; then the KPI table with
deltas, and one figure whose rows share their time axis (zooming one zooms all): fleet power
against the budget, the spread of caps in force, the GPUs their caps hold, and the actions and
orient's findings. Long traces are drawn in buckets (at most MAX_POINTS a line, the band keeping
each bucket's extremes), so a day stays readable.

The plotting library is plotly.js's basic partial bundle (scatter, bar, pie: all this report
draws), vendored in agent/replay/assets at the version the installed plotly package was built
for (`make vendor-plotly`): about 1.2 MB inlined instead of the full 4.8 MB bundle.
"""

from __future__ import annotations

import html
import json
import math
import re
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from agent.replay.engine import ASSUMPTIONS, ReplayReport, SetResult

FloatArray = npt.NDArray[np.float64]

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")
RECORDED = "#555555"
PLOT_CONFIG = {"displaylogo": False, "responsive": True}
MAX_POINTS = 720  # per line: a day at 15 s is drawn in 2-minute buckets
BUNDLE = "plotly-basic.min.js"
RECORDING = "as recorded"
CONFIDENT = 0.9  # share of parameter draws a winner must win to be called confident
LIKELY = 0.6


# -- the plotting bundle --------------------------------------------------------------------------


def _version(js: str) -> str | None:
    match = re.search(r"plotly\.js(?: \([^)]*\))? v(\d+\.\d+\.\d+)", js[:400])
    return match.group(1) if match else None


def plotly_js_version() -> str:
    """The plotly.js version the installed plotly package was built for (its full bundle's)."""
    version = _version(get_plotlyjs())
    if version is None:
        raise RuntimeError("the plotly package's bundle names no plotly.js version")
    return version


@cache
def plotly_js() -> str:
    """The vendored basic bundle where it is the plotly package's own version; else the full
    bundle (a plotly upgrade without `make vendor-plotly` still writes a report that renders)."""
    vendored = resources.files("agent.replay").joinpath("assets", BUNDLE).read_text("utf-8")
    if _version(vendored) == plotly_js_version():
        return vendored
    return str(get_plotlyjs())


# -- the verdict ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Criterion:
    key: str  # the KPI
    label: str
    lower_is_better: bool
    unit: str
    digits: int


CRITERIA = (
    Criterion("energy_kwh", "energy", True, " kWh", 1),
    Criterion("throughput_ratio", "throughput", False, "", 3),
    Criterion("budget_violation_s", "budget", True, " s", 0),
)


@dataclass(frozen=True)
class Judgement:
    """One criterion's winner and how it was judged (a sentence of the verdict)."""

    criterion: Criterion
    winner: str
    text: str


def budget_summary(report: ReplayReport) -> str | None:
    """The budget in force over the trace, in words (None: there was none)."""
    tl = report.sets[0].timeline
    budget = np.asarray(tl.budget_w, dtype=np.float64)
    known = np.isfinite(budget)
    if not known.any():
        return None
    levels = np.unique(budget[known])
    if levels.size == 1 and known.all():
        return f"{levels[0]:,.0f} W"
    parts = []
    start = 0
    for j in range(1, budget.size + 1):
        if j == budget.size or not _same(budget[j], budget[start]):
            level = "none" if not known[start] else f"{budget[start]:,.0f} W"
            parts.append(f"{level} from {_when(report, tl.time_s[start])}")
            start = j
    return ", ".join(parts[:6]) + (" ..." if len(parts) > 6 else "")


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _when(report: ReplayReport, t: float) -> str:
    if report.time_base == "unix":
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")
    minutes = round((t - report.start_s) / 60.0)
    return f"{minutes // 60}h{minutes % 60:02d}"


def judge(report: ReplayReport) -> list[Judgement]:
    """Per criterion: the best set, by how much against the recording and the runner-up, and
    in how many parameter draws it wins (the draws are shared by every set: paired)."""
    has_budget = budget_summary(report) is not None
    out = []
    for c in CRITERIA:
        if c.key == "budget_violation_s" and not has_budget:
            out.append(Judgement(c, "", "no budget, so none to hold: not compared"))
            continue
        ranked = _ranked(report.sets, c)
        if not ranked:
            out.append(Judgement(c, "", f"{c.label}: no estimate (see the notes)"))
            continue
        out.append(_judged(report, c, ranked))
    return out


def _ranked(sets: list[SetResult], c: Criterion) -> list[SetResult]:
    valued = [s for s in sets if s.kpis.get(c.key) is not None]
    return sorted(valued, key=lambda s: s.kpis[c.key] * (1 if c.lower_is_better else -1))


def _judged(report: ReplayReport, c: Criterion, ranked: list[SetResult]) -> Judgement:
    best = ranked[0]
    value = float(best.kpis[c.key])
    recorded = float(report.baseline.get(c.key) or 0.0)
    lo, hi = best.kpis["interval"].get(c.key) or (None, None)
    iv = f" [{lo:,.{c.digits}f}, {hi:,.{c.digits}f}]" if lo is not None else ""
    level = [s for s in ranked if _delta(float(s.kpis[c.key]), value, c) == "level with"]
    names = " and ".join(f"<b>{html.escape(s.policy_set.name)}</b>" for s in level)
    said = f"{_num(value, c)}{iv}, {_delta(value, recorded, c)} the recording ({_num(recorded, c)})"
    mine = best.draws.get(c.key, np.zeros(0))
    if len(level) > 1:
        return Judgement(c, "", f"{names} tie: {said}")
    if len(ranked) == 1 and _delta(value, recorded, c) == "level with":
        return Judgement(c, "", f"{names}: {said}")  # no change to win by
    text = f"{names}: {said}"
    if len(ranked) > 1:
        other = ranked[1]
        theirs = other.draws.get(c.key, np.zeros(0))
        gap = _delta(value, float(other.kpis[c.key]), c)
        text += f"; {gap} {html.escape(other.policy_set.name)}, {_confidence(mine, theirs, c)}"
    else:
        text += f", {_confidence(mine, np.full(mine.shape, recorded), c)}"
    return Judgement(c, best.policy_set.name, text)


def _num(value: float, c: Criterion) -> str:
    return f"{value:,.{c.digits}f}{c.unit}"


def _delta(value: float, other: float, c: Criterion) -> str:
    diff = value - other
    if abs(diff) < 0.5 * 10.0**-c.digits:
        return "level with"
    word = "below" if diff < 0 else "above"
    pct = f" ({abs(diff) / abs(other):.1%})" if other and c.key != "budget_violation_s" else ""
    return f"{abs(diff):,.{c.digits}f}{c.unit}{pct} {word}"


def _confidence(mine: FloatArray, theirs: FloatArray, c: Criterion) -> str:
    """How often (over the parameter draws) the winner beats the other: its confidence."""
    if mine.size == 0 or mine.shape != theirs.shape:
        return "with no parameter draws to judge by"
    better = mine < theirs if c.lower_is_better else mine > theirs
    share = float(better.mean())
    said = f"better in {int(better.sum())} of {mine.size} parameter draws"
    if share >= CONFIDENT:
        return f"{said} (confident)"
    if share >= LIKELY:
        return f"{said} (likely)"
    return f"{said}: a tie within the model's uncertainty"


def headline(report: ReplayReport, judged: list[Judgement]) -> str:
    """The verdict's first sentence: the set that wins the most criteria, and its deltas."""
    wins: dict[str, list[str]] = {}
    for j in judged:
        if j.winner:
            wins.setdefault(j.winner, []).append(j.criterion.label)
    if not wins:
        same = all(
            _delta(s.kpis[c.key], report.baseline[c.key], c) == "level with"
            for s in report.sets
            for c in CRITERIA[:2]
            if s.kpis.get(c.key) is not None
        )
        if same:
            return "No set changes the outcome: energy and throughput are the recording's."
        return "The sets tie on every criterion (see each below)."
    order = [s.policy_set.name for s in report.sets]
    name = max(wins, key=lambda n: (len(wins[n]), -order.index(n)))
    best = next(s for s in report.sets if s.policy_set.name == name)
    k, base = best.kpis, report.baseline
    parts = [f"energy {_delta(k['energy_kwh'], base['energy_kwh'], CRITERIA[0])} the recording"]
    if k.get("throughput_ratio") is not None:
        parts.append(f"throughput {_delta(k['throughput_ratio'], 1.0, CRITERIA[1])} it")
    budget = budget_summary(report)
    if budget is not None:
        parts.append(
            f"{k['budget_violation_s']:,.0f} s above the budget "
            f"(recorded {base['budget_violation_s']:,.0f} s)"
        )
    won = " and ".join(wins[name])
    return f"<b>{html.escape(name)}</b> wins on {won}: {', '.join(parts)}."


def uneventful(report: ReplayReport) -> list[str]:
    """Why the plots are flat, when they are."""
    why: list[str] = []
    budget = budget_summary(report)
    acted = any(any(s.kpis["actions"].values()) for s in report.sets)
    if budget is None:
        why.append(
            "The trace holds no budget and none was given (`--budget-w`, or `cluster.budget_w` "
            "in the configuration): power_budget had nothing to hold, so the fleet's power "
            "stays as recorded. `ooda sim record` records a budget that binds unless told "
            "`--no-budget`."
        )
    else:
        tl = report.sets[0].timeline
        fleet = np.asarray(tl.fleet_obs_w)
        limit = np.asarray(tl.budget_w)
        ok = np.isfinite(limit)
        peak = float(np.max(fleet[ok] / limit[ok])) if ok.any() else math.nan
        if peak < 1.0:
            why.append(
                f"The recorded fleet never reached its budget (at most {peak:.0%} of it): "
                "there was nothing to hold."
            )
    if not acted:
        why.append("No set changed a cap or a node: every line lies on the recording.")
    elif all(_nothing_estimated(s) for s in report.sets):
        why.append(
            "The sets' caps never held a busy GPU (idle GPUs' caps change no draw): every "
            "line lies on the recording."
        )
    return why


def _nothing_estimated(result: SetResult) -> bool:
    return any("nothing is estimated" in note for note in result.kpis.get("notes", []))


# -- the figure -------------------------------------------------------------------------------


def _x(report: ReplayReport, times: list[float] | FloatArray) -> list[Any]:
    """Unix time as dates; twin time as hours from the start."""
    values = np.asarray(times, dtype=np.float64)
    if report.time_base == "unix":
        return [datetime.fromtimestamp(float(t), UTC) for t in values]
    return ((values - report.start_s) / 3600.0).tolist()  # type: ignore[no-any-return]


def _x_title(report: ReplayReport) -> str:
    return "time (UTC)" if report.time_base == "unix" else "twin time (h)"


def _bucket(values: Any, size: int, how: str = "mean") -> FloatArray:
    """Values in buckets of `size` steps (NaN ignored): their mean, min or max."""
    arr = np.asarray(values, dtype=np.float64)
    if size <= 1:
        return arr
    pad = (-arr.size) % size
    grid = np.concatenate([arr, np.full(pad, np.nan)]).reshape(-1, size)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a bucket all NaN: NaN, as it should
        if how == "min":
            reduced = np.nanmin(grid, axis=1)
        elif how == "max":
            reduced = np.nanmax(grid, axis=1)
        else:
            reduced = np.nanmean(grid, axis=1)
    return np.asarray(reduced, dtype=np.float64)


def _none(values: FloatArray) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values]


def _alpha(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _band(
    fig: go.Figure, x: list[Any], lo: FloatArray, hi: FloatArray, color: str, group: str, row: int
) -> None:
    ok = np.isfinite(lo) & np.isfinite(hi)
    if not ok.any():
        return
    xs = [v for v, keep in zip(x, ok.tolist(), strict=True) if keep]
    fig.add_trace(
        go.Scatter(
            x=xs + xs[::-1],
            y=np.concatenate([hi[ok], lo[ok][::-1]]).tolist(),
            fill="toself",
            fillcolor=_alpha(color, 0.18),
            line={"width": 0},
            hoverinfo="skip",
            legendgroup=group,
            showlegend=False,
            name=f"{group}: band",
        ),
        row=row,
        col=1,
    )


class _Rows:
    """The figure's rows, top to bottom: one unit per y axis."""

    POWER, CAPS, HELD, EVENTS = 1, 2, 3, 4
    TITLES = (
        "fleet power against the budget (W, GPUs + node overhead; bands: 90% intervals)",
        "caps in force (W): median, and the band from 10% to 90% of GPUs",
        "busy GPUs their cap holds (count)",
        "actions (per policy set, dry-run) and orient's findings on the recorded trace",
    )


def time_figure(report: ReplayReport) -> go.Figure:
    """Every time series of the report in one figure, its rows sharing the time axis."""
    events = _event_rows(report)
    heights = [320.0, 220.0, 150.0, max(120.0, 26.0 * len(events))]
    fig = make_subplots(
        rows=4,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        row_heights=[h / sum(heights) for h in heights],
        subplot_titles=_Rows.TITLES,
    )
    first = report.sets[0].timeline
    size = max(1, math.ceil(len(first.time_s) / MAX_POINTS))
    x = _x(report, _bucket(first.time_s, size))
    _recorded_lines(fig, report, x, size)
    for i, result in enumerate(report.sets):
        _set_lines(fig, report, result, COLORS[i % len(COLORS)], size)
    for trace in events.values():
        fig.add_trace(trace, row=_Rows.EVENTS, col=1)
    height = int(sum(heights) + 260)
    above_title = 1.0 + 30.0 / (height - 180)  # the legend over the first row's title
    fig.update_layout(
        height=height,
        legend={"orientation": "h", "y": above_title, "yanchor": "bottom", "x": 0.0},
        margin={"l": 80, "r": 30, "t": 130, "b": 50},
        hovermode="x",
    )
    fig.update_xaxes(title_text=_x_title(report), row=_Rows.EVENTS, col=1)
    fig.update_xaxes(showticklabels=True)
    fig.update_yaxes(title_text="W", row=_Rows.POWER, col=1)
    fig.update_yaxes(title_text="W", row=_Rows.CAPS, col=1)
    fig.update_yaxes(title_text="GPUs", rangemode="tozero", row=_Rows.HELD, col=1)
    names = list(events)
    fig.update_yaxes(
        categoryorder="array", categoryarray=names[::-1], automargin=True, row=_Rows.EVENTS, col=1
    )
    return fig


def _recorded_lines(fig: go.Figure, report: ReplayReport, x: list[Any], size: int) -> None:
    tl = report.sets[0].timeline
    budget = _bucket(tl.budget_w, size, "min")
    if np.isfinite(budget).any():
        fig.add_trace(
            go.Scatter(
                x=x,
                y=_none(budget),
                name="budget",
                line={"color": "black", "dash": "dash", "width": 2},
                line_shape="hv",
            ),
            row=_Rows.POWER,
            col=1,
        )
    line = {"color": RECORDED, "width": 1.5}
    group = RECORDING
    fig.add_trace(
        go.Scatter(x=x, y=_none(_bucket(tl.fleet_obs_w, size)), name=group, line=line,
                   legendgroup=group),
        row=_Rows.POWER, col=1,
    )  # fmt: skip
    q = np.asarray(tl.cap_q_obs_w, dtype=np.float64).reshape(-1, 3)
    _band(fig, x, _bucket(q[:, 0], size, "min"), _bucket(q[:, 2], size, "max"), RECORDED,
          group, _Rows.CAPS)  # fmt: skip
    fig.add_trace(
        go.Scatter(x=x, y=_none(_bucket(q[:, 1], size)), name=f"{group}: median cap",
                   line=line, legendgroup=group, showlegend=False),
        row=_Rows.CAPS, col=1,
    )  # fmt: skip
    fig.add_trace(
        go.Scatter(x=x, y=_none(_bucket(tl.capped_obs, size)), name=f"{group}: held",
                   line=line, legendgroup=group, showlegend=False),
        row=_Rows.HELD, col=1,
    )  # fmt: skip


def _set_lines(
    fig: go.Figure, report: ReplayReport, result: SetResult, color: str, size: int
) -> None:
    tl = result.timeline
    x = _x(report, _bucket(tl.time_s, size))
    group = result.policy_set.name
    line = {"color": color, "width": 1.5}
    _band(fig, x, _bucket(tl.fleet_cf_lo_w, size, "min"), _bucket(tl.fleet_cf_hi_w, size, "max"),
          color, group, _Rows.POWER)  # fmt: skip
    fig.add_trace(
        go.Scatter(x=x, y=_none(_bucket(tl.fleet_cf_w, size)), name=group, line=line,
                   legendgroup=group),
        row=_Rows.POWER, col=1,
    )  # fmt: skip
    q = np.asarray(tl.cap_q_cf_w, dtype=np.float64).reshape(-1, 3)
    _band(fig, x, _bucket(q[:, 0], size, "min"), _bucket(q[:, 2], size, "max"), color, group,
          _Rows.CAPS)  # fmt: skip
    fig.add_trace(
        go.Scatter(x=x, y=_none(_bucket(q[:, 1], size)), name=f"{group}: median cap",
                   line=line, legendgroup=group, showlegend=False),
        row=_Rows.CAPS, col=1,
    )  # fmt: skip
    fig.add_trace(
        go.Scatter(x=x, y=_none(_bucket(tl.capped_cf, size)), name=f"{group}: held",
                   line=line, legendgroup=group, showlegend=False),
        row=_Rows.HELD, col=1,
    )  # fmt: skip


def _event_rows(report: ReplayReport) -> dict[str, go.Scatter]:
    """The timeline's rows (label -> markers): orient's findings, then each set's actions."""
    rows: dict[str, go.Scatter] = {}
    for kind in sorted({f.kind for f in report.learned.findings}):
        mine = [f for f in report.learned.findings if f.kind == kind]
        label = f"orient: {kind}"
        rows[label] = go.Scatter(
            x=_x(report, [f.time_s for f in mine]),
            y=[label] * len(mine),
            mode="markers",
            marker={"symbol": "x", "size": 9, "color": "#444444"},
            name=label,
            text=[f.target for f in mine],
            hovertemplate="%{text}<extra>" + html.escape(label) + "</extra>",
            showlegend=False,
        )
    for i, result in enumerate(report.sets):
        by_kind: dict[str, list[Any]] = {}
        for event in result.events:
            by_kind.setdefault(event.kind, []).append(event)
        for kind, events in sorted(by_kind.items()):
            label = f"{result.policy_set.name}: {kind}"
            rows[label] = go.Scatter(
                x=_x(report, [e.time_s for e in events]),
                y=[label] * len(events),
                mode="markers",
                marker={
                    "size": [6 + 2 * math.log2(1 + e.count) for e in events],
                    "color": COLORS[i % len(COLORS)],
                    "opacity": 0.7,
                },
                name=label,
                legendgroup=result.policy_set.name,
                showlegend=False,
                text=[f"{e.target} ({e.count}) by {e.policy}" for e in events],
                hovertemplate="%{text}<extra>" + html.escape(label) + "</extra>",
            )
    if not rows:
        label = "no actions, no findings"
        rows[label] = go.Scatter(
            x=_x(report, [report.start_s, report.end_s]),
            y=[label, label],
            mode="lines",
            line={"color": "#cccccc"},
            name=label,
            showlegend=False,
        )
    return rows


# -- the page ---------------------------------------------------------------------------------


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


def _change(value: Any, base: Any, digits: int, unit: str = "") -> str:
    if value is None or base is None:
        return ""
    diff = float(value) - float(base)
    pct = f", {diff / float(base):+.1%}" if base and unit != " s" else ""
    return f' <span class="delta">({diff:+,.{digits}f}{unit}{pct})</span>'


TOKENS_UNKNOWN = (
    "unknown: no job in the trace reports application tokens (an inference server's own "
    "metrics, joined by ooda's [throughput] sources: docs/throughput.md)"
)


def _tokens_figure(kpis: dict[str, Any]) -> str:
    value = kpis.get("tokens_per_joule")
    if value is None:
        return "unknown"
    return (
        f"{value:.3f} tokens/J ({kpis['tokens_per_s']:,.0f} tokens/s, "
        f"{kpis['tokens_energy_kwh']:,.3f} kWh on the serving GPUs)"
    )


def tokens_summary(report: ReplayReport) -> str:
    """Tokens per joule of the jobs that report application tokens (agent.core.efficiency): as
    recorded and under each set's caps, or plainly unknown where none do."""
    if report.baseline.get("tokens_per_joule") is None:
        return f"tokens per joule: {TOKENS_UNKNOWN}"
    runs = [f"{RECORDING} {_tokens_figure(report.baseline)}"]
    runs += [f"{s.policy_set.name} {_tokens_figure(s.kpis)}" for s in report.sets]
    return "tokens per joule: " + "; ".join(runs)


def kpi_table(report: ReplayReport) -> str:
    head = (
        "<tr><th>run</th><th>energy (kWh)</th><th>throughput vs recorded</th>"
        "<th>seconds above budget</th><th>actions (targets, by kind)</th><th>drains</th>"
        "<th>tokens per joule</th></tr>"
    )
    base = report.baseline
    body = [
        f"<tr class='base'><td>{RECORDING}</td>"
        f"<td>{_fmt(base['energy_kwh'])}</td><td>1.000</td>"
        f"<td>{_fmt(base['budget_violation_s'], 0)}</td>"
        f"<td>{_actions(base['actions'])} <span class='iv'>(cap changes seen)</span></td>"
        f"<td>{base['drains']}</td><td>{_tokens_cell(base, None)}</td></tr>"
    ]
    body.extend(_row(result, base) for result in report.sets)
    return f"<table class='kpi'>{head}{''.join(body)}</table>"


def _row(result: SetResult, base: dict[str, Any]) -> str:
    k = result.kpis
    iv = k["interval"]
    return (
        f"<tr><td>{html.escape(result.policy_set.name)}</td>"
        f"<td>{_fmt(k['energy_kwh'])}{_change(k['energy_kwh'], base['energy_kwh'], 1, ' kWh')}"
        f"{_range(iv['energy_kwh'], 3)}</td>"
        f"<td>{_fmt(k['throughput_ratio'], 4)}{_change(k['throughput_ratio'], 1.0, 3)}"
        f"{_range(iv['throughput_ratio'], 4)}</td>"
        f"<td>{_fmt(k['budget_violation_s'], 0)}"
        f"{_change(k['budget_violation_s'], base['budget_violation_s'], 0, ' s')}"
        f"{_range(iv['budget_violation_s'], 0)}</td>"
        f"<td>{_actions(k['actions'])}</td><td>{k['drains']}</td>"
        f"<td>{_tokens_cell(k, base)}</td></tr>"
    )


def _tokens_cell(kpis: dict[str, Any], base: dict[str, Any] | None) -> str:
    """Tokens per joule (its change against the recording for a set); 'unknown', never 0."""
    value = kpis.get("tokens_per_joule")
    if value is None:
        return "unknown"
    change = "" if base is None else _change(value, base.get("tokens_per_joule"), 3)
    return f"{_fmt(value, 3)}{change}"


def _actions(actions: dict[str, int]) -> str:
    parts = [f"{html.escape(kind)} {n}" for kind, n in actions.items() if n]
    return ", ".join(parts) or "none"


def _code(text: str) -> str:
    """Escaped, with `quoted` spans as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def verdict_html(report: ReplayReport) -> str:
    judged = judge(report)
    budget = budget_summary(report)
    lines = "".join(f"<li><b>{j.criterion.label.capitalize()}</b>: {j.text}.</li>" for j in judged)
    said_budget = (
        f"Budget: {html.escape(budget)} (GPUs plus node overhead)."
        if budget is not None
        else "Budget: none."
    )
    quiet = "".join(f"<p class='quiet'>{_code(w)}</p>" for w in uneventful(report))
    return (
        f"<section id='verdict'><h2>Verdict</h2><p class='headline'>{headline(report, judged)}"
        f"</p><p class='budget'>{said_budget}</p><ul class='judged'>{lines}</ul>{quiet}"
        "<p class='how'>Confidence: in how many of the model's parameter draws the winner beats "
        "the runner-up (or the recording); the draws are shared by every set.</p></section>"
    )


STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 24px;
       color: #222; max-width: 1400px; }
h1 { font-size: 22px; margin-bottom: 4px; }
.meta { color: #555; margin-bottom: 12px; }
#verdict { border-left: 4px solid #1f77b4; background: #f5f9fd; padding: 8px 16px; }
#verdict h2 { margin: 6px 0; font-size: 18px; }
.headline { font-size: 17px; margin: 6px 0; }
.quiet { background: #fff8e1; padding: 6px 10px; border: 1px solid #f0d98c; }
.how { color: #666; font-size: 90%; }
table.kpi { border-collapse: collapse; margin: 12px 0 20px 0; }
table.kpi th, table.kpi td { border: 1px solid #ccc; padding: 6px 10px; text-align: left; }
table.kpi th { background: #f3f3f3; }
tr.base td { background: #fafafa; }
.iv, .delta { color: #777; font-size: 90%; }
.plot { margin: 18px 0; border: 1px solid #eee; }
ul.notes li, ul.assume li { margin: 3px 0; }
"""


def render_html(report: ReplayReport) -> str:
    plot = time_figure(report).to_html(
        full_html=False, include_plotlyjs=False, div_id="plot-time", config=PLOT_CONFIG
    )
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
    name = html.escape(Path(report.trace).name)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>ooda replay: {name}</title>
<style>{STYLE}</style>
<script type="text/javascript">{plotly_js()}</script>
</head><body>
<h1>ooda replay: {name}</h1>
{verdict_html(report)}
<div class="meta">{report.steps} steps of {report.step_s:g} s ({when}{span_h:.1f} h), up to
{report.gpus} GPUs; a cycle every {report.interval_s:g} s, dry-run; replayed in
{report.wall_s:.1f} s ({report.sim_speed():,.0f} simulated seconds per second).</div>
<h2>KPIs (change against the recording; 90% intervals in brackets)</h2>
{kpi_table(report)}
<p class="tokens">{html.escape(tokens_summary(report))}</p>
<h2>Notes</h2><ul class="notes">{notes}</ul>
<div class="plot">{plot}</div>
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

"""`ooda report energy`: the ledger over a period, by account, user, partition or job.

What it says: the totals (energy of the GPUs and their share of node overhead, GPU-hours, cost,
CO2, what was metered and how), one row per group (the largest first, with each group's share),
energy, cost and CO2 per day per group (the top groups, the rest as "other"), and the top jobs.
Idle GPUs are their own group ("(idle)"; by partition, "<partition> (idle)"). Rendered as JSON
(one object) or as one self-contained HTML file (plotly.js inlined: no network; the caller gives
the bundle, the replay report's small one), aggregated in SQL so a month of a 100,000-GPU cluster
reads in seconds.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from agent.meter.ledger import J_PER_KWH, Ledger

DAY_S = 86_400.0
PLOT_CONFIG = {"displaylogo": False, "responsive": True}
COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
)  # fmt: skip


class GroupBy(StrEnum):
    ACCOUNT = "account"
    USER = "user"
    PARTITION = "partition"
    JOB = "job"


# The group of each usage row (u: usage, j: jobs); idle GPUs are their own group.
_GROUP_SQL = {
    GroupBy.ACCOUNT: "CASE WHEN u.job = '' THEN '(idle)' "
    "ELSE coalesce(nullif(j.account, ''), '(unknown)') END",
    GroupBy.USER: "CASE WHEN u.job = '' THEN '(idle)' "
    "ELSE coalesce(nullif(j.user, ''), '(unknown)') END",
    GroupBy.PARTITION: "CASE WHEN u.job = '' "
    "THEN coalesce(nullif(u.partition, ''), '(none)') || ' (idle)' "
    "ELSE coalesce(nullif(j.partition, ''), nullif(u.partition, ''), '(unknown)') END",
    GroupBy.JOB: "CASE WHEN u.job = '' THEN '(idle)' ELSE u.job END",
}
_SUMS = (
    "sum(u.gpu_j), sum(u.overhead_j), sum(u.counter_j), sum(u.power_j), sum(u.gpu_s), "
    "sum(u.cost), sum(u.unpriced_j), sum(u.co2_g), sum(u.uncarbon_j)"
)


def _method(counter_j: float, power_j: float) -> str:
    """How a group's GPU energy was metered."""
    if counter_j <= 0 and power_j <= 0:
        return "none"
    if power_j <= 0:
        return "counter"
    if counter_j <= 0:
        return "power"
    return f"mixed ({100 * counter_j / (counter_j + power_j):.0f}% counter)"


@dataclass
class Usage:
    """Energy (kWh), GPU-hours, cost and CO2 (kg) of one group, a day, or everything."""

    gpu_kwh: float = 0.0
    overhead_kwh: float = 0.0
    total_kwh: float = 0.0
    gpu_hours: float = 0.0
    cost: float = 0.0
    unpriced_kwh: float = 0.0
    co2_kg: float = 0.0
    uncarbon_kwh: float = 0.0
    method: str = "none"

    @staticmethod
    def of(row: tuple[Any, ...]) -> Usage:
        gpu_j, overhead_j, counter_j, power_j, gpu_s, cost, unpriced_j, co2_g, uncarbon_j = (
            float(v or 0.0) for v in row
        )
        return Usage(
            gpu_kwh=gpu_j / J_PER_KWH,
            overhead_kwh=overhead_j / J_PER_KWH,
            total_kwh=(gpu_j + overhead_j) / J_PER_KWH,
            gpu_hours=gpu_s / 3600.0,
            cost=cost,
            unpriced_kwh=unpriced_j / J_PER_KWH,
            co2_kg=co2_g / 1000.0,
            uncarbon_kwh=uncarbon_j / J_PER_KWH,
            method=_method(counter_j, power_j),
        )


@dataclass
class Group:
    name: str
    usage: Usage
    share_pct: float
    jobs: int


@dataclass
class TopJob:
    job: str
    user: str
    account: str
    partition: str
    qos: str
    usage: Usage
    first_s: float
    last_s: float


@dataclass
class EnergyReport:
    by: str
    since_s: float
    until_s: float
    timeline: str
    currency: str
    total: Usage
    groups: list[Group]
    days: list[float]  # the start of each day
    daily: dict[str, dict[str, list[float]]]  # group -> {total_kwh, cost, co2_kg} per day
    top_jobs: list[TopJob]
    metered_gpu_hours: float
    unmetered_gpu_hours: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["since"] = _when(self.since_s, self.timeline)
        out["until"] = _when(self.until_s, self.timeline)
        out["days"] = [_when(d, self.timeline) for d in self.days]
        return out


def _when(t_s: float, timeline: str) -> str:
    if timeline == "unix":
        return datetime.fromtimestamp(t_s, UTC).isoformat(timespec="seconds")
    return f"{t_s / 3600.0:.2f} h ({timeline})"


def _window(
    ledger: Ledger, since_s: float, until_s: float
) -> tuple[str, tuple[float, float, float]]:
    """A WHERE clause for usage rows (their bucket overlapping [since, until])."""
    return "u.bucket_s + ? > ? AND u.bucket_s < ?", (ledger.bucket_s, since_s, until_s)


def _groups(ledger: Ledger, by: GroupBy, since_s: float, until_s: float) -> list[Group]:
    where, (b, lo, hi) = _window(ledger, since_s, until_s)
    rows = ledger.db.execute(
        f"SELECT {_GROUP_SQL[by]} AS g, {_SUMS}, count(DISTINCT nullif(u.job, '')) "
        f"FROM usage u LEFT JOIN jobs j ON j.job = u.job WHERE {where} GROUP BY g",
        (b, lo, hi),
    ).fetchall()
    groups = [Group(str(r[0]), Usage.of(r[1:10]), 0.0, int(r[10])) for r in rows]
    total = sum(g.usage.total_kwh for g in groups)
    for g in groups:
        g.share_pct = 100.0 * g.usage.total_kwh / total if total > 0 else 0.0
    return sorted(groups, key=lambda g: (-g.usage.total_kwh, g.name))


def _daily(
    ledger: Ledger, by: GroupBy, since_s: float, until_s: float, named: set[str]
) -> tuple[list[float], dict[str, dict[str, list[float]]]]:
    """Per day (UTC) per group: energy, cost, CO2; groups outside `named` as "other"."""
    where, (b, lo, hi) = _window(ledger, since_s, until_s)
    rows = ledger.db.execute(
        f"SELECT CAST(u.bucket_s / {DAY_S} AS INTEGER) AS d, {_GROUP_SQL[by]} AS g, "
        f"sum(u.gpu_j + u.overhead_j), sum(u.cost), sum(u.co2_g) "
        f"FROM usage u LEFT JOIN jobs j ON j.job = u.job WHERE {where} GROUP BY d, g",
        (b, lo, hi),
    ).fetchall()
    day_index = sorted({int(r[0]) for r in rows})
    position = {d: k for k, d in enumerate(day_index)}
    series: dict[str, dict[str, list[float]]] = {}
    for day, group, joules, cost, co2 in rows:
        name = str(group) if str(group) in named else "other"
        cols = series.setdefault(
            name, {k: [0.0] * len(day_index) for k in ("total_kwh", "cost", "co2_kg")}
        )
        k = position[int(day)]
        cols["total_kwh"][k] += float(joules or 0.0) / J_PER_KWH
        cols["cost"][k] += float(cost or 0.0)
        cols["co2_kg"][k] += float(co2 or 0.0) / 1000.0
    return [d * DAY_S for d in day_index], series


def _top_jobs(ledger: Ledger, since_s: float, until_s: float, top: int) -> list[TopJob]:
    where, (b, lo, hi) = _window(ledger, since_s, until_s)
    rows = ledger.db.execute(
        f"SELECT u.job, coalesce(j.user, ''), coalesce(j.account, ''), "
        f"coalesce(nullif(j.partition, ''), max(u.partition), ''), coalesce(j.qos, ''), "
        f"{_SUMS}, min(u.first_s), max(u.last_s) FROM usage u LEFT JOIN jobs j ON j.job = u.job "
        f"WHERE u.job != '' AND {where} GROUP BY u.job "
        f"ORDER BY sum(u.gpu_j + u.overhead_j) DESC, u.job LIMIT ?",
        (b, lo, hi, top),
    ).fetchall()
    return [
        TopJob(
            job=str(r[0]),
            user=str(r[1]),
            account=str(r[2]),
            partition=str(r[3]),
            qos=str(r[4]),
            usage=Usage.of(r[5:14]),
            first_s=float(r[14]),
            last_s=float(r[15]),
        )
        for r in rows
    ]


def _coverage(ledger: Ledger, since_s: float, until_s: float) -> tuple[float, float]:
    """GPU-hours metered and seen but not metered, in spans inside the period (pro rata)."""
    metered = unmetered = 0.0
    for t0, t1, _origin, _n, metered_s, unmetered_s in ledger.spans():
        overlap = min(t1, until_s) - max(t0, since_s)
        if overlap <= 0 or t1 <= t0:
            continue
        part = overlap / (t1 - t0)
        metered += metered_s * part / 3600.0
        unmetered += unmetered_s * part / 3600.0
    return metered, unmetered


def latest_s(ledger: Ledger) -> float | None:
    row = ledger.db.execute("SELECT max(last_s) FROM usage").fetchone()
    return None if row is None or row[0] is None else float(row[0])


def energy_report(
    ledger: Ledger,
    by: GroupBy,
    since_s: float,
    until_s: float,
    *,
    top: int = 10,
    currency: str = "",
) -> EnergyReport:
    where, (b, lo, hi) = _window(ledger, since_s, until_s)
    total_row = ledger.db.execute(f"SELECT {_SUMS} FROM usage u WHERE {where}", (b, lo, hi))
    total = Usage.of(total_row.fetchone())
    groups = _groups(ledger, by, since_s, until_s)
    named = {g.name for g in groups[:top]}
    days, daily = _daily(ledger, by, since_s, until_s, named)
    metered, unmetered = _coverage(ledger, since_s, until_s)
    notes = []
    if total.unpriced_kwh > 0:
        notes.append(f"{total.unpriced_kwh:,.1f} kWh had no known price: the cost leaves it out")
    if total.uncarbon_kwh > 0:
        notes.append(
            f"{total.uncarbon_kwh:,.1f} kWh had no known carbon intensity: CO2 leaves it out"
        )
    if unmetered > 0:
        notes.append(f"{unmetered:,.1f} GPU-hours were seen but could not be metered")
    return EnergyReport(
        by=str(by),
        since_s=since_s,
        until_s=until_s,
        timeline=ledger.timeline,
        currency=currency,
        total=total,
        groups=groups,
        days=days,
        daily=daily,
        top_jobs=_top_jobs(ledger, since_s, until_s, top),
        metered_gpu_hours=metered,
        unmetered_gpu_hours=unmetered,
        notes=notes,
    )


# -- HTML ---------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; }
.plot { margin: 1.5em 0; }
.meta { color: #555; }
"""


def _day_labels(report: EnergyReport) -> list[Any]:
    if report.timeline == "unix":
        return [datetime.fromtimestamp(d, UTC).date().isoformat() for d in report.days]
    return [f"day {int(d // DAY_S) + 1}" for d in report.days]


def daily_figure(report: EnergyReport, key: str, unit: str, title: str) -> go.Figure:
    """Stacked bars per day, one trace per group; one unit on the y axis."""
    fig = go.Figure()
    x = _day_labels(report)
    for k, (name, cols) in enumerate(sorted(report.daily.items())):
        fig.add_trace(go.Bar(x=x, y=cols[key], name=name, marker_color=COLORS[k % len(COLORS)]))
    fig.update_layout(
        title=title,
        barmode="stack",
        height=380,
        margin={"l": 60, "r": 20, "t": 50, "b": 40},
        yaxis_title=unit,
        xaxis_title="day (UTC)" if report.timeline == "unix" else "twin day",
    )
    return fig


def groups_figure(report: EnergyReport) -> go.Figure:
    top = report.groups[:20]
    fig = go.Figure(
        go.Bar(
            x=[g.usage.total_kwh for g in top][::-1],
            y=[g.name for g in top][::-1],
            orientation="h",
            marker_color=COLORS[0],
        )
    )
    fig.update_layout(
        title=f"Energy by {report.by} (the largest 20)",
        height=max(300, 28 * len(top) + 120),
        margin={"l": 160, "r": 20, "t": 50, "b": 40},
        xaxis_title="kWh",
    )
    return fig


def _num(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}" if math.isfinite(value) else "n/a"


def _groups_table(report: EnergyReport) -> str:
    cur = html.escape(report.currency or "cost")
    head = (
        f"<tr><th>{html.escape(report.by)}</th><th>total kWh</th><th>GPU kWh</th>"
        f"<th>overhead kWh</th><th>share</th><th>GPU-hours</th><th>{cur}</th>"
        "<th>CO2 kg</th><th>jobs</th><th>metered from</th></tr>"
    )
    rows = [
        f"<tr><td>{html.escape(g.name)}</td><td>{_num(g.usage.total_kwh)}</td>"
        f"<td>{_num(g.usage.gpu_kwh)}</td><td>{_num(g.usage.overhead_kwh)}</td>"
        f"<td>{g.share_pct:.1f}%</td><td>{_num(g.usage.gpu_hours)}</td>"
        f"<td>{_num(g.usage.cost, 2)}</td><td>{_num(g.usage.co2_kg)}</td><td>{g.jobs}</td>"
        f"<td>{html.escape(g.usage.method)}</td></tr>"
        for g in report.groups
    ]
    return f"<table id='groups'>{head}{''.join(rows)}</table>"


def _jobs_table(report: EnergyReport) -> str:
    cur = html.escape(report.currency or "cost")
    head = (
        "<tr><th>job</th><th>user</th><th>account</th><th>partition</th><th>QoS</th>"
        f"<th>total kWh</th><th>GPU-hours</th><th>{cur}</th><th>CO2 kg</th>"
        "<th>metered from</th><th>first seen</th><th>last seen</th></tr>"
    )
    rows = [
        f"<tr><td>{html.escape(j.job)}</td><td>{html.escape(j.user)}</td>"
        f"<td>{html.escape(j.account)}</td><td>{html.escape(j.partition)}</td>"
        f"<td>{html.escape(j.qos)}</td><td>{_num(j.usage.total_kwh, 2)}</td>"
        f"<td>{_num(j.usage.gpu_hours)}</td><td>{_num(j.usage.cost, 2)}</td>"
        f"<td>{_num(j.usage.co2_kg, 2)}</td><td>{html.escape(j.usage.method)}</td>"
        f"<td>{html.escape(_when(j.first_s, report.timeline))}</td>"
        f"<td>{html.escape(_when(j.last_s, report.timeline))}</td></tr>"
        for j in report.top_jobs
    ]
    return f"<table id='top-jobs'>{head}{''.join(rows)}</table>"


def render_html(report: EnergyReport, plotly_js: str) -> str:
    """The report as one HTML file, `plotly_js` (the plotting library's bundle) inlined."""
    cur = report.currency or "cost units"
    figures = [
        ("groups", groups_figure(report)),
        ("energy", daily_figure(report, "total_kwh", "kWh", f"Energy per day by {report.by}")),
        ("cost", daily_figure(report, "cost", cur, f"Cost per day by {report.by}")),
        ("co2", daily_figure(report, "co2_kg", "kg CO2e", f"CO2 per day by {report.by}")),
    ]
    divs = "".join(
        "<div class='plot'>"
        + fig.to_html(
            full_html=False, include_plotlyjs=False, div_id=f"plot-{name}", config=PLOT_CONFIG
        )
        + "</div>"
        for name, fig in figures
    )
    t = report.total
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) or "<li>none</li>"
    data = json.dumps(report.to_json(), default=str)
    title = f"ooda energy report by {html.escape(report.by)}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{title}</title>
<style>{STYLE}</style>
<script type="text/javascript">{plotly_js}</script>
</head><body>
<h1>{title}</h1>
<div class="meta">From {html.escape(_when(report.since_s, report.timeline))} to
{html.escape(_when(report.until_s, report.timeline))}: {_num(t.total_kwh)} kWh
({_num(t.gpu_kwh)} kWh of GPUs, {_num(t.overhead_kwh)} kWh of node overhead),
{_num(t.gpu_hours)} GPU-hours, {_num(t.cost, 2)} {html.escape(cur)}, {_num(t.co2_kg)} kg CO2e;
metered from {html.escape(t.method)}; {_num(report.metered_gpu_hours)} GPU-hours metered,
{_num(report.unmetered_gpu_hours)} not.</div>
<h2>Notes</h2><ul class="notes">{notes}</ul>
<h2>By {html.escape(report.by)}</h2>
{_groups_table(report)}
{divs}
<h2>Top jobs</h2>
{_jobs_table(report)}
<script type="application/json" id="energy-data">{html.escape(data, quote=False)}</script>
</body></html>
"""


def write_html(report: EnergyReport, path: Path, plotly_js: str) -> int:
    text = render_html(report, plotly_js)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return len(text.encode("utf-8"))


def text_table(report: EnergyReport) -> str:
    """The groups as a plain text table, for a terminal."""
    cur = report.currency or "cost"
    lines = [
        f"{report.by:<24} {'kWh':>12} {'share':>7} {'GPU-h':>10} {cur:>10} {'CO2 kg':>10} "
        "metered from"
    ]
    for g in report.groups:
        u = g.usage
        lines.append(
            f"{g.name[:24]:<24} {u.total_kwh:>12,.1f} {g.share_pct:>6.1f}% {u.gpu_hours:>10,.1f} "
            f"{u.cost:>10,.2f} {u.co2_kg:>10,.1f} {u.method}"
        )
    t = report.total
    lines.append(
        f"{'total':<24} {t.total_kwh:>12,.1f} {100.0:>6.1f}% {t.gpu_hours:>10,.1f} "
        f"{t.cost:>10,.2f} {t.co2_kg:>10,.1f} {t.method}"
    )
    return "\n".join(lines)

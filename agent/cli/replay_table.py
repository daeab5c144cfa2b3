"""`ooda replay`'s answer on a terminal: the KPIs of the recording and of each policy set, then
each set's change against the recording and against the other sets, with 90% intervals, in
`rich` tables that fit 100 columns (and 80: a cell wraps before the table overflows)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

from agent.cli._common import WIDTH

if TYPE_CHECKING:
    from agent.replay.deltas import Delta
    from agent.replay.engine import ReplayReport

# (KPI, column heading, digits of a value)
COLUMNS = (
    ("energy_kwh", "energy kWh", 1),
    ("throughput_ratio", "throughput", 3),
    ("budget_violation_s", "s above budget", 0),
)


# A policy's name whole on a line in the table of runs (the longest built-in's, energy_efficiency,
# is 17): a set wraps between its policies, not inside one.
NAME_MIN = 17


def console() -> Console:
    """The terminal's width (COLUMNS where set), at most WIDTH; no colour codes off a terminal."""
    width = min(Console().width, WIDTH)
    return Console(width=width, highlight=False, soft_wrap=False)


def print_replay(result: ReplayReport, out: Console | None = None) -> None:
    from agent.replay.deltas import deltas
    from agent.replay.report import budget_summary, headline, judge, tokens_summary

    out = out or console()
    span_h = (result.end_s - result.start_s + result.step_s) / 3600.0
    out.print(
        f"ooda replay: {result.trace}: {result.steps} steps x up to {result.gpus} GPUs "
        f"({span_h:.1f} h) in {result.wall_s:.1f} s ({result.sim_speed():,.0f}x), dry-run",
        overflow="fold",
    )
    budget = budget_summary(result)
    out.print(f"budget: {budget} (GPUs and node overhead)" if budget else "budget: none")
    out.print(kpi_table(result))
    out.print(tokens_summary(result), overflow="fold")
    out.print(delta_table(deltas(result)))
    verdict = re.sub(r"<[^>]+>", "", headline(result, judge(result)))
    out.print(f"verdict: {verdict}", overflow="fold")
    for note in result.notes:
        out.print(f"note: {note}", overflow="fold")
    for s in result.sets:
        for error in s.errors[:5]:
            out.print(f"{s.policy_set.name}: cycle error: {error}", overflow="fold")


def _table(title: str, first: str, min_width: int | None = None) -> Table:
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False
    )
    table.add_column(first, overflow="fold", min_width=min_width, max_width=28)
    return table


def kpi_table(result: ReplayReport) -> Table:
    """One row per run: the recording, then each set, each estimate with its 90% interval."""
    table = _table(
        "What each run did (throughput relative to the recording; 90% intervals below)",
        "run",
        NAME_MIN,
    )
    for _key, heading, _digits in COLUMNS:
        table.add_column(heading, justify="right", overflow="fold")
    table.add_column("actions (targets)", overflow="fold")
    base = result.baseline
    table.add_row(
        "as recorded",
        *(_value(base.get(key), None, digits) for key, _h, digits in COLUMNS),
        _actions(base["actions"]) + " (seen)",
    )
    for s in result.sets:
        k = s.kpis
        cells = [_value(k.get(key), k["interval"].get(key), digits) for key, _h, digits in COLUMNS]
        drains = f", drains {k['drains']}" if k["drains"] else ""
        table.add_row(_name(s.policy_set.name), *cells, _actions(k["actions"]) + drains)
    return table


def delta_table(found: list[Delta]) -> Table:
    """Each set against the recording and against every other set (paired intervals): a row
    names the set, and under it what it is measured against."""
    table = _table("Changes (90% intervals below each)", "set", NAME_MIN)
    for _key, heading, _digits in COLUMNS:
        table.add_column(heading, justify="right", overflow="fold")
    table.add_column("actions", justify="right")
    for d in found:
        against = "the recording" if d.against == "recording" else _name(d.against)
        cells = [
            _change(d.change.get(key), d.interval.get(key), d.relative.get(key), digits)
            for key, _h, digits in COLUMNS
        ]
        table.add_row(f"{_name(d.policy_set)}\nvs {against}", *cells, f"{d.actions:+,d}")
    return table


def _value(value: Any, interval: Any, digits: int) -> str:
    if value is None:
        return "n/a"
    text = f"{value:,.{digits}f}"
    if _spread(interval, value, digits):
        text += f"\n[{interval[0]:,.{digits}f}, {interval[1]:,.{digits}f}]"
    return text


def _change(value: Any, interval: Any, relative: Any, digits: int) -> str:
    if value is None:
        return "n/a"
    text = f"{value:+,.{digits}f}"
    if relative is not None and digits:  # no share of seconds above budget (often from 0)
        text += f" ({relative:+.1%})"
    if _spread(interval, value, digits):
        text += f"\n[{interval[0]:+,.{digits}f}, {interval[1]:+,.{digits}f}]"
    return text


def _spread(interval: Any, value: float, digits: int) -> bool:
    """Whether an interval says more than its value (one of no width is left out: its set's
    notes say why it has none)."""
    if not interval or interval[0] is None:
        return False
    shown = {f"{x:.{digits}f}" for x in (interval[0], interval[1], value)}
    return len(shown) > 1


def _name(name: str) -> str:
    """A set's name, able to wrap between its policies."""
    return name.replace("+", "+ ")


# Action kinds in a few letters, for a table's narrow column (the JSON and the report say them
# in full).
SHORT_KINDS = {
    "set_power_cap": "cap",
    "release_power_cap": "release",
    "drain_node": "drain",
    "resume_node": "resume",
    "set_node_weight": "weight",
    "set_node_features": "features",
    "requeue_job": "requeue",
}


def _actions(actions: dict[str, int]) -> str:
    parts = [f"{SHORT_KINDS.get(kind, kind)} {n:,}" for kind, n in actions.items() if n]
    return ", ".join(parts) or "none"

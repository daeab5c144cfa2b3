"""`ooda replay`: policies over recorded history, KPIs with their uncertainty, a report."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from agent.cli._common import duration_s, emit_json
from agent.core.errors import BadInputError

if TYPE_CHECKING:
    from agent.replay.engine import ReplayReport


def replay(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            help="TRACE (a trace file; not with --prometheus), then, with --compare, the policy "
            "sets to compare.",
            show_default=False,
            metavar="TRACE SET",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Configuration: policies and their settings, guard, budget, node overhead, "
            "[policy_sets].",
        ),
    ] = None,
    policy: Annotated[
        list[str] | None,
        typer.Option(
            "--policy",
            help="Replay this policy (repeatable; default: the configuration's policies).",
        ),
    ] = None,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="Compare policy sets, given after TRACE: each a '+'-joined list of policy "
            "names or a named set from the configuration's [policy_sets].",
        ),
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object on the last line.")
    ] = False,
    report: Annotated[
        Path | None,
        typer.Option("--report", help="Write a self-contained HTML report (plots, KPI table)."),
    ] = None,
    prometheus: Annotated[
        str | None,
        typer.Option("--prometheus", help="Replay a range straight from this Prometheus."),
    ] = None,
    start: Annotated[
        str | None,
        typer.Option(help="With --prometheus: first time (RFC 3339, Unix s, now or -2h)."),
    ] = None,
    end: Annotated[str, typer.Option(help="With --prometheus: last time.")] = "now",
    step: Annotated[str, typer.Option(help="With --prometheus: time between steps.")] = "15s",
    budget_w: Annotated[
        float | None,
        typer.Option(
            "--budget-w", help="Replay against this budget (W) instead of the recorded one."
        ),
    ] = None,
    draws: Annotated[
        int, typer.Option(min=0, max=1000, help="Parameter draws behind the 90% intervals.")
    ] = 40,
    seed: Annotated[int, typer.Option(help="Seed of the parameter draws.")] = 0,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="A progress bar on stderr (default: when stderr is a terminal).",
        ),
    ] = None,
) -> None:
    """Replay recorded telemetry through policies, dry-run on a virtual clock, and estimate what
    they would have done: energy, throughput, seconds above budget, actions, drains, with 90%
    intervals, against the trace as recorded.

    The outcome under the policies' caps comes from the power curves learned from the trace
    itself (where it shows caps binding) or, where it shows none, from the GPU model's priors
    with wide intervals; the output says which. See docs/replay.md for what is assumed.

    Examples:

      ooda replay day.parquet

      ooda replay day.parquet --policy power_budget --json

      ooda replay day.parquet --compare power_budget power_budget+thermal_guard

      ooda replay day.parquet --config ooda.toml --compare current cautious --report r.html

      ooda replay --prometheus http://prom:9090 --start -24h --end now --config ooda.toml
    """
    from agent.config import default_config, load_config
    from agent.replay.engine import default_policy_set, parse_policy_set, replay_trace

    positional = list(args or [])
    cfg = (
        load_config(config, needs_source=False, check_files=False)
        if config is not None
        else default_config()
    )
    if prometheus is None:
        if not positional:
            raise BadInputError("ooda replay: give a TRACE file, or --prometheus URL --start T")
        trace = Path(positional.pop(0))
        if not trace.is_file():
            raise BadInputError(f"trace {trace}: no such file")
    elif start is None:
        raise BadInputError("--prometheus: needs --start (and --end, default now)")
    if positional and not compare:
        raise BadInputError(
            f"unexpected argument {positional[0]!r} (policy sets go after --compare)"
        )
    if compare and policy:
        raise BadInputError("--policy and --compare: give one or the other")
    if compare and not positional:
        raise BadInputError("--compare: name at least one policy set after TRACE")
    from policies.registry import default_registry

    registry = default_registry()
    if compare:
        sets = [parse_policy_set(spec, cfg, registry) for spec in positional]
    elif policy:
        sets = [parse_policy_set("+".join(policy), cfg, registry)]
    else:
        sets = [default_policy_set(cfg)]
    sets = _unique(sets)
    show = sys.stderr.isatty() if progress is None else progress
    replay_args: dict[str, Any] = {
        "policy_sets": sets,
        "registry": registry,
        "draws": draws,
        "seed": seed,
        "budget_w": budget_w,
    }
    t0 = time.perf_counter()
    if prometheus is None:
        from agent.observe.trace import TraceReader

        reader = TraceReader(trace)
        total = reader.meta.steps * (1 + len(sets))
        with _progress(show, total, f"replaying {trace.name}") as advance:
            result = replay_trace(reader, config=cfg, progress=advance, **replay_args)
    else:
        result = _from_prometheus(prometheus, start or "", end, step, cfg, show, replay_args)
    wall = time.perf_counter() - t0
    if report is not None:
        from agent.replay.report import write_report

        size = write_report(result, report)
        if not json_out:
            typer.echo(f"wrote {report} ({size / 1e6:.1f} MB)")
    out = result.to_json()
    out["wall_s"] = round(wall, 3)
    if report is not None:
        out["report"] = str(report)
    if json_out:
        emit_json(out)
    else:
        _print_table(result)


def _unique(sets: list[Any]) -> list[Any]:
    seen: set[str] = set()
    out = []
    for s in sets:
        if s.name not in seen:
            seen.add(s.name)
            out.append(s)
    return out


def _from_prometheus(
    url: str,
    start: str,
    end: str,
    step: str,
    cfg: Any,
    show: bool,
    replay_args: dict[str, Any],
) -> ReplayReport:
    from agent.cli.trace import parse_time
    from agent.replay.prometheus import prometheus_config, replay_prometheus

    if not url.startswith(("http://", "https://")):
        raise BadInputError(f"--prometheus: not an http(s) URL: {url!r}")
    now = time.time()
    start_s = parse_time(start, "--start", now)
    end_s = parse_time(end, "--end", now)
    step_s = duration_s(step, "--step")
    if step_s < 1 or not step_s.is_integer():
        raise BadInputError(f"--step: must be a whole number of seconds (got {step!r})")
    if end_s - start_s < step_s:
        raise BadInputError(f"--start/--end: the range {start}..{end} is shorter than one step")
    config = prometheus_config(url, cfg)
    steps = int((end_s - start_s) // step_s) + 1
    total = steps * (1 + len(replay_args["policy_sets"]))
    with _progress(show, total + steps, "querying Prometheus, then replaying") as advance:
        done = [0]

        def recorded(frac: float) -> None:
            now_steps = int(frac * steps)
            advance(now_steps - done[0])
            done[0] = now_steps

        return replay_prometheus(
            config,
            start_s=start_s,
            end_s=end_s,
            step_s=step_s,
            record_progress=recorded,
            progress=advance,
            **replay_args,
        )


@contextmanager
def _progress(show: bool, total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr when wanted; otherwise a no-op."""
    if not show:
        yield lambda _n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=total)
        pending = [0]

        def advance(n: int) -> None:
            pending[0] += n
            if pending[0] >= 50:  # redraws are not free: a day is thousands of steps
                bar.advance(task, pending[0])
                pending[0] = 0

        yield advance


def _print_table(result: ReplayReport) -> None:
    def iv(values: Any, digits: int) -> str:
        if not values or values[0] is None:
            return ""
        return f" [{values[0]:.{digits}f}, {values[1]:.{digits}f}]"

    span_h = (result.end_s - result.start_s + result.step_s) / 3600.0
    typer.echo(
        f"ooda replay: {result.trace}: {result.steps} steps x up to {result.gpus} GPUs "
        f"({span_h:.1f} h) in {result.wall_s:.1f} s ({result.sim_speed():,.0f}x), dry-run"
    )
    rows = [
        (
            "as recorded",
            f"{result.baseline['energy_kwh']:.1f}",
            "1.000",
            f"{result.baseline['budget_violation_s']:.0f}",
            _actions(result.baseline["actions"]) + " (seen)",
        )
    ]
    for s in result.sets:
        k = s.kpis
        ratio = k["throughput_ratio"]
        rows.append(
            (
                s.policy_set.name,
                f"{k['energy_kwh']:.1f}{iv(k['interval']['energy_kwh'], 1)}",
                ("n/a" if ratio is None else f"{ratio:.3f}")
                + iv(k["interval"]["throughput_ratio"], 3),
                f"{k['budget_violation_s']:.0f}{iv(k['interval']['budget_violation_s'], 0)}",
                _actions(k["actions"]) + (f", drains {k['drains']}" if k["drains"] else ""),
            )
        )
    head = ("run", "energy kWh [90%]", "throughput vs recorded", "s above budget", "actions")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    for note in result.notes:
        typer.echo(f"note: {note}")
    for s in result.sets:
        for error in s.errors[:5]:
            typer.echo(f"{s.policy_set.name}: cycle error: {error}")


def _actions(actions: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in actions.items() if n) or "none"

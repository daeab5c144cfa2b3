"""`ooda replay`: policies over recorded history, KPIs with their uncertainty, a report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from agent.cli._common import emit_json, progress_bar, show_progress
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
            help="A progress bar on stderr (default: when stdout and stderr are terminals, "
            "never with --json).",
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
    cfg, trace, sets = _inputs(list(args or []), config, policy, compare, prometheus, start)
    replay_args: dict[str, Any] = {
        "policy_sets": sets,
        "draws": draws,
        "seed": seed,
        "budget_w": budget_w,
    }
    show = show_progress(json_out, progress)
    t0 = time.perf_counter()
    if trace is not None:
        from agent.observe.trace import TraceReader
        from agent.replay.engine import replay_trace

        reader = TraceReader(trace)
        total = reader.meta.steps * (1 + len(sets))
        with progress_bar(show, total, f"replaying {trace.name}") as bar:
            result = replay_trace(reader, config=cfg, progress=bar, **replay_args)
    else:
        result = _from_prometheus(prometheus or "", start or "", end, step, cfg, show, replay_args)
    wall = time.perf_counter() - t0
    written = None
    if report is not None:
        from agent.replay.report import write_report

        written = write_report(result, report)
    _said(result, json_out, wall, report, written)


def _inputs(
    positional: list[str],
    config: Path | None,
    policy: list[str] | None,
    compare: bool,
    prometheus: str | None,
    start: str | None,
) -> tuple[Any, Path | None, list[Any]]:
    """The configuration, the trace (None: a Prometheus range) and the policy sets to replay."""
    from agent.config import default_config, load_config
    from agent.replay.engine import default_policy_set, parse_policy_set
    from policies.registry import default_registry

    cfg = (
        load_config(config, needs_source=False, check_files=False)
        if config is not None
        else default_config()
    )
    trace = None
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
    registry = default_registry()
    if compare:
        sets = [parse_policy_set(spec, cfg, registry) for spec in positional]
    elif policy:
        sets = [parse_policy_set("+".join(policy), cfg, registry)]
    else:
        sets = [default_policy_set(cfg)]
    return cfg, trace, _unique(sets)


def _said(
    result: ReplayReport, json_out: bool, wall_s: float, report: Path | None, size: int | None
) -> None:
    """The outcome: one JSON object, or the tables a person reads."""
    from agent.replay.deltas import deltas

    if json_out:
        out = result.to_json()
        out["wall_s"] = round(wall_s, 3)
        out["deltas"] = [d.to_json() for d in deltas(result)]
        if report is not None:
            out["report"] = str(report)
        emit_json(out)
        return
    from agent.cli.replay_table import print_replay

    print_replay(result)
    if report is not None and size is not None:
        typer.echo(f"wrote {report} ({size / 1e6:.1f} MB)")


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
    from agent.cli.trace import prometheus_range
    from agent.replay.prometheus import prometheus_config, replay_prometheus

    start_s, end_s, step_s = prometheus_range(url, start, end, step)
    config = prometheus_config(url, cfg)
    steps = int((end_s - start_s) // step_s) + 1
    total = steps * (1 + len(replay_args["policy_sets"]))
    with progress_bar(show, total + steps, "querying Prometheus, then replaying") as bar:
        return replay_prometheus(
            config,
            start_s=start_s,
            end_s=end_s,
            step_s=step_s,
            record_progress=bar.share(steps),
            progress=bar,
            **replay_args,
        )

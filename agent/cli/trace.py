"""`ooda record` (a trace from Prometheus) and `ooda trace ...` (work with trace files)."""

from __future__ import annotations

import math
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.cli._common import (
    duration_s,
    emit_json,
    plain,
    progress_bar,
    show_progress,
    wrapped,
)
from agent.core.errors import BadInputError

trace_app = typer.Typer(help="Work with trace files (see docs/trace-format.md).")

_RELATIVE = re.compile(r"^(?:now)?\s*-\s*(\S+)$")


def parse_time(text: str, option: str, now_s: float) -> float:
    """`now`, a relative time (`-2h`, `now-90m`), RFC 3339 (`2024-05-01T12:00:00Z`) or Unix
    seconds -> Unix seconds, a date-time can name (BadInputError otherwise)."""
    value = text.strip()
    if value == "now":
        return now_s
    m = _RELATIVE.match(value)
    if m:
        return _a_date(now_s - duration_s(m.group(1), option), text, option)
    try:
        number = float(value)
    except ValueError:
        pass
    else:  # `nan` and `inf` are floats to Python, not times
        return _a_date(number, text, option)
    try:
        parsed = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        raise BadInputError(
            f"{option}: not a time: {text!r} (use RFC 3339 like 2024-05-01T12:00:00Z, "
            "Unix seconds, now, or a relative time like -2h)"
        ) from None
    if parsed.tzinfo is None:
        raise BadInputError(f"{option}: {text!r} has no time zone (add Z or +00:00)")
    return parsed.timestamp()


def prometheus_range(url: str, start: str, end: str, step: str) -> tuple[float, float, float]:
    """A Prometheus history range from the command line: (start_s, end_s, step_s), checked (an
    http(s) URL, whole-second steps, at least one step long)."""
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
    return start_s, end_s, step_s


def _a_date(time_s: float, text: str, option: str) -> float:
    """`time_s` if it names a date-time (finite, within years 1..9999), else BadInputError."""
    try:
        if math.isfinite(time_s):
            datetime.fromtimestamp(time_s, UTC)
            return time_s
    except (OverflowError, OSError, ValueError):
        pass
    raise BadInputError(
        f"{option}: not a time: {text!r} (Unix seconds must be finite, in years 1 to 9999)"
    )


def _prometheus_config(url: str, config: Path | None) -> Any:
    """The configuration `ooda record` reads Prometheus with: the file's (its metric and label
    names, its budget query), its source pointed at `url`."""
    from agent.config import load_config, with_prometheus

    if config is None:
        return with_prometheus(None, url, "--prometheus")
    loaded = load_config(config, needs_source=False, check_files=False)
    return with_prometheus(loaded, url, f"config {config}")


def record(
    prometheus: Annotated[str, typer.Option("--prometheus", help="Prometheus base URL.")],
    start: Annotated[str, typer.Option(help="First time: RFC 3339, Unix s, now or -2h.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The trace file to write.")],
    end: Annotated[str, typer.Option(help="Last time (same forms as --start).")] = "now",
    step: Annotated[str, typer.Option(help="Time between steps (whole seconds).")] = "15s",
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Configuration: metric and label names, budget query."),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object on the last line.")
    ] = False,
) -> None:
    """Record fleet telemetry from Prometheus into a trace file (range queries, in chunks so
    memory stays flat).

    Examples:

      ooda record --prometheus http://prom:9090 --start -2h --end now -o last-2h.parquet

      ooda record --prometheus http://prom:9090 --start 2024-05-01T00:00:00Z \\
          --end 2024-05-02T00:00:00Z --step 15s -o may1.parquet
    """
    from agent.core.errors import TelemetryError
    from agent.replay.prometheus import record_range

    start_s, end_s, step_s = prometheus_range(prometheus, start, end, step)
    cfg = _prometheus_config(prometheus, config)
    t0 = time.perf_counter()
    try:
        with progress_bar(show_progress(json_out), 1.0, f"recording {output.name}") as bar:
            stats, summary = record_range(
                cfg, output, start_s=start_s, end_s=end_s, step_s=step_s, progress=bar.share()
            )
    except TelemetryError as exc:
        typer.echo(f"ooda: error: record failed: {exc}", err=True)
        raise typer.Exit(1) from None
    result = {
        "trace": str(output),
        "steps": summary.steps,
        "gpus": summary.gpus,
        "rows": summary.rows,
        "bytes": summary.bytes,
        "queries": stats.queries,
        "chunks": stats.chunks,
        "query_s": round(stats.query_s, 3),
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    if json_out:
        emit_json(result)
    else:
        typer.echo(
            f"wrote {output}: {summary.steps} steps x up to {summary.gpus} GPUs "
            f"({summary.bytes / 1e6:.1f} MB), {stats.queries} range queries in "
            f"{stats.chunks} chunks, {result['wall_s']} s"
        )


@trace_app.command("export")
def export(
    trace: Annotated[Path, typer.Argument(help="The trace file.")],
    openmetrics: Annotated[
        bool, typer.Option("--openmetrics", help="Write OpenMetrics text (the only format yet).")
    ] = False,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write here (default: stdout).")
    ] = None,
    start: Annotated[
        str | None,
        typer.Option(
            help="Shift the trace so its first step is at this time (RFC 3339, Unix s, now, "
            "-2h). Default: recorded times; a twin trace is shifted to end now."
        ),
    ] = None,
) -> None:
    """Export a trace for `promtool tsdb create-blocks-from openmetrics FILE DIR`, so a real
    Prometheus can serve it (in dcgm-exporter's metric names and labels).

    Examples:

      ooda trace export --openmetrics small.parquet -o small.om

      promtool tsdb create-blocks-from openmetrics small.om ./prometheus-data
    """
    from agent.observe.openmetrics import write_openmetrics
    from agent.observe.trace import TraceReader

    if not openmetrics:
        raise BadInputError("ooda trace export: choose a format (--openmetrics)")
    meta = TraceReader(trace).meta
    first = float(meta.time_s[0]) if meta.steps else 0.0
    last = float(meta.time_s[-1]) if meta.steps else 0.0
    now = time.time()
    if start is not None:
        offset = parse_time(start, "--start", now) - first
    elif meta.time_base == "twin":
        offset = float(int(now)) - last
    else:
        offset = 0.0
    if output is None:
        write_openmetrics(trace, sys.stdout, offset_s=offset)
        return
    with output.open("w", encoding="utf-8") as out:
        samples = write_openmetrics(trace, out, offset_s=offset)
    typer.echo(f"wrote {output}: {samples} samples, first at {first + offset:.3f} (Unix s)")


@trace_app.command("info")
def info(
    trace: Annotated[Path, typer.Argument(help="The trace file.")],
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object on the last line.")
    ] = False,
) -> None:
    """What a trace holds: its source, steps, GPUs, metrics and scenario.

    Examples:

      ooda trace info day.parquet
    """
    import math

    from agent.observe.trace import TraceReader

    reader = TraceReader(trace)
    meta = reader.meta
    budgets = [b for b in meta.budget_w.tolist() if math.isfinite(b)]
    size = trace.stat().st_size
    metrics = [str(m) for m in meta.metrics]
    result: dict[str, Any] = {
        "trace": str(trace),
        "bytes": size,
        "time_base": meta.time_base,
        "step_s": meta.step_s,
        "steps": meta.steps,
        "start_s": float(meta.time_s[0]) if meta.steps else None,
        "end_s": float(meta.time_s[-1]) if meta.steps else None,
        "gpus_max": int(meta.gpus.max()) if meta.steps else 0,
        "rows": meta.rows,
        "row_groups": reader.row_groups,
        "metrics": metrics,
        "labels": list(meta.labels),
        "budget_w": {"min": min(budgets), "max": max(budgets)} if budgets else None,
        "source": dict(meta.source),
        "scenario": meta.scenario,
        "created_utc": meta.created_utc,
    }
    if json_out:
        emit_json(result)
        return
    typer.echo(
        f"{trace}: {meta.steps} steps of {meta.step_s:g} s ({meta.time_base} time), up to "
        f"{result['gpus_max']} GPUs, {meta.rows} rows in {reader.row_groups} row group"
        f"{'' if reader.row_groups == 1 else 's'}, "
        f"{size / 1e6:.1f} MB"
    )
    typer.echo(wrapped(f"  source:  {plain(meta.source)}", " " * 11))
    typer.echo(wrapped(f"  metrics: {', '.join(metrics)}", " " * 11))
    if budgets:
        typer.echo(f"  budget:  {min(budgets):.0f}..{max(budgets):.0f} W")
    if meta.scenario:
        faults: list[str] = [str(f["spec"]) for f in meta.scenario.get("faults", [])]
        typer.echo(f"  faults:  {', '.join(faults) or 'none'}")

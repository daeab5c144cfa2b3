"""`ooda meter ...` (the energy ledger: backfill, export, status) and `ooda report energy`."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from agent.cli._common import duration_s, emit_json, progress_bar, show_progress
from agent.cli.trace import parse_time, prometheus_range
from agent.core.errors import BadInputError, ConfigError

if TYPE_CHECKING:
    from agent.config import Config
    from agent.meter.ledger import Ledger

meter_app = typer.Typer(help="The energy ledger: backfill it from Prometheus, export it.")
report_app = typer.Typer(help="Reports from the agent's records.")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="The agent's configuration (its [meter] ledger)."),
]
LedgerOption = Annotated[
    Path | None, typer.Option("--ledger", help="The ledger file (default: the config's).")
]
StateDirOption = Annotated[
    Path | None, typer.Option("--state-dir", help="Overrides daemon.state_dir.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="One JSON object on the last line.")]


def _config(path: Path | None) -> Config | None:
    """The --config file (None without one), read once per command."""
    from agent.config import load_config

    # The ledger and the signals are what these read: a file without [source] serves (backfill's
    # telemetry is --prometheus).
    return load_config(path, needs_source=False) if path is not None else None


def _ledger_file(config: Config | None, ledger: Path | None, state_dir: Path | None) -> Path:
    from agent.config import ledger_path

    if ledger is not None:
        return ledger
    if config is None:
        raise BadInputError("give --config (its [meter] ledger) or --ledger")
    return ledger_path(config, state_dir)


def _open_read_only(path: Path) -> Ledger:
    from agent.meter.ledger import Ledger, LedgerError

    try:
        return Ledger(path, read_only=True)
    except LedgerError as exc:
        raise BadInputError(f"--ledger: {exc}") from None


def _period(ledger: Ledger, since: str, until: str | None) -> tuple[float, float]:
    """[since, until] in the ledger's seconds: `--since 30d` back from `--until` (default: now
    on Unix time; a twin's ledger: its last booking)."""
    from agent.meter.report import latest_s

    now = time.time() if ledger.timeline == "unix" else (latest_s(ledger) or 0.0)
    if until is None:
        end = now
    elif ledger.timeline == "unix":
        end = parse_time(until, "--until", now)
    else:
        end = duration_s(until, "--until")
    back = duration_s(since, "--since")
    start = end - back
    if ledger.timeline != "unix":  # a twin's time starts at 0: nothing lies before it
        start = max(start, 0.0)
    return start, end


@report_app.command("energy")
def energy(
    by: Annotated[
        str, typer.Option("--by", help="Group by account, user, partition or job.")
    ] = "account",
    since: Annotated[str, typer.Option(help="How far back, e.g. 30d, 12h.")] = "30d",
    until: Annotated[
        str | None,
        typer.Option(help="The end (default now; RFC 3339, Unix s, -2h; twin: hours in)."),
    ] = None,
    top: Annotated[int, typer.Option(help="Groups and jobs shown by name.", min=1)] = 10,
    config: ConfigOption = None,
    ledger: LedgerOption = None,
    state_dir: StateDirOption = None,
    html_out: Annotated[
        Path | None, typer.Option("--html", help="Write a self-contained HTML report here.")
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Energy, cost and CO2 from the ledger, by account, user, partition or job: a table per
    group, per day, and the top jobs.

    Examples:

      ooda report energy --config /etc/ooda/agent.toml --by account --since 30d

      ooda report energy --ledger ledger.sqlite --by job --since 7d --json

      ooda report energy -c /etc/ooda/agent.toml --by user --html energy.html
    """
    from agent.meter.report import GroupBy, energy_report, text_table, write_html
    from agent.replay.report import plotly_js

    try:
        group = GroupBy(by)
    except ValueError:
        raise BadInputError(
            f"--by: {by!r} is not one of {', '.join(g.value for g in GroupBy)}"
        ) from None
    base = _config(config)
    book = _open_read_only(_ledger_file(base, ledger, state_dir))
    currency = base.meter.tariff.currency if base is not None else ""
    try:
        since_s, until_s = _period(book, since, until)
        report = energy_report(book, group, since_s, until_s, top=top, currency=currency)
    finally:
        book.close()
    if html_out is not None:
        size = write_html(report, html_out, plotly_js())
        if not json_out:
            typer.echo(f"wrote {html_out} ({size / 1e6:.1f} MB)")
    if json_out:
        emit_json(report.to_json())
    elif html_out is None:
        typer.echo(text_table(report))


@meter_app.command("backfill")
def backfill(
    prometheus: Annotated[str, typer.Option("--prometheus", help="Prometheus base URL.")],
    start: Annotated[str, typer.Option(help="First time: RFC 3339, Unix s, now or -30d.")],
    end: Annotated[str, typer.Option(help="Last time (same forms as --start).")] = "now",
    step: Annotated[str, typer.Option(help="Booking interval (whole seconds).")] = "15s",
    config: ConfigOption = None,
    ledger: LedgerOption = None,
    state_dir: StateDirOption = None,
    json_out: JsonOption = False,
) -> None:
    """Book the ledger from Prometheus history: the energy counter (or power) of every GPU,
    at every step of [start, end]. Intervals the ledger already holds (the live meter's, an
    earlier backfill's) are never booked again: backfilling twice books nothing twice.

    Examples:

      ooda meter backfill --prometheus http://prom:9090 --start -30d -c /etc/ooda/agent.toml

      ooda meter backfill --prometheus http://prom:9090 --start -2h --ledger ledger.sqlite
    """
    from agent.config import default_config

    start_s, end_s, step_s = prometheus_range(prometheus, start, end, step)
    base = _config(config) or default_config()
    path = _ledger_file(base, ledger, state_dir)
    with progress_bar(show_progress(json_out), 1.0, f"booking {path.name}") as bar:
        result = _backfill(base, prometheus, path, (start_s, end_s, step_s), bar)
    if json_out:
        emit_json(result)
    else:
        typer.echo(
            f"booked {result['booked']} intervals ({result['kwh']:,.2f} kWh) into {path}; "
            f"{result['already_booked']} were booked already, {result['gaps']} not bookable"
        )


def _backfill(
    base: Config,
    url: str,
    path: Path,
    span: tuple[float, float, float],
    progress: Callable[[float], None],
) -> dict[str, Any]:
    """Record the range (start, end, step) from Prometheus block by block (the range queries of
    `ooda record`) and book each step as it comes: no trace on disk, memory flat over any range
    (`progress`: told each share of the range done)."""
    from agent.adapters.slurm import slurm_placement
    from agent.assembly import prometheus_settings, signal_for
    from agent.core.errors import TelemetryError
    from agent.meter.ledger import J_PER_KWH, Ledger, LedgerError
    from agent.meter.meter import Meter
    from agent.observe.prometheus import PrometheusSource
    from agent.observe.record import record_prometheus
    from agent.replay.prometheus import prometheus_config

    start_s, end_s, step_s = span
    config = prometheus_config(url, base)
    m = base.meter
    slurm = getattr(base.actuators, "slurm", None)  # the Slurm section, where configured
    accounting = slurm_placement(slurm) if base.actuators.placement == "slurm" and slurm else None
    try:
        book = Ledger(path, timeline="unix", bucket_s=m.bucket_s)
    except LedgerError as exc:
        raise ConfigError(f"--ledger: {exc}") from None
    meter = Meter(
        book,
        source=m.energy,
        node_overhead_w=base.cluster.node_overhead_w,
        max_gap_s=max(m.max_gap_s, 2 * step_s),
        accounting=accounting,
        price=signal_for(config, m.tariff, "tariff"),
        carbon=signal_for(config, m.carbon, "carbon"),
        origin="backfill",
        batch=BACKFILL_BATCH,
    )
    booker = _Booker(meter, _NodePartitions(accounting))
    source = PrometheusSource(prometheus_settings(config))
    t0 = time.perf_counter()
    try:
        done = [0.0]

        def recorded(fraction: float) -> None:
            progress(fraction - done[0])
            done[0] = fraction

        record_prometheus(
            source, booker, start_s=start_s, end_s=end_s, step_s=step_s, progress=recorded
        )
        meter.flush()
    except TelemetryError as exc:
        typer.echo(f"ooda: error: backfill failed: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        source.close()
        meter.close()
    return {
        "ledger": str(path),
        "booked": meter.booked,
        "already_booked": meter.skipped,
        "gaps": booker.gaps,
        "kwh": meter.booked_j / J_PER_KWH,
        "errors": sorted(set(booker.errors))[:20],
        "wall_s": round(time.perf_counter() - t0, 3),
    }


BACKFILL_BATCH = 240  # intervals per transaction (an hour at 15 s), summed per bucket first


class _Booker:
    """Books each recorded step as its block arrives (record_prometheus's BlockSink)."""

    def __init__(self, meter: Any, nodes: _NodePartitions) -> None:
        self.meter = meter
        self.nodes = nodes
        self.gaps = 0
        self.errors: list[str] = []

    def write_block(self, block: Any) -> None:
        for j in range(block.n_steps):
            snapshot = block.snapshot(j)
            result = self.meter.book(snapshot, self.nodes.states(snapshot.node_names))
            self.errors.extend(result.errors)
            if result.reason.startswith("gap"):
                self.gaps += 1


class _NodePartitions:
    """The nodes' partitions as Slurm has them now (asked once per set of nodes): history does
    not say, and nodes seldom move between partitions."""

    def __init__(self, placement: Any) -> None:
        self.placement = placement
        self._key: tuple[str, ...] | None = None
        self._states: Any = None

    def states(self, node_names: Any) -> Any:
        if self.placement is None:
            return None
        key = tuple(str(n) for n in node_names)
        if key != self._key:
            from agent.core.errors import ActuatorError

            try:
                self._states = self.placement.node_states(list(key))
            except ActuatorError:
                self._states = None
            self._key = key
        return self._states


@meter_app.command("export")
def export(
    output: Annotated[Path, typer.Option("-o", "--output", help="CSV or Parquet file.")],
    since: Annotated[str, typer.Option(help="How far back, e.g. 30d.")] = "30d",
    until: Annotated[
        str | None, typer.Option(help="The end (default now; twin: hours in).")
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="csv or parquet (default: from the file's suffix)."),
    ] = None,
    config: ConfigOption = None,
    ledger: LedgerOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """The ledger's rows (per time bucket and job, with user, account, partition, QoS, energy
    in J, GPU-seconds, cost, CO2) as CSV or Parquet.

    Examples:

      ooda meter export -c /etc/ooda/agent.toml --since 30d -o june.parquet

      ooda meter export --ledger ledger.sqlite --format csv -o ledger.csv
    """
    from agent.meter.export import write_csv, write_parquet

    kind = fmt or output.suffix.lstrip(".").lower()
    if kind not in ("csv", "parquet"):
        raise BadInputError(f"--format: csv or parquet (got {kind!r}; or name the file .csv)")
    book = _open_read_only(
        _ledger_file(_config(config) if ledger is None else None, ledger, state_dir)
    )
    try:
        since_s, until_s = _period(book, since, until)
        rows = book.rows(since_s, until_s)
    finally:
        book.close()
    count = write_csv(rows, output) if kind == "csv" else write_parquet(rows, output)
    typer.echo(f"wrote {count} rows to {output}")


@meter_app.command("status")
def status(
    config: ConfigOption = None,
    ledger: LedgerOption = None,
    state_dir: StateDirOption = None,
    json_out: JsonOption = False,
) -> None:
    """What the ledger holds: the spans booked (live and backfilled), the gaps between them,
    the live cursor, jobs and size.

    Examples:

      ooda meter status --config /etc/ooda/agent.toml

      ooda meter status --config deploy/examples/twin.toml --state-dir /tmp/ooda-state --json
    """
    book = _open_read_only(
        _ledger_file(_config(config) if ledger is None else None, ledger, state_dir)
    )
    try:
        spans = book.spans()
        jobs = book.db.execute("SELECT count(*), count(nullif(account, '')) FROM jobs").fetchone()
        gaps = [
            spans[k + 1][0] - spans[k][1]
            for k in range(len(spans) - 1)
            if spans[k + 1][0] > spans[k][1]
        ]
        size = book.bytes()
        result: dict[str, Any] = {
            "ledger": str(book.path),
            "timeline": book.timeline,
            "bytes": size,
            "cursor_s": book.cursor_time(),
            "jobs": int(jobs[0]),
            "jobs_attributed": int(jobs[1]),
            "spans": [
                {"start_s": a, "end_s": b, "origin": o, "intervals": n}
                for a, b, o, n, _, _ in spans
            ],
            "gaps_s": gaps,
        }
    finally:
        book.close()
    if json_out:
        emit_json(result)
        return
    typer.echo(
        f"{result['ledger']}: {len(spans)} spans, {len(gaps)} gaps, "
        f"{result['jobs']} jobs ({result['jobs_attributed']} attributed), "
        f"{size / 1e6:.1f} MB; live cursor at {result['cursor_s']}"
    )
    for a, b, origin, n, _, _ in spans:
        hours = (b - a) / 3600.0
        typer.echo(f"  {origin:<9} {a:.0f} .. {b:.0f} ({hours:,.2f} h, {n} intervals)")

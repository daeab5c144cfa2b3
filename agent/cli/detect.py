"""`ooda detect` and `ooda forecast`: orient's models on anyone's time series (a CSV file).

Both read a CSV with a header, a time column and a value column; timestamps are numbers (e.g.
Unix seconds) or ISO 8601 date-times, at any regular or irregular interval. Both are causal: the
output row for input row i uses rows <= i only, so the output for a prefix of a file is the
prefix of the output. Timestamps that repeat or step back (clock changes, exporter restarts) are
warned about on stderr, naming the lines, and processed in file order; `--strict` refuses them.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TextIO

import typer

from agent.core.errors import BadInputError

if TYPE_CHECKING:
    from agent.orient.stream import SeriesResult

MAX_WARNINGS = 20
DEFAULT_ALARM_P = 1e-2  # agent.orient.stream.StreamParams.alarm_p (a test checks they agree)

# A series of a year at one sample a minute is about 16 MB of CSV; past this it is not a series.
MAX_CSV_BYTES = 32 << 20


@dataclass(frozen=True, slots=True)
class Series:
    times_text: list[str]
    values_text: list[str]
    times: list[float]
    values: list[float]
    lines: list[int]  # the line each row starts on (1 = the header)


def _parse_time(text: str, where: str) -> tuple[float, str]:
    """Seconds and the kind ("number" or "datetime") of one timestamp."""
    stripped = text.strip()
    try:
        value = float(stripped)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise BadInputError(f"{where}: timestamp {text!r} is not a finite number")
        return value, "number"
    try:
        stamp = datetime.fromisoformat(stripped)
    except ValueError:
        raise BadInputError(
            f"{where}: timestamp {text!r} is neither a number nor an ISO 8601 date-time"
        ) from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp(), "datetime"


def _line_at(data: bytes, offset: int) -> int:
    """The line (1 = the first) that byte `offset` of `data` is on; a line ends at \n, \r\n or
    \r, as the CSV reader's lines do."""
    before = data[:offset]
    return before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n") + 1


def _read_text(path: Path) -> str:
    """The file as text. Decoded whole, so a bad byte's offset names its line (a text stream
    decodes ahead in chunks: its error came on an earlier line). utf-8-sig: a byte order mark
    (as spreadsheets write one) is not part of the first column's name."""
    try:
        with path.open("rb") as handle:  # never more than the bound: /dev/zero is a file too
            data = handle.read(MAX_CSV_BYTES + 1)
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > MAX_CSV_BYTES:
        raise BadInputError(f"{path}: larger than {MAX_CSV_BYTES} bytes (at most 32 MiB is read)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = _line_at(exc.object, exc.start)  # the object is the data after any mark
        raise BadInputError(f"{path}: line {line}: not UTF-8 text") from None


def read_series(path: Path, time_column: str, value_column: str, strict: bool = False) -> Series:
    """Read and check the file; raise BadInputError naming the file and line on bad input."""
    with io.StringIO(_read_text(path), newline="") as handle:
        reader = csv.reader(handle)
        ti, vi, names = _columns(reader, path, time_column, value_column)
        out = Series([], [], [], [], [])
        kinds: list[str] = []  # the first timestamp's kind: every other must match it
        line = reader.line_num + 1
        try:
            for row in reader:
                if row and any(cell.strip() for cell in row):  # blank lines carry nothing
                    _add_row(out, row, (ti, vi), names, f"{path}: line {line}", kinds)
                    out.lines.append(line)
                line = reader.line_num + 1
        except csv.Error as exc:
            raise BadInputError(
                f"{path}: line {reader.line_num}: not readable CSV ({exc})"
            ) from None
    if not out.values:
        raise BadInputError(f"{path}: line 2: no data rows after the header")
    _check_order(path, out, strict)
    return out


def _columns(
    reader: Iterator[list[str]], path: Path, time_column: str, value_column: str
) -> tuple[int, int, list[str]]:
    """The header's names, and where the time and value columns are."""
    try:
        header = next(reader)
    except StopIteration:
        raise BadInputError(f"{path}: line 1: empty file (expected a header)") from None
    except csv.Error as exc:
        raise BadInputError(f"{path}: line 1: not readable CSV ({exc})") from None
    names = [h.strip() for h in header]
    for column, option in ((time_column, "--time-column"), (value_column, "--value-column")):
        if column not in names:
            raise BadInputError(
                f"{path}: line 1: no column {column!r} in the header "
                f"(found: {', '.join(names) or 'nothing'}; choose one with {option})"
            )
    return names.index(time_column), names.index(value_column), names


def _add_row(
    out: Series,
    row: list[str],
    at: tuple[int, int],
    names: list[str],
    where: str,
    kinds: list[str],
) -> None:
    """Parse one data row's timestamp and value into `out`, or say what is wrong with it."""
    ti, vi = at
    last = max(ti, vi)
    if len(row) <= last:
        raise BadInputError(
            f"{where}: {len(row)} fields, but column {names[last]!r} is field {last + 1}"
        )
    t_text, v_text = row[ti], row[vi]
    t, t_kind = _parse_time(t_text, where)
    if not kinds:
        kinds.append(t_kind)
    elif t_kind != kinds[0]:
        raise BadInputError(
            f"{where}: timestamp {t_text!r} is a {t_kind}, earlier ones are {kinds[0]}s"
        )
    try:
        v = float(v_text.strip())
    except ValueError:
        raise BadInputError(f"{where}: value {v_text!r} is not a number") from None
    if not math.isfinite(v):
        raise BadInputError(f"{where}: value {v_text!r} is not a finite number")
    out.times_text.append(t_text)
    out.values_text.append(v_text)
    out.times.append(t)
    out.values.append(v)


def _check_order(path: Path, series: Series, strict: bool) -> None:
    problems: list[str] = []
    for i in range(1, len(series.times)):
        if series.times[i] <= series.times[i - 1]:
            what = "repeats" if series.times[i] == series.times[i - 1] else "steps back from"
            problems.append(
                f"line {series.lines[i]}: timestamp {series.times_text[i]!r} {what} "
                f"line {series.lines[i - 1]} ({series.times_text[i - 1]!r})"
            )
    if not problems:
        return
    if strict:
        raise BadInputError(f"{path}: {problems[0]} (--strict refuses timestamps out of order)")
    for problem in problems[:MAX_WARNINGS]:
        typer.echo(f"ooda: warning: {path}: {problem}; processed in file order", err=True)
    if len(problems) > MAX_WARNINGS:
        typer.echo(
            f"ooda: warning: {path}: {len(problems) - MAX_WARNINGS} more timestamps out of order",
            err=True,
        )


def _format(x: float) -> str:
    return f"{x:.6g}"


def _format_score(score: float) -> str:
    """1 - p with p's first significant digits kept (0.99997, 0.9999999991)."""
    return f"{score:.12g}"


TimeColumn = Annotated[str, typer.Option("--time-column", help="Name of the timestamp column.")]
ValueColumn = Annotated[str, typer.Option("--value-column", help="Name of the value column.")]
Strict = Annotated[
    bool,
    typer.Option("--strict", help="Refuse timestamps that repeat or step back (exit 2)."),
]


def detect(
    file: Annotated[Path, typer.Argument(help="CSV file with a header.")],
    time_column: TimeColumn = "timestamp",
    value_column: ValueColumn = "value",
    strict: Strict = False,
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold",
            help="Tail probability under which a row opens an alarm (between 0 and 1; lower: "
            "fewer alarms). One threshold means the same on every series.",
        ),
    ] = DEFAULT_ALARM_P,
) -> None:
    """Anomalies in a time series, as events: one output row per input row, causally.

    Writes `timestamp,value,score,anomaly,event` to stdout, timestamps and values exactly as
    read. `score` is 1 - p, where p is the row's tail probability: how rare a row this far
    from what the rows before it predicted (a fast level, a slow one, a daily and weekly
    rhythm where the series has one; over the row itself and its recent means) is in this
    series' own recent history. `anomaly` is 1 on the row an alarm opens (p < --threshold):
    once per anomalous episode. `event` says `open`, `close` (the series has been calm for a
    while) or `change` (a level shift became the new normal). The first 30 rows only teach.

    Examples:

      ooda detect power.csv

      ooda detect metrics.csv --time-column time --value-column gpu0_power_w --threshold 1e-5
    """
    from agent.orient.stream import StreamParams, detect_series

    if not 0.0 < threshold < 1.0:
        raise BadInputError(
            f"--threshold {threshold:g}: a tail probability between 0 and 1 (e.g. 0.01)"
        )
    series = read_series(file, time_column, value_column, strict)
    result = detect_series(series.times, series.values, params=StreamParams(alarm_p=threshold))
    write_detections(sys.stdout, series, result)


def write_detections(out: TextIO, series: Series, result: SeriesResult) -> None:
    """`ooda detect`'s output for one series: `timestamp,value,score,anomaly,event`."""
    import numpy as np

    events = np.where(
        result.opened,
        "open",
        np.where(result.changed, "change", np.where(result.closed, "close", "")),
    )
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["timestamp", "value", "score", "anomaly", "event"])
    for t_text, v_text, score, opened, event in zip(
        series.times_text,
        series.values_text,
        result.score.tolist(),
        result.opened.tolist(),
        events.tolist(),
        strict=True,
    ):
        writer.writerow([t_text, v_text, _format_score(score), int(opened), event])


def forecast(
    file: Annotated[Path, typer.Argument(help="CSV file with a header.")],
    horizon_steps: Annotated[
        int,
        typer.Option("--horizon-steps", min=1, help="Forecast this many rows ahead."),
    ],
    time_column: TimeColumn = "timestamp",
    value_column: ValueColumn = "value",
    strict: Strict = False,
) -> None:
    """Forecasts of a time series, causally: row i forecasts row i + H from rows <= i.

    Writes `timestamp,value,forecast` to stdout (timestamps and values exactly as read). The
    model (gradient-boosted trees on lag features, predicting the change) is refit as rows
    come, on a schedule that depends only on the row number, and is used only where it beat
    persistence (the last value) on its most recent training rows; elsewhere, and until enough
    rows exist, the forecast is the last value.

    Examples:

      ooda forecast power.csv --horizon-steps 4

      ooda forecast metrics.csv --horizon-steps 20 --value-column fleet_power_w
    """
    import numpy as np

    from agent.orient.forecast import forecast_series

    series = read_series(file, time_column, value_column, strict)
    predicted = forecast_series(np.asarray(series.values, dtype=np.float64), horizon_steps)
    write_forecasts(sys.stdout, series, predicted.tolist())


def write_forecasts(out: TextIO, series: Series, predicted: list[float]) -> None:
    """`ooda forecast`'s output for one series: `timestamp,value,forecast`."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["timestamp", "value", "forecast"])
    for t_text, v_text, f in zip(series.times_text, series.values_text, predicted, strict=True):
        writer.writerow([t_text, v_text, _format(f)])

"""Price and carbon intensity over time: what a kWh cost and how much CO2 it emitted.

Both are `Signal`s: given times (the clock's seconds: Unix time for a real cluster; the twin's
seconds, read as seconds since 1970-01-01 UTC), their values, NaN where unknown (an unknown
price is booked as unpriced energy, never as free). Built from the `[meter.tariff]` and
`[meter.carbon]` sections (agent.meter.settings):
- a flat price, or a time-of-use table (periods by weekday and local time, in a time zone);
- a constant intensity, or a schedule file (CSV `time,g_per_kwh`: the value holds from its time
  until the next row's);
- either one from PromQL (a Prometheus series holding the price or the intensity), built by the
  wiring from agent.observe.signal (the meter does no Prometheus I/O itself).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_SCHEDULE_ROWS = 1_000_000  # a year at one row a minute is half of it
MAX_SCHEDULE_BYTES = 64 * 1024 * 1024
MAX_G_PER_KWH = 5000.0  # lignite is about 1,100 g/kWh; anything far past it is a typo


@runtime_checkable
class Signal(Protocol):
    """A value over time (per kWh): NaN where it is not known."""

    def at(self, times_s: FloatArray) -> FloatArray: ...


class Constant:
    def __init__(self, value: float | None) -> None:
        self.value = math.nan if value is None else float(value)

    def at(self, times_s: FloatArray) -> FloatArray:
        return np.full(np.shape(times_s), self.value, dtype=np.float64)


def parse_clock(text: str) -> int:
    """`HH:MM` -> minutes after midnight; `24:00` is the end of the day."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.isdecimal() and len(p) == 2 for p in parts):
        raise ValueError(f"expected HH:MM (got {text!r})")
    hours, minutes = int(parts[0]), int(parts[1])
    if minutes > 59 or hours > 24 or (hours == 24 and minutes):
        raise ValueError(f"not a time of day (got {text!r})")
    return hours * 60 + minutes


class TimeOfUse:
    """Prices by weekday and local time: `periods` as (days, start minute, end minute, price);
    the first period holding a time wins; `default` outside every period."""

    def __init__(
        self,
        periods: Sequence[tuple[frozenset[int], int, int, float]],
        default: float,
        timezone: str = "UTC",
    ) -> None:
        self.periods = list(periods)
        self.default = default
        self.zone = ZoneInfo(timezone)

    def at(self, times_s: FloatArray) -> FloatArray:
        times = np.asarray(times_s, dtype=np.float64).reshape(-1)
        # Local weekday and minute per distinct minute: intervals share them (a day at 15 s is
        # 5,760 readings but 1,440 minutes), so the time zone is asked once per minute.
        minutes, inverse = np.unique(np.floor(times / 60.0), return_inverse=True)
        weekday = np.zeros(minutes.shape, dtype=np.int64)
        minute = np.zeros(minutes.shape, dtype=np.int64)
        for k, m in enumerate(minutes):
            if not math.isfinite(m):
                continue
            local = datetime.fromtimestamp(m * 60.0, self.zone)
            weekday[k], minute[k] = local.weekday(), local.hour * 60 + local.minute
        price = np.full(minutes.shape, np.nan)
        for days, start, end, value in self.periods:
            hit = np.isin(weekday, list(days)) & (minute >= start) & (minute < end)
            price = np.where(np.isnan(price) & hit, value, price)
        out = np.where(np.isnan(price[inverse]), self.default, price[inverse])
        return np.where(np.isfinite(times), out, np.nan).reshape(np.shape(times_s))


class Schedule:
    """A step function: each value holds from its time until the next one's; NaN before the
    first (not known) and never extrapolated backwards."""

    def __init__(self, times_s: FloatArray, values: FloatArray) -> None:
        order = np.argsort(times_s, kind="stable")
        self.times_s = np.asarray(times_s, dtype=np.float64)[order]
        self.values = np.asarray(values, dtype=np.float64)[order]

    def at(self, times_s: FloatArray) -> FloatArray:
        times = np.asarray(times_s, dtype=np.float64)
        if self.times_s.size == 0:
            return np.full(times.shape, np.nan)
        pos = np.searchsorted(self.times_s, times, side="right") - 1
        return np.where(pos >= 0, self.values[np.maximum(pos, 0)], np.nan)


def _parse_time(text: str) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone (add Z or +HH:MM)")
    return when.timestamp()


def load_schedule(path: Path, column: str = "g_per_kwh") -> Schedule:
    """A CSV with a header `time,<column>`: time in Unix seconds or ISO 8601 with a zone.
    Raises ValueError naming the file, the line and the problem."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size > MAX_SCHEDULE_BYTES:
        raise ValueError(f"{path}: {size} bytes, more than {MAX_SCHEDULE_BYTES} allowed")
    times: list[float] = []
    values: list[float] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"time", column} <= set(reader.fieldnames):
            raise ValueError(f"{path}: the header must name the columns time and {column}")
        for row in reader:
            line = reader.line_num
            if len(times) >= MAX_SCHEDULE_ROWS:
                raise ValueError(f"{path}: more than {MAX_SCHEDULE_ROWS} rows")
            try:
                t = _parse_time(row["time"] or "")
                value = float(row[column] or "")
            except ValueError as exc:
                raise ValueError(f"{path}, line {line}: {exc}") from None
            if not (math.isfinite(t) and math.isfinite(value) and 0 <= value <= MAX_G_PER_KWH):
                raise ValueError(
                    f"{path}, line {line}: {column} must be a number in [0, {MAX_G_PER_KWH:g}] "
                    f"at a finite time (got {row[column]!r})"
                )
            times.append(t)
            values.append(value)
    if not times:
        raise ValueError(f"{path}: no rows")
    return Schedule(np.array(times), np.array(values))

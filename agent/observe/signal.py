"""A scalar signal from Prometheus: a PromQL query whose one series is a value over time (an
electricity price, the grid's carbon intensity). Implements agent.meter.pricing's `Signal`
protocol (`at(times)`; NaN where unknown), so the meter prices energy without Prometheus I/O of
its own.

A few times (the live meter: one per cycle) are instant queries; many (a backfill) are one range
query per chunk, each time taking the newest value at or before it, as an instant query would.
An answer with no series, or with several (the query must pick one), is unknown, never 0; a
failure is a TelemetryError naming the query.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.core.errors import TelemetryError
from agent.observe.prometheus import PrometheusSource

FloatArray = npt.NDArray[np.float64]

INSTANT_MAX = 4  # more times than this: range queries
MAX_STEPS = 10_000  # points per range query (Prometheus refuses 11,000)
LOOKBACK_S = 300.0  # as Prometheus's instant queries: the newest sample within 5 minutes


class PromQLSignal:
    def __init__(self, source: PrometheusSource, query: str, name: str = "signal") -> None:
        self.source = source
        self.query = query
        self.name = name

    def _one(self, result: list[dict[str, Any]]) -> float:
        if len(result) != 1:
            return math.nan
        try:
            value = float(result[0]["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            return math.nan
        return value if math.isfinite(value) else math.nan

    def at(self, times_s: FloatArray) -> FloatArray:
        times = np.asarray(times_s, dtype=np.float64)
        flat = times.reshape(-1)
        if flat.size <= INSTANT_MAX:
            out = np.array([self._one(self.source.query(self.query, float(t))) for t in flat])
            return out.reshape(times.shape)
        return self._ranged(flat).reshape(times.shape)

    def _ranged(self, times: FloatArray) -> FloatArray:
        """The newest value at or before each time (within LOOKBACK_S), from range queries at a
        step as fine as the times' smallest spacing."""
        finite = np.sort(times[np.isfinite(times)])
        out = np.full(times.shape, np.nan)
        if finite.size == 0:
            return out
        gaps = np.diff(finite)
        step = max(1.0, float(gaps[gaps > 0].min()) if (gaps > 0).any() else 60.0)
        seen_t: list[FloatArray] = []
        seen_v: list[FloatArray] = []
        start, end = float(finite[0]), float(finite[-1])
        while start <= end:
            stop = min(end, start + step * (MAX_STEPS - 1))
            result = self.source.query_range(self.query, start, stop, step)
            if len(result) > 1:
                raise TelemetryError(
                    f"{self.name}: the query {self.query!r} gives {len(result)} series; it must "
                    "give one (aggregate it)"
                )
            for series in result:
                values = np.asarray(series.get("values") or [], dtype=np.float64).reshape(-1, 2)
                seen_t.append(values[:, 0])
                seen_v.append(values[:, 1])
            start = stop + step
        if not seen_t:
            return out
        t = np.concatenate(seen_t)
        v = np.concatenate(seen_v)
        pos = np.searchsorted(t, times, side="right") - 1
        ok = (pos >= 0) & np.isfinite(times)
        safe = np.maximum(pos, 0)
        ok &= times - t[safe] <= LOOKBACK_S + step
        return np.where(ok, v[safe], np.nan)

"""Demand response: load targets over time ("6 MW from 14:00 for one hour"), ramped.

An event holds the site at or under `target_w` from `start_unix` for `duration_s`. The site's
limit follows the tightest event, ramped at `ramp_w_per_s`: it starts coming down early enough to
be at the target when the event starts, and goes back up at the same rate after it ends (no
rebound surge). Pure: the sources (a schedule file, the webhook, a PromQL signal, OpenADR) only
produce events.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.core.errors import BadInputError
from agent.core.toml_file import read_toml

MAX_EVENTS = 1000  # events held at once (a schedule file or the webhook): bounded
MAX_SCHEDULE_BYTES = 1 << 20
_EVENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


class DemandError(BadInputError):
    """An event or schedule that cannot be used (named in the message)."""


@dataclass(frozen=True)
class DemandEvent:
    event_id: str
    start_unix: float
    duration_s: float
    target_w: float
    source: str = "schedule"

    @property
    def end_unix(self) -> float:
        return self.start_unix + self.duration_s

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.event_id,
            "start_unix": self.start_unix,
            "duration_s": self.duration_s,
            "target_w": self.target_w,
            "source": self.source,
        }

    @staticmethod
    def from_json(data: object, source: str, where: str = "event") -> DemandEvent:
        """An event from JSON or TOML: `id`, `start` (Unix seconds or an ISO 8601 time with its
        zone) or `start_unix`, `duration_s`, `target_w`."""
        if not isinstance(data, Mapping):
            raise DemandError(f"{where}: not an object")
        unknown = set(data) - {"id", "start", "start_unix", "duration_s", "target_w", "source"}
        if unknown:
            raise DemandError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        event_id = data.get("id")
        if not isinstance(event_id, str) or not _EVENT_ID.fullmatch(event_id):
            raise DemandError(f"{where}.id: a name of letters, digits, '.', '_', ':', '-'")
        start = _start(data.get("start", data.get("start_unix")), f"{where}.start")
        duration = _positive(data.get("duration_s"), f"{where}.duration_s")
        target = _positive(data.get("target_w"), f"{where}.target_w")
        return DemandEvent(event_id, start, duration, target, source)


def _positive(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DemandError(f"{where}: not a number (got {value!r})")
    if not math.isfinite(value) or value <= 0:
        raise DemandError(f"{where}: must be a finite number above 0 (got {value!r})")
    return float(value)


def _start(value: object, where: str) -> float:
    if isinstance(value, datetime):  # TOML's own date-times
        if value.tzinfo is None:
            raise DemandError(f"{where}: give the time's zone (e.g. 14:00:00Z)")
        return value.timestamp()
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise DemandError(f"{where}: not an ISO 8601 time (got {value!r})") from None
        if parsed.tzinfo is None:
            raise DemandError(f"{where}: give the time's zone (e.g. 2026-07-01T14:00:00Z)")
        return parsed.timestamp()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DemandError(f"{where}: a Unix time or an ISO 8601 time (got {value!r})")
    return float(value)


def load_schedule(path: Path) -> list[DemandEvent]:
    """A schedule file: TOML with `[[event]]` tables (id, start, duration_s, target_w)."""
    data = read_toml(path, "schedule", max_bytes=MAX_SCHEDULE_BYTES, error=DemandError)
    unknown = set(data) - {"event"}
    if unknown:
        raise DemandError(f"schedule {path}: unknown key {sorted(unknown)[0]!r}")
    events = data.get("event", [])
    if not isinstance(events, list) or len(events) > MAX_EVENTS:
        raise DemandError(f"schedule {path}: event must be a list of at most {MAX_EVENTS}")
    parsed = [
        DemandEvent.from_json(e, "schedule", f"schedule {path}: event[{i}]")
        for i, e in enumerate(events)
    ]
    ids = [e.event_id for e in parsed]
    if len(set(ids)) != len(ids):
        raise DemandError(f"schedule {path}: event ids must be unique")
    return parsed


@dataclass(frozen=True)
class SiteTarget:
    """The site's limit now and where it comes from."""

    limit_w: float
    event: DemandEvent | None  # the event setting it (None: the configured limit)
    phase: str  # "normal", "ramping_down", "holding", "ramping_up"
    target_w: float | None  # the event's own target


def site_target(
    events: Iterable[DemandEvent], now_unix: float, static_w: float, ramp_w_per_s: float
) -> SiteTarget:
    """The limit at `now_unix`: the configured one, or the tightest event's ramped target."""
    best = SiteTarget(static_w, None, "normal", None)
    for event in events:
        if now_unix < event.start_unix:
            away_s, phase = event.start_unix - now_unix, "ramping_down"
        elif now_unix < event.end_unix:
            away_s, phase = 0.0, "holding"
        else:
            away_s, phase = now_unix - event.end_unix, "ramping_up"
        level = event.target_w + ramp_w_per_s * away_s
        if level < best.limit_w:
            best = SiteTarget(level, event, phase, event.target_w)
    return best


def current(events: Iterable[DemandEvent], now_unix: float, keep_s: float) -> list[DemandEvent]:
    """The events still worth holding: not ended more than `keep_s` ago (the ramp back up)."""
    return [e for e in events if e.end_unix + keep_s > now_unix]

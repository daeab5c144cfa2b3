"""OpenADR 2.0b events into the site's demand response: a VEN (OpenLEADR, the optional extra
`openadr`) whose events become demand-response events the coordinator keeps in etcd, as the
webhook's do.

Signals understood (each interval one event, `EVENTID.N`):
- `LOAD_CONTROL` / `x-loadControlCapacity`: the share of the site's limit to use (0..1);
- `LOAD_DISPATCH` / `setpoint` with a real-power measurement: the site's target in its units
  (W, with the measurement's scale: k, M);
- `SIMPLE` / `level` 0..3: the share of the site's limit each level means (`simple_levels`).
Anything else is opted out of, and logged. An event the site cannot meet (its target below the
clusters' floors, as the last round saw them) is opted out of too, but still followed: the
limits only ever come down.

The mapping (`events_from_openadr`) is pure and needs no OpenLEADR; the VEN imports it lazily.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import structlog

from agent.core.errors import ConfigError
from agent.site.demand import DemandEvent
from agent.site.settings import DEFAULT_SIMPLE_LEVELS, OpenAdrSettings

log = structlog.get_logger("ooda.site.openadr")

SCALES = {"none": 1.0, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}


class OpenAdrError(ValueError):
    """An OpenADR event that cannot be followed (named in the message)."""


def _seconds(value: Any) -> float:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise OpenAdrError(f"duration: not a time span ({value!r})")


def _start(value: Any) -> float:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise OpenAdrError("dtstart: a time without its zone")
        return value.timestamp()
    raise OpenAdrError(f"dtstart: not a time ({value!r})")


def _target(
    signal: Mapping[str, Any], payload: float, limit_w: float, levels: Sequence[float]
) -> float:
    name, kind = signal.get("signal_name"), signal.get("signal_type")
    if (name, kind) == ("LOAD_CONTROL", "x-loadControlCapacity"):
        if not 0.0 < payload <= 1.0:
            raise OpenAdrError(f"x-loadControlCapacity {payload!r}: a share in (0, 1]")
        return payload * limit_w
    if (name, kind) == ("LOAD_DISPATCH", "setpoint"):
        measurement = signal.get("measurement") or {}
        unit = str(measurement.get("name", "") if isinstance(measurement, Mapping) else "")
        scale = str(measurement.get("scale", "none") if isinstance(measurement, Mapping) else "")
        if "power" not in unit.lower() or scale not in SCALES:
            raise OpenAdrError(f"setpoint: needs a real-power measurement (got {measurement!r})")
        return payload * SCALES[scale]
    if (name, kind) == ("SIMPLE", "level"):
        level = int(payload)
        if level != payload or not 0 <= level < len(levels):
            raise OpenAdrError(f"SIMPLE level {payload!r}: 0 to {len(levels) - 1}")
        return levels[level] * limit_w
    raise OpenAdrError(f"signal {name}/{kind}: not one the site follows")


def events_from_openadr(
    event: Mapping[str, Any], limit_w: float, levels: Sequence[float] = DEFAULT_SIMPLE_LEVELS
) -> list[DemandEvent]:
    """An OpenLEADR event dict as demand-response events; OpenAdrError names what is wrong."""
    try:
        event_id = str(event["event_descriptor"]["event_id"])
        signals = event["event_signals"]
    except (KeyError, TypeError):
        raise OpenAdrError("not an OpenADR event (event_descriptor, event_signals)") from None
    out: list[DemandEvent] = []
    for signal in signals:
        for n, interval in enumerate(signal.get("intervals", [])):
            payload = interval.get("signal_payload")
            if isinstance(payload, bool) or not isinstance(payload, int | float):
                raise OpenAdrError(f"signal_payload: not a number ({payload!r})")
            target = _target(signal, float(payload), limit_w, levels)
            if not math.isfinite(target) or target <= 0:
                raise OpenAdrError(f"target {target!r} W: not a power")
            start = _start(interval.get("dtstart"))
            duration = _seconds(interval.get("duration"))
            out.append(DemandEvent(f"{event_id}.{n}", start, duration, target, "openadr"))
    if not out:
        raise OpenAdrError(f"event {event_id}: no interval to follow")
    return out


class OpenAdrVen:
    """The site's VEN on its own thread and event loop. `post`: store an event (the
    coordinator's post_event); `floor_w`: the least the site can draw now (None: unknown)."""

    def __init__(
        self,
        settings: OpenAdrSettings,
        limit_w: float,
        post: Callable[[DemandEvent], None],
        floor_w: Callable[[], float | None],
    ) -> None:
        try:
            # The optional extra, imported only where it is configured.
            from openleadr import OpenADRClient  # noqa: PLC0415
        except ImportError:
            raise ConfigError(
                "demand_response.openadr: needs the openadr extra "
                "(pip install 'ooda-agent[openadr]')"
            ) from None
        self.limit_w = limit_w
        self.levels = tuple(settings.simple_levels)
        self.post = post
        self.floor_w = floor_w
        self.loop = asyncio.new_event_loop()
        self.client = OpenADRClient(
            ven_name=settings.ven_name,
            vtn_url=settings.vtn_url,
            cert=None if settings.cert is None else str(settings.cert),
            key=None if settings.key is None else str(settings.key),
            vtn_fingerprint=settings.vtn_fingerprint,
            disable_signature=settings.cert is None,  # unsigned without a certificate
        )
        self.client.add_handler("on_event", self._on_event)
        self._thread = threading.Thread(target=self._run, name="openadr-ven", daemon=True)

    async def _on_event(self, event: Mapping[str, Any]) -> str:
        try:
            events = events_from_openadr(event, self.limit_w, self.levels)
        except OpenAdrError as exc:
            log.error("openadr_event_refused", error=str(exc))
            return "optOut"
        floor = self.floor_w()
        for demand in events:
            self.post(demand)
        log.warning("openadr_event", events=[e.to_json() for e in events], floor_w=floor)
        if floor is not None and any(e.target_w < floor for e in events):
            return "optOut"  # followed all the same, but the site cannot promise it
        return "optIn"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.client.run())
        self.loop.run_forever()

    def start(self) -> OpenAdrVen:
        self._thread.start()
        return self

    def stop(self) -> None:
        if not self.loop.is_running():
            return
        future = asyncio.run_coroutine_threadsafe(self.client.stop(), self.loop)
        try:
            future.result(timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)

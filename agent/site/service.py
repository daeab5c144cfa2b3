"""`ooda site run`: the coordinator as a service.

A round every `site.interval_s` (sooner when the webhook brings an event); SIGTERM or SIGINT
stops it (leadership handed over at once), SIGHUP re-reads the schedule file. The HTTP side, when
`site.listen` is set: `GET /v1/status` (the last round, no token) and `POST /v1/demand-response`
(an event; bearer token from `site.token_file`), and the PromQL signal when configured.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import httpx
import structlog

from agent.core.clock import Clock, MonotonicClock, SystemClock
from agent.core.errors import ConfigError
from agent.node.auth import TokenStore
from agent.site.coordinator import ClusterPlan, Coordinator, SitePlan, round_summary
from agent.site.demand import DemandError, DemandEvent, load_schedule
from agent.site.http import JsonServer, Reply
from agent.site.openadr import OpenAdrVen
from agent.site.settings import (
    PromqlSignal,
    SiteConfig,
    default_replica,
    open_store,
    site_prefix,
    split_listen,
)
from agent.site.store import Store, StoreError

log = structlog.get_logger("ooda.site")


def site_plan(config: SiteConfig) -> SitePlan:
    dr = config.demand_response
    return SitePlan(
        name=config.site.name,
        prefix=site_prefix(config.etcd, config.site.name),
        tree=config.tree(),
        clusters={n: ClusterPlan(c.safe_share_w, c.weight) for n, c in config.clusters.items()},
        interval_s=config.site.interval_s,
        grant_lease_s=config.grant_lease_s,
        clock_skew_s=config.site.clock_skew_s,
        lead_s=config.lead_s,
        ramp_w_per_s=None if dr is None else dr.ramp_w_per_s,
        leader_ttl_s=config.leader_ttl_s,
    )


def promql_signal(settings: PromqlSignal) -> Callable[[], float | None]:
    """The query's one value (W), or None when it has none (the last target is kept)."""

    def read() -> float | None:
        answer = httpx.get(
            f"{settings.url.rstrip('/')}/api/v1/query",
            params={"query": settings.query},
            timeout=settings.timeout_s,
        )
        answer.raise_for_status()
        data = answer.json().get("data", {})
        result = data.get("result")
        if data.get("resultType") == "scalar" and isinstance(result, list):
            values = [result[1]]
        elif isinstance(result, list):
            values = [r["value"][1] for r in result if isinstance(r, dict) and "value" in r]
        else:
            values = []
        watts = [float(v) for v in values]
        finite = [w for w in watts if math.isfinite(w) and w > 0]
        if len(finite) != 1:
            if values:
                log.error("site_signal_ambiguous", values=len(values), query=settings.query)
            return None
        return finite[0]

    return read


def read_status(config: SiteConfig, store: Store | None = None) -> dict[str, Any] | None:
    """The coordinator's last round, as it published it in etcd (None: none published, no
    coordinator leads). Raises StoreError when etcd cannot be reached."""
    store = store or open_store(config.etcd)
    try:
        raw = store.get(f"{site_prefix(config.etcd, config.site.name)}/status")
    finally:
        store.close()
    if raw is None:
        return None
    try:
        report = json.loads(raw)
    except ValueError as exc:
        raise StoreError(f"the status in etcd is not JSON ({exc})") from None
    if not isinstance(report, dict):
        raise StoreError("the status in etcd is not a JSON object")
    return report


class Heartbeat(Protocol):
    """What the service tells its supervisor (systemd's notify protocol under Type=notify; the
    command hands it in): ready after its first round, a status line each round, the watchdog
    fed while rounds come, stopping at the end."""

    @property
    def watchdog_s(self) -> float | None: ...

    def ready(self, status: str) -> None: ...

    def status(self, status: str) -> None: ...

    def watchdog(self) -> None: ...

    def stopping(self, status: str = "stopping") -> None: ...


class NoHeartbeat:
    """No supervisor to tell (tests, a shell)."""

    watchdog_s: float | None = None

    def ready(self, status: str) -> None:
        pass

    def status(self, status: str) -> None:
        pass

    def watchdog(self) -> None:
        pass

    def stopping(self, status: str = "stopping") -> None:
        pass


class Schedule:
    """The schedule file's events, re-read on request (SIGHUP): a bad file keeps the old ones."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.events: list[DemandEvent] = [] if path is None else load_schedule(path)

    def reload(self) -> None:
        if self.path is None:
            return
        try:
            self.events = load_schedule(self.path)
            log.info("site_schedule_reloaded", events=len(self.events), file=str(self.path))
        except DemandError as exc:
            log.error("site_schedule_refused", error=str(exc), kept=len(self.events))

    def __call__(self) -> list[DemandEvent]:
        return list(self.events)


class SiteService:
    def __init__(
        self,
        config: SiteConfig,
        listen: str | None = None,
        store: Store | None = None,
        wall: Clock | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        """`store`, `wall`: etcd and the system clock unless given (tests); `heartbeat`: the
        supervisor's (systemd's notify protocol), none unless given."""
        self.config = config
        self.heartbeat: Heartbeat = heartbeat or NoHeartbeat()
        dr = config.demand_response
        self.schedule = Schedule(None if dr is None else dr.schedule_file)
        self.store: Store = store or open_store(config.etcd)
        member = config.site.replica or default_replica()
        signal_w = None if dr is None or dr.promql is None else promql_signal(dr.promql)
        self.coordinator = Coordinator(
            self.store,
            site_plan(config),
            wall=wall or SystemClock(),
            mono=wall or MonotonicClock(),
            member=member,
            events=self.schedule,
            signal_w=signal_w,
        )
        self.listen = listen or config.site.listen
        self.server: JsonServer | None = None
        self.ven: OpenAdrVen | None = None
        self._wake = threading.Event()
        self._stop = False
        self._reload = False

    # -- HTTP ----------------------------------------------------------------------------------

    def _status(self, _body: Any) -> Reply:
        last = self.coordinator.last
        view = self.coordinator.elector.view()
        body: dict[str, Any] = {
            "coordinator": self.coordinator.member,
            "role": view.role,
            "leader": view.leader,
            "problem": view.problem,
            "round": None if last is None else last.to_json(),
        }
        return Reply(200, body)

    def _event(self, body: Any) -> Reply:
        try:
            event = DemandEvent.from_json(body, "webhook", "body")
        except DemandError as exc:
            return Reply(400, {"error": str(exc)})
        try:
            self.coordinator.post_event(event)
        except StoreError as exc:
            return Reply(503, {"error": f"not stored: {exc}"})
        log.warning("site_demand_response_event", **event.to_json())
        self._wake.set()
        return Reply(202, {"accepted": event.event_id})

    def start_http(self) -> None:
        if self.listen is None:
            return
        token_file = self.config.site.token_file
        if token_file is None:
            raise ConfigError("site.listen: needs site.token_file (the webhook is authenticated)")
        host, port = split_listen(self.listen)
        try:
            self.server = JsonServer(
                host,
                port,
                {("GET", "/v1/status"): self._status, ("POST", "/v1/demand-response"): self._event},
                TokenStore(token_file),
                public=frozenset({("GET", "/v1/status")}),
            ).start()
        except OSError as exc:
            raise ConfigError(f"site.listen: cannot listen on {self.listen} ({exc})") from None

    def start_openadr(self) -> None:
        """The site's OpenADR VEN, when configured: its events are stored as the webhook's."""
        dr = self.config.demand_response
        if dr is None or dr.openadr is None:
            return
        self.ven = OpenAdrVen(
            dr.openadr, self.config.site.limit_w, self._post_openadr, self._floor_w
        ).start()

    def _post_openadr(self, event: DemandEvent) -> None:
        try:
            self.coordinator.post_event(event)
        except StoreError as exc:  # kept in memory for this run all the same
            log.error("site_openadr_event_not_stored", error=str(exc), event=event.event_id)
        self._wake.set()

    def _floor_w(self) -> float | None:
        """The least the site can draw now: the live clusters' floors, the others as counted."""
        last = self.coordinator.last
        if last is None:
            return None
        floors = [c["floor_w"] if c["live"] else c["counted_w"] for c in last.clusters.values()]
        return None if any(f is None for f in floors) else float(sum(floors))

    # -- the loop ------------------------------------------------------------------------------

    def round(self) -> None:
        report = self.coordinator.step()
        if report is None:
            return
        summary = round_summary(report)
        level = log.warning if report.problems or not report.fits else log.info
        level("site_round", **summary)

    def serve(self) -> int:
        self.start_http()
        self.start_openadr()
        log.info(
            "site_started",
            site=self.config.site.name,
            member=self.coordinator.member,
            clusters=list(self.config.clusters),
            interval_s=self.config.site.interval_s,
            listen=None if self.server is None else self.server.url,
            pid=os.getpid(),
        )

        def on_stop(_signum: int, _frame: FrameType | None) -> None:
            self._stop = True
            self._wake.set()

        def on_hup(_signum: int, _frame: FrameType | None) -> None:
            self._reload = True
            self._wake.set()

        previous = {
            signal.SIGTERM: signal.signal(signal.SIGTERM, on_stop),
            signal.SIGINT: signal.signal(signal.SIGINT, on_stop),
            signal.SIGHUP: signal.signal(signal.SIGHUP, on_hup),
        }
        try:
            self._rounds()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.heartbeat.stopping()
            self.close()
        log.info("site_stopped", member=self.coordinator.member)
        return 0

    def _rounds(self) -> None:
        first = True
        while not self._stop:
            if self._reload:
                self._reload = False
                self.schedule.reload()
            self.round()
            if first:  # ready once it has tried a round (etcd may still be down: it says so)
                self.heartbeat.ready(self.status_line())
                first = False
            else:
                self.heartbeat.status(self.status_line())
            self._pause(self.config.site.interval_s)

    def _pause(self, seconds: float) -> None:
        """Wait for the next round (or a wake), feeding the watchdog meanwhile: a round that
        hangs stops the feeding, and systemd restarts the coordinator."""
        self.heartbeat.watchdog()
        watchdog_s = self.heartbeat.watchdog_s
        slice_s = seconds if watchdog_s is None else min(seconds, watchdog_s / 2.0)
        deadline = time.monotonic() + seconds
        while (left_s := deadline - time.monotonic()) > 0:
            if self._wake.wait(min(left_s, slice_s)):
                break
            self.heartbeat.watchdog()
        self._wake.clear()

    def status_line(self) -> str:
        """One line for `systemctl status`: the role, and the last round's outcome."""
        view = self.coordinator.elector.view()
        last = self.coordinator.last
        if not view.may_act or last is None:  # a standby's last round, if any, is old news
            outcome = view.problem or (f"{view.leader} leads" if view.leader else "no round yet")
        else:
            limits = "limits kept" if last.fits else "A LIMIT IN QUESTION"
            outcome = (
                f"round {last.epoch}: limit {last.limit_w:.0f} W, {len(last.grants_w)} grants, "
                f"{limits}, {len(last.problems)} problems"
            )
        return f"site {self.config.site.name}, {view.role}: {outcome}"

    def close(self) -> None:
        if self.ven is not None:
            self.ven.stop()
        if self.server is not None:
            self.server.stop()
        self.coordinator.elector.resign()
        self.store.close()

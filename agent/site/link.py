"""The agent's side of the site: its budget (the grant, kept through its lease, then the safe
share) and its leadership (may this replica act?), both kept up by one background thread.

The cycle never waits on etcd: `read_budget`, `oriented` and `standing` read and write memory
only. The thread renews the session and the election every third of the leader TTL (sooner when
a watch on the cluster's keys fires), reads the grant, and as leader publishes the demand curve
built from the newest Situation (attached to its session: it vanishes with the leader).

Keys, under `{prefix}/clusters/{cluster}/`: `leader`, `members/{replica}`, `curve` (ours),
`grant` (the coordinator's).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import structlog

from agent.core.clock import Clock
from agent.core.coordination import BudgetReading, Standing
from agent.core.situation import Situation
from agent.core.snapshot import Snapshot
from agent.node.auth import TokenStore
from agent.site.curve import DemandCurve, build_curve
from agent.site.election import Elector, Leadership, PeerPinger
from agent.site.grants import BudgetView, Grant, GrantError, GrantKeeper
from agent.site.http import JsonServer, Reply
from agent.site.store import Store, StoreError

log = structlog.get_logger("ooda.site.link")


def cluster_prefix(site_prefix: str, cluster: str) -> str:
    return f"{site_prefix}/clusters/{cluster}"


@dataclass(frozen=True)
class LinkSettings:
    site_prefix: str  # e.g. /ooda/sites/hall1
    cluster: str
    replica: str
    safe_share_w: float
    leader_ttl_s: int
    local_budget_w: float | None = None  # the cluster's own budget (the lower one holds)
    margin_frac: float = 0.01  # as power_budget: the share of a budget held back
    peer_url: str | None = None
    campaign: bool = True
    rise_delay_s: float = 0.0  # see GrantKeeper: one cycle interval and the clocks' skew


class SiteLink:
    """The BudgetSource and LeaderElection of an agent in a site (agent.core.coordination)."""

    def __init__(
        self,
        store: Store,
        settings: LinkSettings,
        *,
        wall: Clock,
        mono: Clock,
        pinger: PeerPinger | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.prefix = cluster_prefix(settings.site_prefix, settings.cluster)
        self.keeper = GrantKeeper(
            settings.cluster, settings.safe_share_w, wall, mono, settings.rise_delay_s
        )
        self.elector = Elector(
            store,
            prefix=self.prefix,
            member=settings.replica,
            ttl_s=settings.leader_ttl_s,
            mono=mono,
            peer_url=settings.peer_url,
            pinger=pinger,
            campaign=settings.campaign,
        )
        self.mono = mono
        self.wall = wall
        self._oriented_unix: float | None = None
        self._lock = threading.Lock()
        self._situation: Situation | None = None
        self._budget: BudgetView | None = None
        self._store_problem: str | None = None
        self._lost_since: float | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cancels: list[Callable[[], None]] = []
        self._last_role: str | None = None
        self._servers: list[JsonServer] = []
        self._built: tuple[Situation, int, DemandCurve] | None = None  # see _curve

    # -- the cycle's side (memory only) ----------------------------------------------------

    def read_budget(self, snapshot: Snapshot) -> BudgetReading:
        with self._lock:
            view = self.keeper.view(self._store_problem)
            self._budget = view
        watts = view.watts
        local = self.settings.local_budget_w
        if local is not None and (watts is None or local < watts):
            watts = local
        return BudgetReading(watts, view.problem)

    def oriented(self, situation: Situation) -> None:
        with self._lock:
            self._situation = situation
            self._oriented_unix = self.wall.now()

    def standing(self) -> Standing:
        view = self.elector.view()
        if view.role != self._last_role:
            log.warning("site_leadership", cluster=self.settings.cluster, role=view.role,
                        leader=view.leader, replica=self.settings.replica)  # fmt: skip
            self._last_role = view.role
        problem = view.problem
        if not view.may_act and problem is None:
            problem = (
                f"standby: {view.leader or 'no replica'} leads cluster {self.settings.cluster}"
            )
        return Standing(view.may_act, problem)

    def leadership(self) -> Leadership:
        return self.elector.view()

    def last_budget(self) -> BudgetView | None:
        """The budget the last cycle read (None: no cycle yet)."""
        with self._lock:
            return self._budget

    def serves(self, settings: LinkSettings) -> bool:
        """Whether this running link can serve `settings` (a reload's): the same site, cluster,
        replica, election and peers; only the cluster's own budget and the rise delay differ."""
        kept = replace(
            self.settings,
            local_budget_w=settings.local_budget_w,
            rise_delay_s=settings.rise_delay_s,
        )
        return kept == settings

    def retune(self, settings: LinkSettings) -> None:
        """Take a reload's cluster budget and rise delay (`serves` said the rest is the same)."""
        if not self.serves(settings):
            raise ValueError("retune: another site, cluster, replica or election")
        with self._lock:
            self.settings = settings
            self.keeper.rise_delay_s = settings.rise_delay_s

    # -- the thread's side -------------------------------------------------------------------

    def step(self) -> None:
        """One round with the store: election, grant, curve. Never raises."""
        self.elector.step()
        try:
            raw = self.store.get(f"{self.prefix}/grant")
            if raw is not None:
                self._take_grant(raw)
            self._publish()
            self._contact(None)
        except StoreError as exc:
            self._contact(str(exc))

    def _take_grant(self, raw: str) -> None:
        try:
            grant = Grant.from_json(json.loads(raw))
        except (ValueError, GrantError) as exc:
            log.error("site_grant_unreadable", cluster=self.settings.cluster, error=str(exc))
            return
        with self._lock:
            taken = self.keeper.offer(grant)
        if taken:
            log.info("site_grant", cluster=self.settings.cluster, watts=grant.watts,
                     epoch=grant.epoch, lease_s=grant.lease_s)  # fmt: skip

    def _publish(self) -> None:
        elector = self.elector
        if not elector.is_leader or elector.lease_id is None:
            return
        with self._lock:
            situation, budget, oriented = self._situation, self._budget, self._oriented_unix
        if situation is None:
            return
        # The grant the cycle planned under (its epoch confirms it to the coordinator), not a
        # newer one taken since; none under the safe share.
        under_grant = budget is not None and budget.source in {"grant", "grant_kept"}
        planned = budget.grant if budget is not None and under_grant else None
        curve = self._curve(situation, 0 if planned is None else planned.epoch)
        watts = None if budget is None else budget.watts
        record = {
            **curve.to_json(),
            "replica": self.settings.replica,
            "budget_w": watts,
            "budget_source": None if budget is None else budget.source,
            # Whether it can meet its part: its floor fits its budget; and whether it does now.
            "can_meet": None if watts is None else curve.floor_w <= watts,
            "meets": None if watts is None else situation.fleet_power_w <= watts,
            "time_s": situation.time_s,
            "cycle_unix": oriented,  # when the cycle that built it ran (the coordinator's age)
        }
        self.store.put(f"{self.prefix}/curve", json.dumps(record), elector.lease_id)

    def _curve(self, situation: Situation, grant_epoch: int) -> DemandCurve:
        """The curve of this Situation, built once: the thread publishes every third of a TTL
        and on every watch event, a cycle comes once an interval (and at 100,000 GPUs a build
        takes a few hundred milliseconds)."""
        built = self._built
        if built is None or built[0] is not situation or built[1] != grant_epoch:
            curve = build_curve(
                situation, margin_frac=self.settings.margin_frac, grant_epoch=grant_epoch
            )
            built = self._built = (situation, grant_epoch, curve)
        return built[2]

    def _contact(self, error: str | None) -> None:
        now = self.mono.now()
        with self._lock:
            if error is None:
                self._lost_since = None
                self._store_problem = None
                return
            if self._lost_since is None:
                self._lost_since = now
            self._store_problem = f"etcd unreachable for {now - self._lost_since:.0f} s"

    def serve_peers(self, host: str, port: int, tokens: TokenStore) -> JsonServer:
        """The failsafe endpoint other replicas ask during an etcd outage (agent.site.election)."""

        def failsafe(body: Any) -> Reply:
            leader = body.get("leader") if isinstance(body, dict) else None
            if not isinstance(leader, str) or not leader:
                return Reply(400, {"error": "leader: a replica name"})
            if self.elector.promise(leader):
                return Reply(200, {"promised": True, "replica": self.settings.replica})
            return Reply(409, {"error": f"{self.settings.replica} leads"})

        server = JsonServer(host, port, {("POST", "/v1/failsafe"): failsafe}, tokens).start()
        self._servers.append(server)
        return server

    def start(self) -> SiteLink:
        """One round now (the first cycle knows its leadership), then the thread."""
        self.step()
        # A new grant, or the leader key gone (campaign now): not our own curve or membership,
        # whose writes would wake the thread that wrote them.
        for key in ("grant", "leader"):
            try:
                self._cancels.append(
                    self.store.watch_prefix(f"{self.prefix}/{key}", self._wake.set)
                )
            except StoreError as exc:  # no watch: the thread's rounds still come every TTL/3
                log.warning("site_watch_failed", key=key, error=str(exc))
        self._thread = threading.Thread(target=self._run, name="site-link", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        period = self.elector.ttl_s / 3.0
        while not self._stop.is_set():
            self._wake.wait(period)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.step()

    def stop(self, resign: bool = True) -> None:
        """Stop the thread; `resign`: give the leader key up now (a clean stop)."""
        self._stop.set()
        self._wake.set()
        for cancel in self._cancels:
            cancel()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for server in self._servers:
            server.stop()
        if resign:
            self.elector.resign()
        self.store.close()

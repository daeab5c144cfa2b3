"""The site coordinator: each round it reads the clusters' demand curves, splits what the limits
allow (agent.site.tree), and publishes each cluster's grant with a lease.

Safety, in the order it is kept:
- Every limit on every path holds for the grants together with what the other clusters may still
  draw: a cluster without a live curve (its agent gone, or no leader) counts at the larger of its
  unexpired grants and its safe share; a cluster that has not yet planned under a newer, smaller
  grant counts at the larger one it may still be using (make before break: increases wait).
- Grants lapse to a fallback: each grant names the safe share its cluster drops to when it lapses
  (its configured one, scaled down where a demand-response target leaves less: the fallbacks
  under every limit fit it). A grant may be below its fallback (the split is free above the
  clusters' floors): grants of one round lapse together, and an agent whose budget would rise
  at a lapse waits one interval (agent.site.grants), so the ones coming down are down first.
- The limit the grants follow is the tightest of now and `lead_s` ahead: a ramp down reaches the
  grants before it reaches the limit.

Only the leader (leader election among coordinator replicas) publishes. A new leader reads the
grants still in etcd and counts them until they lapse.

Keys under the site prefix: `coordinator/leader`, `coordinator/members/ID`, `status`,
`demand/events/ID` (webhook events, no lease), and each cluster's `clusters/NAME/{curve,grant}`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.core.clock import Clock
from agent.site.curve import CurveError, DemandCurve
from agent.site.demand import DemandError, DemandEvent, SiteTarget, current, site_target
from agent.site.election import Elector
from agent.site.grants import Grant, GrantError
from agent.site.store import Store, StoreError
from agent.site.tree import LimitTree, grants_fit, split, stage_increases

log = structlog.get_logger("ooda.site.coordinator")

# A curve older than this many rounds (or leader TTLs, by its cycle_unix) is not live.
CURVE_MAX_AGE_FACTOR = 3.0
# The share of throughput a new split must add before watts move between clusters.
MIN_GAIN = 0.002


@dataclass(frozen=True)
class ClusterPlan:
    safe_share_w: float
    weight: float = 1.0


@dataclass(frozen=True)
class SitePlan:
    """What the coordinator works from (agent.site.settings.SiteConfig, resolved)."""

    name: str
    prefix: str  # the site's key prefix
    tree: LimitTree
    clusters: Mapping[str, ClusterPlan]
    interval_s: float
    grant_lease_s: float
    clock_skew_s: float
    lead_s: float
    ramp_w_per_s: float | None  # None: no demand response configured
    leader_ttl_s: int


@dataclass
class Issued:
    """A grant published to a cluster and not yet lapsed (by the coordinator's clock + skew)."""

    epoch: int
    watts: float
    until_unix: float


@dataclass(frozen=True)
class ClusterRead:
    curve: DemandCurve | None
    record: Mapping[str, Any]
    problem: str | None = None


@dataclass
class RoundReport:
    time_unix: float
    epoch: int
    limit_w: float  # the site's limit now (demand response applied)
    planned_limit_w: float  # the one the grants follow (the tighter of now and lead_s ahead)
    target: SiteTarget
    grants_w: dict[str, float]
    fallback_w: dict[str, float]
    counted_w: dict[str, float]  # what each cluster may draw, as the limits count it
    clusters: dict[str, dict[str, Any]]
    feasible: bool
    fits: bool  # grants and what is still held keep every limit
    power_w: float | None  # the clusters' measured draw, summed (None: none known)
    target_met: bool | None
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        event = self.target.event
        return {
            "time_unix": round(self.time_unix, 3),
            "epoch": self.epoch,
            "limit_w": round(self.limit_w, 1),
            "planned_limit_w": round(self.planned_limit_w, 1),
            "demand_response": None
            if event is None
            else {
                "event": event.event_id,
                "source": event.source,
                "phase": self.target.phase,
                "target_w": self.target.target_w,
            },
            "grants_w": self.grants_w,
            "fallback_w": {k: round(v, 1) for k, v in self.fallback_w.items()},
            "counted_w": {k: round(v, 1) for k, v in self.counted_w.items()},
            "clusters": self.clusters,
            "feasible": self.feasible,
            "fits": self.fits,
            "power_w": None if self.power_w is None else round(self.power_w, 1),
            "target_met": self.target_met,
            "problems": self.problems,
        }


def fallback_shares(tree: LimitTree, safe_w: Mapping[str, float]) -> dict[str, float]:
    """Each cluster's safe share, scaled down where the safe shares under a limit exceed it."""
    sums = tree.sums(safe_w)
    scale = {
        n: 1.0 if sums[n] <= 0 else min(1.0, tree.nodes[n].limit_w / sums[n]) for n in tree.nodes
    }
    return {c: w * min(scale[n] for n in tree.paths[c]) for c, w in safe_w.items()}


class Coordinator:
    def __init__(
        self,
        store: Store,
        plan: SitePlan,
        *,
        wall: Clock,
        mono: Clock,
        member: str,
        events: Callable[[], list[DemandEvent]] | None = None,
        signal_w: Callable[[], float | None] | None = None,
    ) -> None:
        """`events`: the scheduled ones (a file; the webhook's come from the store); `signal_w`:
        a target read now (PromQL), ramped from the last round's limit."""
        self.store = store
        self.plan = plan
        self.wall = wall
        self.mono = mono
        self.member = member
        self.events = events or list
        self.signal_w = signal_w
        self.elector = Elector(
            store, prefix=f"{plan.prefix}/coordinator", member=member, ttl_s=plan.leader_ttl_s,
            mono=mono,
        )  # fmt: skip
        self.epoch = 0
        self.issued: dict[str, list[Issued]] = {c: [] for c in plan.tree.clusters}
        self._signal_limit_w: float | None = None
        self._signal_at: float | None = None
        self.last: RoundReport | None = None
        self._seeded = False

    # -- reading ---------------------------------------------------------------------------

    def _read(self) -> tuple[dict[str, ClusterRead], dict[str, Grant], list[DemandEvent]]:
        raw = self.store.get_prefix(f"{self.plan.prefix}/")
        reads: dict[str, ClusterRead] = {}
        grants: dict[str, Grant] = {}
        for cluster in self.plan.tree.clusters:
            base = f"{self.plan.prefix}/clusters/{cluster}/"
            reads[cluster] = self._curve(raw.get(base + "curve"))
            text = raw.get(base + "grant")
            if text is not None:
                try:
                    grants[cluster] = Grant.from_json(json.loads(text))
                except (ValueError, GrantError) as exc:
                    log.error("site_grant_unreadable", cluster=cluster, error=str(exc))
        events = []
        for key, text in raw.items():
            if key.startswith(f"{self.plan.prefix}/demand/events/"):
                try:
                    events.append(DemandEvent.from_json(json.loads(text), "webhook"))
                except (ValueError, DemandError) as exc:
                    log.error("site_event_unreadable", key=key, error=str(exc))
        return reads, grants, events

    def _curve(self, text: str | None) -> ClusterRead:
        if text is None:
            return ClusterRead(None, {}, "no curve (no agent leads it)")
        try:
            record = json.loads(text)
            curve = DemandCurve.from_json(record)
        except (ValueError, CurveError) as exc:
            return ClusterRead(None, {}, f"curve unusable: {exc}")
        # A leader whose cycles stopped still holds its session: its curve ages.
        cycle = record.get("cycle_unix")
        max_age = CURVE_MAX_AGE_FACTOR * max(self.plan.interval_s, self.plan.leader_ttl_s)
        age = self.wall.now() - cycle if isinstance(cycle, int | float) else None
        if age is not None and age > max_age + self.plan.clock_skew_s:
            return ClusterRead(None, record, f"curve {age:.0f} s old (its cycles stopped?)")
        return ClusterRead(curve, record)

    def _seed(self, grants: Mapping[str, Grant]) -> None:
        """A new leader: the grants in etcd are counted until they lapse; epochs go on."""
        for cluster, grant in grants.items():
            if cluster not in self.issued:
                continue
            until = grant.expires_unix + self.plan.clock_skew_s
            self.issued[cluster].append(Issued(grant.epoch, grant.watts, until))
            self.epoch = max(self.epoch, grant.epoch)
        self._seeded = True

    # -- the split ---------------------------------------------------------------------------

    def _limits(self, now: float, events: list[DemandEvent]) -> tuple[SiteTarget, float, float]:
        """(target now, the limit now, the limit the grants follow)."""
        plan = self.plan
        static = plan.tree.nodes[plan.tree.root].limit_w
        if plan.ramp_w_per_s is None:
            target = SiteTarget(static, None, "normal", None)
            return target, static, static
        ramp = plan.ramp_w_per_s
        target = site_target(events, now, static, ramp)
        ahead = site_target(events, now + plan.lead_s, static, ramp)
        now_w, planned_w = target.limit_w, min(target.limit_w, ahead.limit_w)
        signal = self._signal(now, ramp)
        if signal is not None and signal < now_w:
            event = DemandEvent("promql", now, plan.interval_s, signal, "promql")
            target = SiteTarget(signal, event, "holding", signal)
            now_w = signal
            planned_w = min(planned_w, signal)
        return target, now_w, planned_w

    def _signal(self, now: float, ramp: float) -> float | None:
        """The PromQL target, moving from the last round's at most `ramp` W/s either way."""
        if self.signal_w is None:
            return None
        try:
            wanted = self.signal_w()
        except Exception as exc:
            log.error("site_signal_failed", error=str(exc))
            wanted = None
        last, at = self._signal_limit_w, self._signal_at
        if wanted is None:
            return last  # keep the last target while the signal is missing
        if last is None or at is None:
            level = wanted
        else:
            step = ramp * max(now - at, 0.0)
            level = min(max(wanted, last - step), last + step)
        self._signal_limit_w, self._signal_at = level, now
        return level

    def _held(self, cluster: str, acked: int, now: float) -> float:
        """The most a cluster may still draw by the grants it may be using: those not lapsed and
        not older than the one it has confirmed planning under."""
        self.issued[cluster] = [g for g in self.issued[cluster] if g.until_unix > now]
        return max((g.watts for g in self.issued[cluster] if g.epoch >= acked), default=0.0)

    def _steady(
        self,
        limits: LimitTree,
        curves: Mapping[str, DemandCurve],
        fixed: Mapping[str, float],
        weights: Mapping[str, float],
        wanted_w: dict[str, float],
        wanted_value: float,
    ) -> dict[str, float]:
        """The last round's grants again, where they still fit and the new split would buy
        less than MIN_GAIN more: moving watts costs a round of waiting (make before break), so
        small gains are not worth it."""
        last = self.last
        if last is None or set(last.grants_w) != set(wanted_w):
            return wanted_w
        current = last.grants_w
        if not grants_fit(limits, current, fixed):
            return wanted_w
        if any(current[c] < curves[c].floor_w for c in current):
            return wanted_w
        value = sum(weights.get(c, 1.0) * curves[c].value_at(w) for c, w in current.items())
        if wanted_value - value > MIN_GAIN * max(value, 1e-9):
            return wanted_w
        return dict(current)

    def plan_round(
        self, reads: Mapping[str, ClusterRead], events: list[DemandEvent], now: float
    ) -> RoundReport:
        """The split and its staging, pure but for the coordinator's memory of what it issued."""
        plan = self.plan
        target, now_w, planned_w = self._limits(now, events)
        limits = plan.tree.with_limits({plan.tree.root: planned_w})
        safe = {c: p.safe_share_w for c, p in plan.clusters.items()}
        fallback = fallback_shares(limits, safe)
        fixed: dict[str, float] = {}
        held: dict[str, float] = {}
        curves: dict[str, DemandCurve] = {}
        for cluster in plan.tree.clusters:
            read = reads[cluster]
            if read.curve is None:
                unexpired = self._held(cluster, 0, now)
                fixed[cluster] = max(unexpired, safe[cluster])
                continue
            held[cluster] = self._held(cluster, read.curve.grant_epoch, now)
            if read.curve.grant_epoch == 0:  # it plans under its safe share (no grant yet)
                held[cluster] = max(held[cluster], safe[cluster])
            curves[cluster] = read.curve
        weights = {c: p.weight for c, p in plan.clusters.items()}
        wanted = split(limits, curves, fixed, weights)
        target_w = self._steady(limits, curves, fixed, weights, wanted.grants_w, wanted.value)
        grants = stage_increases(limits, target_w, held, fixed)
        counted = {**fixed, **{c: max(grants[c], held[c]) for c in grants}}
        # What may still be drawn must keep the limits now; the grants, those lead_s ahead.
        limits_now = plan.tree.with_limits({plan.tree.root: now_w})
        return self._report(now, target, now_w, planned_w, reads, grants, fallback, counted,
                            wanted.feasible, limits_now)  # fmt: skip

    def _report(
        self,
        now: float,
        target: SiteTarget,
        now_w: float,
        planned_w: float,
        reads: Mapping[str, ClusterRead],
        grants: dict[str, float],
        fallback: dict[str, float],
        counted: dict[str, float],
        feasible: bool,
        limits: LimitTree,
    ) -> RoundReport:
        clusters: dict[str, dict[str, Any]] = {}
        problems: list[str] = []
        power: list[float] = []
        for cluster, read in reads.items():
            record = read.record
            fleet = record.get("fleet_power_w") if read.curve is not None else None
            if isinstance(fleet, int | float):
                power.append(float(fleet))
            clusters[cluster] = {
                "live": read.curve is not None,
                "grant_w": grants.get(cluster),
                "counted_w": round(counted.get(cluster, 0.0), 1),
                "floor_w": None if read.curve is None else round(read.curve.floor_w, 1),
                "ceiling_w": None if read.curve is None else round(read.curve.ceiling_w, 1),
                "power_w": fleet,
                "budget_w": record.get("budget_w"),
                "can_meet": record.get("can_meet"),
                "meets": record.get("meets"),
                "leader": record.get("replica"),
                "problem": read.problem,
            }
            if read.problem is not None:
                problems.append(f"cluster {cluster}: {read.problem}")
            elif record.get("can_meet") is False:
                problems.append(f"cluster {cluster}: cannot meet its budget (floor above it)")
        fits = grants_fit(limits, counted)
        if not fits:
            problems.append(
                "what the clusters may still draw (grants they have not yet confirmed planning "
                "past) exceeds a limit: increases wait"
            )
        if not feasible:
            problems.append("the clusters' floors do not fit the limits: each got a share")
        measured = sum(power) if power else None
        met = None if measured is None else measured <= now_w
        if target.event is not None and met is False:
            problems.append(
                f"demand response {target.event.event_id}: the site draws {measured:.0f} W, "
                f"above its target {now_w:.0f} W"
            )
        return RoundReport(now, self.epoch + 1, now_w, planned_w, target, grants, fallback,
                           counted, clusters, feasible, fits, measured, met, problems)  # fmt: skip

    # -- one round -----------------------------------------------------------------------------

    def step(self) -> RoundReport | None:
        """The election, then (as leader) one round: read, split, publish. None: not the leader
        or etcd unreachable (said in the log)."""
        self.elector.step()
        view = self.elector.view()
        if not view.may_act or view.role == "failsafe_leader":
            # Grants need etcd to reach anyone: without it there is nothing to publish.
            self._seeded = False  # leading again, it reads what another leader granted
            if view.problem:
                log.warning("site_coordinator_waiting", role=view.role, problem=view.problem)
            return None
        now = self.wall.now()
        try:
            reads, grants, stored = self._read()
            if not self._seeded:
                self._seed(grants)
            events = current([*self.events(), *stored], now, self._keep_s())
            report = self.plan_round(reads, events, now)
            self._publish(report)
        except StoreError as exc:
            log.error("site_round_failed", error=str(exc))
            return None
        self.last = report
        return report

    def _keep_s(self) -> float:
        plan = self.plan
        if plan.ramp_w_per_s is None:
            return 0.0
        return plan.tree.nodes[plan.tree.root].limit_w / plan.ramp_w_per_s + plan.lead_s

    def _publish(self, report: RoundReport) -> None:
        plan = self.plan
        lease = self.store.lease(max(2, round(plan.grant_lease_s + plan.clock_skew_s)))
        self.epoch = report.epoch
        for cluster, watts in report.grants_w.items():
            grant = Grant(cluster, watts, self.epoch, report.time_unix, plan.grant_lease_s,
                          self.member, round(report.fallback_w[cluster], 1))  # fmt: skip
            self.store.put(
                f"{plan.prefix}/clusters/{cluster}/grant", json.dumps(grant.to_json()), lease
            )
            until = report.time_unix + plan.grant_lease_s + plan.clock_skew_s
            self.issued[cluster].append(Issued(self.epoch, watts, until))
        status = {**report.to_json(), "coordinator": self.member}
        self.store.put(f"{plan.prefix}/status", json.dumps(status), lease)

    def post_event(self, event: DemandEvent) -> None:
        """A webhook's event, kept in etcd (a new leader has it too) until it has passed."""
        ttl = max(2, round(event.end_unix - self.wall.now() + self._keep_s()))
        lease = self.store.lease(ttl)
        self.store.put(
            f"{self.plan.prefix}/demand/events/{event.event_id}",
            json.dumps(event.to_json()),
            lease,
        )


def round_summary(report: RoundReport) -> dict[str, Any]:
    """The round's log line."""
    return {
        "epoch": report.epoch,
        "limit_w": round(report.limit_w, 1),
        "planned_limit_w": round(report.planned_limit_w, 1),
        "grants_w": report.grants_w,
        "power_w": None if report.power_w is None else round(report.power_w, 1),
        "target_met": report.target_met,
        "fits": report.fits,
        "feasible": report.feasible,
        "problems": report.problems or None,
        "at": time.strftime("%H:%M:%S", time.gmtime(report.time_unix)),
    }

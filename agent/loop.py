"""One cycle of the OODA loop: observe -> orient -> decide -> guard -> act.

Dry-run runs exactly this path; only the executor hands the intents to recorders instead of the
actuators. Nothing here sleeps or reads the wall clock: time comes from the injected Clock.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from agent.act.audit import AuditLog
from agent.act.executor import Executor
from agent.act.guard import Guard, Refusal, Review
from agent.core.clock import Clock, as_time_s
from agent.core.coordination import ActGate, BudgetSource
from agent.core.intents import (
    Action,
    GpuTargets,
    Intent,
    Outcome,
    ReleasePowerCap,
    SetPowerCap,
)
from agent.core.keyed import RowIndex
from agent.core.protocols import (
    CapLeaseAdopter,
    CapLeaseRenewer,
    PlacementActuator,
    TelemetrySource,
)
from agent.core.situation import NodeStates, Situation
from agent.core.snapshot import Metric, Snapshot, screen_implausible
from agent.orient.orienter import Orienter
from policies.base import Policy, PolicyMemory
from policies.conflicts import Overridden, Resolution, resolve

log = structlog.get_logger("ooda.loop")

STAGES = ("observe", "orient", "decide", "guard", "act")


@dataclass
class CycleReport:
    cycle: int
    time_s: float
    snapshot: Snapshot
    situation: Situation
    intents: list[Intent]  # after conflict resolution, before the guard
    overridden: list[Overridden]
    refused: list[Refusal]
    actions: list[Action]
    unchanged: int
    stage_s: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    # Cap changes whose outcome was not known, settled this cycle: GPUs per result (adopted,
    # released, not_in_force, given_up; see Guard.adopt_pending).
    settled: dict[str, int] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return sum(self.stage_s.values())

    def summary(self) -> dict[str, Any]:
        snap = self.snapshot
        power, power_ok = snap.column(Metric.POWER_W)
        return {
            "cycle": self.cycle,
            "time_s": self.time_s,
            "gpus": snap.n_gpus,
            "nodes": snap.n_nodes,
            "stale": int(snap.stale.sum()),
            "missing": int((snap.fresh & ~power_ok).sum()),
            "fleet_power_w": round(self.situation.fleet_power_w, 1),
            "budget_w": self.situation.budget_w,
            "intents": sum(_count(i) for i in self.intents),
            "refused": sum(_count(r.intent) for r in self.refused),
            "actions": {
                o.value: sum(_count(a.intent) for a in self.actions if a.outcome is o)
                for o in Outcome
            },
            "stage_s": {k: round(v, 6) for k, v in self.stage_s.items()},
            "errors": self.errors,
            "power_total_w": float(np.nansum(np.where(power_ok, power, 0.0))),
        }


def _count(intent: Intent) -> int:
    targets = getattr(intent, "targets", None)
    return len(targets) if targets is not None else 1


class Loop:
    def __init__(
        self,
        *,
        source: TelemetrySource,
        orienter: Orienter,
        policies: Sequence[Policy],
        guard: Guard,
        executor: Executor,
        audit: AuditLog,
        clock: Clock,
        budget_w: Callable[[Snapshot], float | None] | BudgetSource | float | None = None,
        placement: PlacementActuator | None = None,
        dry_run_caps: bool = False,
        run_id: str | None = None,
        interval_s: float = 15.0,
        gate: ActGate | None = None,
        on_takeover: Callable[[float | None], None] | None = None,
    ) -> None:
        """`budget_w` may come from a coordinator (a BudgetSource: its grant); `gate` says
        whether this replica may act (leader election): while it may not, cycles observe and
        orient only (the models stay warm), and the first cycle allowed again first calls
        `on_takeover` with the last time this loop acted (None: never), to read what another
        replica did meanwhile (agent.act.recovery, as after a restart)."""
        self.source = source
        self.orienter = orienter
        self.policies = list(policies)
        self.guard = guard
        self.executor = executor
        self.audit = audit
        self.clock = clock
        self.budget_w = budget_w
        self.placement = placement
        self.dry_run_caps = dry_run_caps
        self.interval_s = interval_s
        self.gate = gate
        self.on_takeover = on_takeover
        self.last_acted_s: float | None = None
        self.run_id = run_id or secrets.token_hex(3)
        self.memory: dict[str, PolicyMemory] = {p.name: p.Memory() for p in self.policies}
        self.cycles = 0
        self._ids = itertools.count(1)
        self._last_now: float | None = None  # the previous cycle's time: a jump back shows

    def to_dict(self) -> dict[str, Any]:
        """The last cycle's time, so a restart after the clock went back sees the jump."""
        return {"last_cycle_s": self._last_now}

    def load_dict(self, data: Mapping[str, Any]) -> None:
        last = data.get("last_cycle_s")
        last_s = as_time_s(last)
        if last is not None and last_s is None:
            raise ValueError(f"last_cycle_s: not a time: {last!r}")
        self._last_now = last_s

    def _adopt_pending(self, situation: Situation, now: float, errors: list[str]) -> dict[str, int]:
        """Settle the cap changes whose outcome is not known (found in the audit log after a
        restart, agent.act.recovery, or from a cap call that failed) against this cycle's
        telemetry, on the record; GPUs per result."""
        settled = self.guard.adopt_pending(situation, now)
        if settled is None:
            return {}
        caps: object = self.executor.actuators.caps
        if settled.rows.size and not self.dry_run_caps and isinstance(caps, CapLeaseAdopter):
            caps.adopt_leases(GpuTargets.from_rows(situation.snapshot, settled.rows), settled.watts)
        try:
            with self.audit.batch():
                self.audit.event("guard_caps_recovered", time_s=now, **settled.event)
        except OSError as exc:
            errors.append(
                f"audit log unwritable ({exc.strerror or exc}): what became of the caps "
                "whose outcome was not known was not recorded"
            )
        counts = {k: len(v) for k, v in settled.event.items()}
        log.warning("guard_caps_recovered", **counts)
        return counts

    def _renew_leases(self, errors: list[str]) -> None:
        """Caps are leases: renew the live ones every cycle, or the nodes fall back to their safe
        cap. Renewals are not decisions, so they are not audited; failures are reported."""
        caps: object = self.executor.actuators.caps  # any cap actuator may also renew leases
        if self.dry_run_caps or not isinstance(caps, CapLeaseRenewer):
            return
        try:
            renewed, result = caps.renew_leases(self.executor.lease_s)
        except Exception as exc:  # one bad node daemon must not stop the cycle
            errors.append(f"lease renewal failed: {exc}")
            log.error("lease_renewal_failed", error=str(exc))
            return
        failed = ~result.ok
        if failed.any():
            why = "; ".join(sorted(set(result.errors.values()))[:3])
            errors.append(
                f"lease renewal failed for {int(failed.sum())} of {len(renewed)} GPUs: {why}"
            )
            log.error("lease_renewal_failed", gpus=int(failed.sum()), errors=why)

    def _budget(self, snapshot: Snapshot, errors: list[str]) -> float | None:
        if isinstance(self.budget_w, BudgetSource):
            try:
                reading = self.budget_w.read_budget(snapshot)
            except Exception as exc:  # no budget is explicit: nothing budget-related is done
                errors.append(f"budget unavailable: {exc}")
                log.error("budget_unavailable", error=str(exc))
                return None
            if reading.problem is not None:  # e.g. a lapsed grant: said every cycle it holds
                errors.append(f"site: {reading.problem}")
            return reading.watts
        if callable(self.budget_w):
            return self.budget_w(snapshot)
        if self.budget_w is not None:
            return float(self.budget_w)
        return snapshot.budget_w

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}-{self.run_id}-{self.cycles:06d}-{next(self._ids):04d}"

    def _act(
        self, resolution: Resolution, review: Review, now: float, errors: list[str]
    ) -> list[Action]:
        """Audit what was decided, durably, then act: no actuator is called for a decision whose
        record could not be written (a full disk under the audit log), and the cycle says so."""
        decision_ids: dict[int, str] = {}

        def decision_id(intent: Intent) -> str:
            return decision_ids.setdefault(id(intent), self._next_id("d"))

        written = sum(self.audit.counts.values())
        try:
            with self.audit.batch():
                for name, fields in review.events:  # the guard's own: breaker tripped, reset
                    self.audit.event(name, **fields)
                # A decision is audited when something comes of it: an action, a refusal, or
                # the guard's own. Desired state re-asserted every cycle and already in place
                # (within the dead band) changes nothing and is only counted, or the log would
                # grow by every GPU every cycle.
                effective = {id(o) for o in [*review.origin, *review.raised]} | {
                    id(r.origin or r.intent) for r in review.refused
                }
                for intent in [*resolution.intents, *review.raised]:
                    if id(intent) in effective:
                        self.audit.decision(
                            decision_id(intent), intent, self.executor.dry_run(intent), now
                        )
                for over in resolution.overridden:
                    self.audit.refusal(
                        decision_id(over.intent),
                        over.intent,
                        f"overridden: {over.reason}",
                        self.executor.dry_run(over.intent),
                        now,
                    )
                for refusal in review.refused:
                    origin = refusal.origin or refusal.intent
                    self.audit.refusal(
                        decision_id(origin),
                        refusal.intent,
                        refusal.reason,
                        self.executor.dry_run(origin),
                        now,
                    )
                if sum(self.audit.counts.values()) != written:
                    self.audit.flush()  # the decisions are on disk before any actuator runs
        except OSError as exc:
            message = (
                f"audit log unwritable ({exc.strerror or exc}): not acting on "
                f"{len(review.allowed)} allowed intents until their records can be written"
            )
            errors.append(message)
            log.error("audit_unwritable_not_acting", error=str(exc), intents=len(review.allowed))
            return []
        actions = self.executor.execute(
            [
                (decision_id(origin), intent)
                for intent, origin in zip(review.allowed, review.origin, strict=True)
            ],
            lambda: self._next_id("a"),
            now,
        )
        for action in actions:
            self.guard.record(action, now)
        try:
            with self.audit.batch():
                for action in actions:
                    self.audit.action(action)
        except OSError as exc:
            # Done is done: the guard knows, and each action's decision is on record.
            message = (
                f"audit log unwritable ({exc.strerror or exc}): the outcomes of "
                f"{len(actions)} actions were not recorded (their decisions were)"
            )
            errors.append(message)
            log.error("audit_actions_unwritable", error=str(exc), actions=len(actions))
        return actions

    def _clock_check(self, now: float, errors: list[str]) -> None:
        """Before the policies decide: after a jump back, their holds restart from now, as the
        guard's do."""
        if self._last_now is not None and now < self._last_now:
            ahead = self.guard.clock_went_back(now)
            self.memory = {n: m.clock_went_back(now) for n, m in self.memory.items()}
            errors.append(
                f"the clock went back {self._last_now - now:.0f} s: cooldowns, drain "
                f"windows and policy holds restart from now ({ahead:.0f} s of the guard's "
                "were ahead)"
            )
            log.error("clock_went_back", by_s=self._last_now - now)
        self._last_now = now

    def _observe(self, now: float, errors: list[str]) -> tuple[Snapshot, NodeStates | None]:
        """The fleet and what the placement system says of its nodes; outages explicit."""
        try:
            snapshot = self.source.observe(now)
        except Exception as exc:  # an outage is explicit: no GPUs seen, and why
            message = f"observe failed: {exc}"
            log.error("observe_failed", error=str(exc), error_type=type(exc).__name__)
            snapshot = Snapshot.empty(now, errors=(message,))
        snapshot = screen_implausible(snapshot)  # a broken exporter's values are not believed
        errors.extend(snapshot.errors)
        nodes: NodeStates | None = None
        if self.placement is not None and snapshot.n_nodes:
            try:
                nodes = self.placement.node_states(list(snapshot.node_names))
            except Exception as exc:
                errors.append(f"placement state unavailable: {exc}")
                log.error("node_states_failed", error=str(exc))
        return snapshot, nodes

    def _may_act(self, now: float, errors: list[str]) -> bool:
        """Ask the gate (none: always); on a takeover, read what the other replica did first."""
        if self.gate is None:
            return True
        try:
            state = self.gate.check()
        except Exception as exc:  # an unanswerable gate means: do not act
            errors.append(f"leadership unknown ({exc}): not acting")
            log.error("gate_failed", error=str(exc))
            return False
        _standby_note(errors, state.problem)
        if state.may_act and state.took_over and self.on_takeover is not None:
            log.warning("took_over", last_acted_s=self.last_acted_s, time_s=now)
            self.on_takeover(self.last_acted_s)
        return state.may_act

    def _standby_report(
        self,
        now: float,
        snapshot: Snapshot,
        situation: Situation,
        stage_s: dict[str, float],
        errors: list[str],
    ) -> CycleReport:
        """A cycle that may not act: it observed and oriented (the models learned), and stops
        there; the clock's last time still moves (a jump back shows when it leads again)."""
        self._last_now = now
        return CycleReport(
            cycle=self.cycles,
            time_s=now,
            snapshot=snapshot,
            situation=situation,
            intents=[],
            overridden=[],
            refused=[],
            actions=[],
            unchanged=0,
            stage_s=stage_s,
            errors=errors,
        )

    def cycle(self) -> CycleReport:
        self.cycles += 1
        now = self.clock.now()
        stage_s: dict[str, float] = {}
        errors: list[str] = []

        @contextmanager
        def stage(name: str) -> Iterator[None]:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                stage_s[name] = time.perf_counter() - t0

        with stage("observe"):
            snapshot, nodes = self._observe(now, errors)

        with stage("orient"):
            situation = self.orienter.orient(snapshot, self._budget(snapshot, errors), nodes)
            if isinstance(self.budget_w, BudgetSource):
                self.budget_w.oriented(situation)
            if not self._may_act(now, errors):
                return self._standby_report(now, snapshot, situation, stage_s, errors)
            settled = self._adopt_pending(situation, now, errors)
            # What the agent itself set: policies undo only their own caps.
            situation = replace(
                situation,
                capped_by_us=self.guard.capped_by_us(snapshot.uuid, self.dry_run_caps),
                interval_s=self.interval_s,
            )

        with stage("decide"):
            self._clock_check(now, errors)
            proposed: list[Intent] = []
            for policy in self.policies:
                try:
                    decision = policy.decide(situation, self.memory[policy.name], now)
                except Exception as exc:  # one broken policy must not stop the others
                    errors.append(f"policy {policy.name} failed: {exc}")
                    log.exception("policy_failed", policy=policy.name)
                    continue
                self.memory[policy.name] = decision.memory
                proposed.extend(decision.intents)
            asserted = _asserted_caps(snapshot, self.guard.rows(snapshot), proposed)
            outlived = self.guard.caps_outlived(snapshot, asserted, self.dry_run_caps)
            if outlived.any():
                proposed.append(
                    ReleasePowerCap(
                        policy="ownership",
                        reason="the job this cap was chosen for has left the GPU",
                        expires_s=now + self.interval_s,
                        targets=GpuTargets.from_rows(snapshot, np.flatnonzero(outlived)),
                    )
                )
            resolution = resolve(
                proposed,
                safety={p.name: p.safety for p in self.policies},
                order=[p.name for p in self.policies],
            )

        with stage("guard"):
            review = self.guard.review(resolution.intents, situation, now, self.dry_run_caps)
            for alarm in review.alarms:  # e.g. the drain circuit breaker is open: say it loudly
                errors.append(f"guard: {alarm}")
                log.error("guard_alarm", alarm=alarm)

        with stage("act"):
            actions = self._act(resolution, review, now, errors)
            self.guard.stamp_cap_jobs(snapshot, asserted)
            self._renew_leases(errors)
            self.last_acted_s = now
        report = CycleReport(
            cycle=self.cycles,
            time_s=now,
            snapshot=snapshot,
            situation=situation,
            intents=resolution.intents,
            overridden=resolution.overridden,
            refused=review.refused,
            actions=actions,
            unchanged=review.unchanged,
            stage_s=stage_s,
            errors=errors,
            settled=settled,
        )
        log.debug("cycle", **{k: v for k, v in report.summary().items() if k != "errors"})
        return report


def _standby_note(errors: list[str], problem: str | None) -> None:
    if problem is not None:
        errors.append(f"leadership: {problem}")


def _asserted_caps(
    snapshot: Snapshot, rows: RowIndex, intents: list[Intent]
) -> npt.NDArray[np.bool_]:
    """Per GPU: does any policy ask a cap for it this cycle? (`rows`: the snapshot's UUIDs)"""
    asserted = np.zeros(snapshot.n_gpus, dtype=bool)
    uuids = [i.targets.uuid for i in intents if isinstance(i, SetPowerCap)]
    if uuids and snapshot.n_gpus:
        at, found = rows.find(np.concatenate(uuids))
        asserted[at[found]] = True
    return asserted

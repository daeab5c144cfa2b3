"""One cycle of the OODA loop: observe -> orient -> decide -> guard -> act.

Each stage meets its own collaborators, once, in order:

- observe: the telemetry source, the placement system's node states, and under a site
  coordinator (agent.site) the budget it grants and whether this replica leads its cluster (on a
  takeover, what the other replica did is read back from the audit log into the ledger);
- orient: the orienter (models -> Situation), handed to the budget source (its demand curve),
  then the ledger's view of what the agent owns (pending cap changes settled against this
  cycle's telemetry; the clock's jumps). A replica that does not lead stops here: its models stay
  warm, it decides and acts on nothing;
- decide: the policies, and the ledger's release of caps whose job has left the GPU; conflicts
  resolved (agent/policies/conflicts.py);
- guard: the gate, which refuses what must not be done and says why;
- act: the audit log (decisions on disk before anything is done) and the executor (actuators
  or, for advice, recorders; the outcome into the ledger; leases renewed).

Whether an intent is live or advice is the authority's answer, the same for every stage. Dry-run
runs exactly this path; only the executor hands the intents to recorders instead of the
actuators. Nothing here sleeps or reads the wall clock: time comes from the injected Clock.

The loop is built in one place, agent.assembly, for every command, replay and benchmark.
"""

from __future__ import annotations

import itertools
import math
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import structlog

from agent.act.audit import AuditLog
from agent.act.authority import Authority
from agent.act.executor import Executor
from agent.act.gate import Gate, Refusal, Review
from agent.act.ledger import Ledger, Ownership
from agent.act.recovery import recover
from agent.core.clock import Clock, as_time_s
from agent.core.coordination import BudgetSource, LeaderElection, Standing
from agent.core.intents import Action, Intent, Outcome
from agent.core.protocols import PlacementActuator, TelemetrySource
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
    # released, not_in_force, given_up; see Ledger.settle).
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
        ledger: Ledger,
        gate: Gate,
        executor: Executor,
        authority: Authority,
        audit: AuditLog,
        clock: Clock,
        budget_w: Callable[[Snapshot], float | None] | BudgetSource | float | None = None,
        placement: PlacementActuator | None = None,
        run_id: str | None = None,
        interval_s: float = 15.0,
        election: LeaderElection | None = None,
    ) -> None:
        """`budget_w` may come from a coordinator (a BudgetSource: its grant); `election` says
        whether this replica may act: while it may not, cycles observe and orient only (the
        models stay warm), and the first cycle allowed again first reads back what another
        replica did since `read_through_s` (agent.act.recovery, as after a restart): a standby
        that takes over repeats nothing the leader did."""
        self.source = source
        self.orienter = orienter
        self.policies = list(policies)
        self.ledger = ledger
        self.gate = gate
        self.executor = executor
        self.authority = authority
        self.audit = audit
        self.clock = clock
        self.budget_w = budget_w
        self.placement = placement
        self.interval_s = interval_s
        self.election = election
        # The loop's clock through which the ledger knows the audit log's record: the last cycle
        # that acted, or the daemon's read-back at its start. None: nothing read yet (a takeover
        # reads the whole log).
        self.read_through_s: float | None = None
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
            budget_w = self._budget(snapshot, errors)
            standing = self._standing(now, errors)
        ownership: Ownership | None = None
        with stage("orient"):
            situation = self._orient(snapshot, budget_w, nodes, errors)
            if standing.may_act:
                situation, ownership = self._own(situation, now, errors)
        if ownership is None:
            return self._standby_report(now, snapshot, situation, stage_s, errors)
        with stage("decide"):
            resolution = self._decide(situation, ownership, now, errors)
        with stage("guard"):
            review = self.gate.review(resolution.intents, situation, now)
            for alarm in review.alarms:  # e.g. the drain circuit breaker is open: say it loudly
                errors.append(f"guard: {alarm}")
                log.error("guard_alarm", alarm=alarm)
        with stage("act"):
            actions = self._act(resolution, review, ownership, snapshot, now, errors)
            self.read_through_s = now  # what it did is in its ledger
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
            settled=ownership.settled.counts() if ownership.settled is not None else {},
        )
        log.debug("cycle", **{k: v for k, v in report.summary().items() if k != "errors"})
        return report

    # -- the stages -------------------------------------------------------------------------------

    def _observe(self, now: float, errors: list[str]) -> tuple[Snapshot, NodeStates | None]:
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

    def _standing(self, now: float, errors: list[str]) -> Standing:
        """Whether this replica may act (no election: always). On a takeover, what the other
        replica did is read back into the ledger first."""
        if self.election is None:
            return Standing(may_act=True)
        try:
            standing = self.election.standing()
        except Exception as exc:  # an unanswerable election means: do not act
            errors.append(f"leadership unknown ({exc}): not acting")
            log.error("election_failed", error=str(exc))
            return Standing(may_act=False)
        if standing.problem is not None:
            errors.append(f"leadership: {standing.problem}")
        last = self._last_now
        behind = last is not None and (self.read_through_s is None or self.read_through_s < last)
        if standing.may_act and behind:  # a cycle since it last acted did not: a takeover
            self._read_back(now, errors)
        return standing

    def _read_back(self, now: float, errors: list[str]) -> None:
        """This replica leads now: what another did since this loop last knew the record (its
        last cycle that acted, the daemon's start) is read back from the shared audit log into
        the ledger, exactly as after a restart (agent.act.recovery): caps it set become ours
        once telemetry shows them in force, its node actions count in cooldowns and limits."""
        since_s, path = self.read_through_s, self.audit.path
        if path is None:  # nothing to read: the caps in force stay someone else's
            log.warning("took_over", since_s=since_s, time_s=now, audit=None)
            return
        try:
            found = recover(self.ledger, path, -math.inf if since_s is None else since_s)
        except Exception as exc:  # it leads all the same, and says so
            errors.append(
                f"took over, but the audit log {path} was not read back ({type(exc).__name__}: "
                f"{exc}): caps the other replica set are not known as ours"
            )
            log.error("took_over", since_s=since_s, time_s=now, audit=str(path), error=str(exc))
            return
        self.read_through_s = now
        log.warning("took_over", since_s=since_s, time_s=now, audit=str(path), **asdict(found))

    def _orient(
        self,
        snapshot: Snapshot,
        budget_w: float | None,
        nodes: NodeStates | None,
        errors: list[str],
    ) -> Situation:
        """The models' view of the cycle, handed to the budget source (its demand curve)."""
        situation = self.orienter.orient(snapshot, budget_w, nodes)
        if isinstance(self.budget_w, BudgetSource):
            try:
                self.budget_w.oriented(situation)
            except Exception as exc:  # the cycle goes on; the site sees no new curve
                errors.append(f"site: demand curve not updated: {exc}")
                log.error("budget_source_oriented_failed", error=str(exc))
        return situation

    def _own(
        self, situation: Situation, now: float, errors: list[str]
    ) -> tuple[Situation, Ownership]:
        went_back = self._last_now is not None and now < self._last_now
        # What the agent owns: pending cap changes settled against this telemetry (after a
        # restart, agent.act.recovery, or a cap call that failed), times pulled back after a
        # clock jump; policies undo only their own caps.
        ownership = self.ledger.open_cycle(situation, now, self.authority.dry_run, went_back)
        if ownership.settled is not None:
            log.warning("guard_caps_recovered", **ownership.settled.counts())
        if went_back and self._last_now is not None:
            errors.append(
                f"the clock went back {self._last_now - now:.0f} s: cooldowns, drain "
                f"windows and policy holds restart from now ({ownership.clock_ahead_s or 0.0:.0f}"
                " s of the guard's were ahead)"
            )
            log.error("clock_went_back", by_s=self._last_now - now)
        self._last_now = now
        situation = replace(
            situation, capped_by_us=ownership.capped_by_us, interval_s=self.interval_s
        )
        return situation, ownership

    def _decide(
        self, situation: Situation, ownership: Ownership, now: float, errors: list[str]
    ) -> Resolution:
        if ownership.clock_ahead_s is not None:
            # Before the policies decide: their holds restart from now, as the guard's do.
            self.memory = {n: m.clock_went_back(now) for n, m in self.memory.items()}
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
        release = ownership.outlived_release(situation.snapshot, proposed, now, self.interval_s)
        if release is not None:
            proposed.append(release)
        return resolve(
            proposed,
            safety={p.name: p.safety for p in self.policies},
            order=[p.name for p in self.policies],
        )

    def _standby_report(
        self,
        now: float,
        snapshot: Snapshot,
        situation: Situation,
        stage_s: dict[str, float],
        errors: list[str],
    ) -> CycleReport:
        """A cycle that may not act: it observed and oriented (the models learned) and stops
        there. The clock's last time still moves on."""
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
        self,
        resolution: Resolution,
        review: Review,
        ownership: Ownership,
        snapshot: Snapshot,
        now: float,
        errors: list[str],
    ) -> list[Action]:
        """Audit what was decided, durably, then act: no actuator is called for a decision whose
        record could not be written (a full disk under the audit log), and the cycle says so.
        Then the leases: caps found ours this cycle taken over, the live ones renewed."""
        self._audit_settled(ownership, now, errors)
        self.executor.adopt_found(ownership.settled, snapshot)
        decision_ids: dict[int, str] = {}

        def decision_id(intent: Intent) -> str:
            return decision_ids.setdefault(id(intent), self._next_id("d"))

        actions: list[Action] = []
        if self._audit_decisions(resolution, review, decision_id, now, errors):
            actions = self.executor.execute(
                [
                    (decision_id(origin), intent)
                    for intent, origin in zip(review.allowed, review.origin, strict=True)
                ],
                lambda: self._next_id("a"),
                now,
            )
            self._audit_actions(actions, errors)
        errors.extend(self.executor.finish_cycle(snapshot, ownership.asserted))
        return actions

    def _audit_settled(self, ownership: Ownership, now: float, errors: list[str]) -> None:
        """What became of the cap changes whose outcome was not known, on the record."""
        settled = ownership.settled
        if settled is None:
            return
        try:
            with self.audit.batch():
                self.audit.event("guard_caps_recovered", time_s=now, **settled.event)
        except OSError as exc:
            errors.append(
                f"audit log unwritable ({exc.strerror or exc}): what became of the caps "
                "whose outcome was not known was not recorded"
            )

    def _audit_decisions(
        self,
        resolution: Resolution,
        review: Review,
        decision_id: Callable[[Intent], str],
        now: float,
        errors: list[str],
    ) -> bool:
        """The decisions, refusals and the gate's own events, on disk before anything is done.
        False (and the cycle says so) when they could not be written."""
        advisory = self.authority.advisory
        written = sum(self.audit.counts.values())
        try:
            with self.audit.batch():
                for name, fields in review.events:  # the gate's own: breaker tripped, reset
                    self.audit.event(name, **fields)
                # A decision is audited when something comes of it: an action, a refusal, or
                # the gate's own. Desired state re-asserted every cycle and already in place
                # (within the dead band) changes nothing and is only counted, or the log would
                # grow by every GPU every cycle.
                effective = {id(o) for o in [*review.origin, *review.raised]} | {
                    id(r.origin or r.intent) for r in review.refused
                }
                for intent in [*resolution.intents, *review.raised]:
                    if id(intent) in effective:
                        self.audit.decision(decision_id(intent), intent, advisory(intent), now)
                for over in resolution.overridden:
                    self.audit.refusal(
                        decision_id(over.intent),
                        over.intent,
                        f"overridden: {over.reason}",
                        advisory(over.intent),
                        now,
                    )
                for refusal in review.refused:
                    origin = refusal.origin or refusal.intent
                    self.audit.refusal(
                        decision_id(origin), refusal.intent, refusal.reason, advisory(origin), now
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
            return False
        return True

    def _audit_actions(self, actions: list[Action], errors: list[str]) -> None:
        try:
            with self.audit.batch():
                for action in actions:
                    self.audit.action(action)
        except OSError as exc:
            # Done is done: the ledger knows, and each action's decision is on record.
            message = (
                f"audit log unwritable ({exc.strerror or exc}): the outcomes of "
                f"{len(actions)} actions were not recorded (their decisions were)"
            )
            errors.append(message)
            log.error("audit_actions_unwritable", error=str(exc), actions=len(actions))

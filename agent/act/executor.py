"""Applying what the guard allowed: through the real actuators, or, for whatever runs in dry-run,
through recorders that implement the same protocols and only remember. Every outcome is an Action
(one audit record each); an actuator failure is logged, audited and never stops the cycle."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from agent.act.authority import Authority
from agent.act.ledger import Ledger, Settled
from agent.core.errors import OodaError
from agent.core.intents import (
    Action,
    DrainNode,
    GpuTargets,
    Intent,
    Notify,
    Outcome,
    ReleasePowerCap,
    RequeueJob,
    ResumeNode,
    SetNodeFeatures,
    SetNodeWeight,
    SetPowerCap,
)
from agent.core.protocols import (
    CapActuator,
    CapLeaseAdopter,
    CapLeaseRenewer,
    CapResult,
    Notifier,
    PlacementActuator,
)
from agent.core.situation import NodeStates
from agent.core.snapshot import Snapshot

log = structlog.get_logger("ooda.act")

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


class RecordingCapActuator:
    """Dry-run caps: remembers what it was asked this cycle (see `Actuators.forget_recorded`),
    changes nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, GpuTargets, FloatArray | None]] = []

    def set_caps(self, targets: GpuTargets, watts: FloatArray, lease_s: float) -> CapResult:
        self.calls.append(("set", targets, watts))
        return CapResult.all_ok(len(targets))

    def release_caps(self, targets: GpuTargets) -> CapResult:
        self.calls.append(("release", targets, None))
        return CapResult.all_ok(len(targets))


class RecordingPlacement:
    """Dry-run placement: remembers, changes nothing. Node states come from the real one, with
    the drains recorded here laid over them: a node whose drain was recorded shows as drained by
    us until its resume is recorded, so in dry-run the policies see their advice followed, as
    they would see it done live, and advise what live would do next (the resume after the hold).
    A node someone else drained keeps its real state."""

    # Whether its node states stand on their own (replay's counterfactual), so the loop reads
    # them even with no live placement configured.
    standalone = False

    def __init__(self, real: PlacementActuator | None = None) -> None:
        self.real = real
        self.calls: list[tuple[str, str, object]] = []
        self.drained: dict[str, str] = {}  # recorded drains not resumed since: node -> reason

    def node_states(self, node_names: Sequence[str]) -> NodeStates:
        if self.real is not None:
            states = self.real.node_states(node_names)
        else:
            states = NodeStates.unknown(len(node_names))
        if not self.drained:
            return states
        names = np.asarray(list(node_names), dtype=np.str_)
        ours = (
            np.isin(names, np.asarray(list(self.drained), dtype=np.str_))
            & states.known
            & ~(states.drained & ~states.drained_by_us)
        )
        if not ours.any():
            return states
        reason = states.reason.astype(object)
        reason[ours] = [self.drained[str(n)] for n in names[ours]]
        return replace(
            states,
            drained=states.drained | ours,
            drained_by_us=states.drained_by_us | ours,
            reason=reason.astype(np.str_),
            recorded_drain=ours & ~states.drained,
        )

    def drain(self, node: str, reason: str) -> None:
        self.calls.append(("drain", node, reason))
        self.drained[node] = reason

    def resume(self, node: str) -> None:
        self.calls.append(("resume", node, None))
        self.drained.pop(node, None)

    def set_weight(self, node: str, weight: int) -> None:
        self.calls.append(("weight", node, weight))

    def set_features(self, node: str, add: frozenset[str], remove: frozenset[str]) -> None:
        self.calls.append(("features", node, (add, remove)))

    def requeue(self, job: str) -> None:
        self.calls.append(("requeue", job, None))


class RecordingNotifier:
    def __init__(self) -> None:
        self.sent: list[Notify] = []

    def notify(self, intent: Notify) -> None:
        self.sent.append(intent)


@dataclass
class Actuators:
    """The live actuators (None: that kind of action is not configured) and the recorders."""

    caps: CapActuator | None = None
    placement: PlacementActuator | None = None
    notifier: Notifier | None = None
    recorded_caps: RecordingCapActuator = field(default_factory=RecordingCapActuator)
    recorded_placement: RecordingPlacement = field(default_factory=RecordingPlacement)
    recorded_notes: RecordingNotifier = field(default_factory=RecordingNotifier)

    def __post_init__(self) -> None:
        self.recorded_placement.real = self.placement

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        # The dry-run recorder reads node states from the live placement, whenever it is set
        # (the runtime sets it after building the actuators).
        if name == "placement" and "recorded_placement" in self.__dict__:
            self.recorded_placement.real = self.placement

    def forget_recorded(self) -> None:
        """The recorders' calls dropped: they hold one cycle's, for whoever runs a cycle to look
        at. Kept for good, a dry run at 100,000 GPUs grew by every cap it moved (about 20 MB a
        cycle); the audit log and /metrics are the record. Recorded drains stay: they are state
        (the policies see their advice followed), not a log."""
        self.recorded_caps.calls.clear()
        self.recorded_placement.calls.clear()
        self.recorded_notes.sent.clear()

    def node_states_reader(self) -> PlacementActuator | None:
        """Where the loop reads node states: the live placement's, with the drains recorded in
        dry-run laid over them (so a dry-run advises the resume live would do); None when no
        placement is configured (unless the recorder's states stand on their own)."""
        if self.placement is not None or self.recorded_placement.standalone:
            return self.recorded_placement
        return None


class Executor:
    """Applies what the gate allowed, live or advised as the authority says per intent, and
    writes what came of it into the ledger (ownership, cooldowns, limits). Caps are leases: the
    live ones are renewed every cycle (`finish_cycle`), and caps found in force after a restart
    are taken over (`adopt_found`)."""

    def __init__(
        self,
        actuators: Actuators,
        authority: Authority | None = None,
        ledger: Ledger | None = None,
        lease_s: float = 120.0,
    ) -> None:
        self.actuators = actuators
        self.authority = authority or Authority()
        self.ledger = ledger or Ledger()
        self.lease_s = lease_s

    def execute(
        self, allowed: Sequence[tuple[str, Intent]], action_id: Callable[[], str], now_s: float
    ) -> list[Action]:
        """Each allowed intent, under its decision's id; every outcome is an Action, recorded
        in the ledger. The dry-run recorders hold this call's only."""
        self.actuators.forget_recorded()
        actions: list[Action] = []
        for decision_id, intent in allowed:
            done = self._execute_one(decision_id, intent, action_id, now_s)
            for action in done:
                self.ledger.record(action, now_s)
            actions.extend(done)
        return actions

    def _execute_one(
        self, decision_id: str, intent: Intent, action_id: Callable[[], str], now_s: float
    ) -> list[Action]:
        # Why an intent is only recorded (dry-run, an advisory kind, a freeze window) goes
        # into its Action's detail so the audit trail says it.
        why = self.authority.why(intent)
        dry = why is not None
        try:
            done = self._apply(decision_id, intent, dry, action_id, now_s)
        except Exception as exc:
            # Any failure of one intent is that intent's FAILED action: the actions already
            # taken this cycle are still returned, audited and remembered by the ledger.
            unexpected = not isinstance(exc, OodaError)
            log.error(
                "actuator_failed",
                kind=str(intent.kind),
                target=intent.target_name(),
                error=str(exc),
                exc_info=unexpected,
            )
            detail = f"unexpected {type(exc).__name__}: {exc}" if unexpected else str(exc)
            return [
                Action(action_id(), decision_id, intent, Outcome.FAILED, dry, detail, time_s=now_s)
            ]
        if not why:
            return done
        return [
            replace(a, detail=f"advisory: {why}")
            if a.outcome is Outcome.RECORDED and not a.detail
            else a
            for a in done
        ]

    def adopt_found(self, settled: Settled | None, snapshot: Snapshot) -> None:
        """Caps of ours found in force this cycle (settled against telemetry) that the cap
        actuator did not record as set: from now on it renews their leases too."""
        caps: object = self.actuators.caps
        if settled is None or not settled.rows.size or self.authority.dry_run:
            return
        if isinstance(caps, CapLeaseAdopter):
            caps.adopt_leases(GpuTargets.from_rows(snapshot, settled.rows), settled.watts)

    def finish_cycle(self, snapshot: Snapshot, asserted: BoolArray) -> list[str]:
        """After the cycle's actions: the job each asked cap was chosen for goes into the
        ledger, and the live caps' leases are renewed. Returns what went wrong."""
        self.ledger.stamp_cap_jobs(snapshot, asserted)
        return self.renew_leases()

    def renew_leases(self) -> list[str]:
        """Caps are leases: renew the live ones, or the nodes fall back to their safe cap.
        Renewals are not decisions, so they are not audited; failures are returned."""
        caps: object = self.actuators.caps  # any cap actuator may also renew leases
        if self.authority.dry_run or not isinstance(caps, CapLeaseRenewer):
            return []
        try:
            renewed, result = caps.renew_leases(self.lease_s)
        except Exception as exc:  # one bad node daemon must not stop the cycle
            log.error("lease_renewal_failed", error=str(exc))
            return [f"lease renewal failed: {exc}"]
        failed = ~result.ok
        if not failed.any():
            return []
        why = "; ".join(sorted(set(result.errors.values()))[:3])
        log.error("lease_renewal_failed", gpus=int(failed.sum()), errors=why)
        return [f"lease renewal failed for {int(failed.sum())} of {len(renewed)} GPUs: {why}"]

    def _apply(
        self,
        decision_id: str,
        intent: Intent,
        dry: bool,
        action_id: Callable[[], str],
        now_s: float,
    ) -> list[Action]:
        def action(what: Intent, outcome: Outcome, detail: str = "", before: Any = None) -> Action:
            return Action(action_id(), decision_id, what, outcome, dry, detail, before, now_s)

        if isinstance(intent, SetPowerCap | ReleasePowerCap):
            return self._apply_caps(intent, dry, action)
        done = Outcome.RECORDED if dry else Outcome.APPLIED
        if isinstance(intent, Notify):
            notifier = self.actuators.recorded_notes if dry else self.actuators.notifier
            if notifier is None:
                return [action(intent, Outcome.FAILED, "no notifier configured")]
            notifier.notify(intent)
            return [action(intent, done)]
        placement = self.actuators.recorded_placement if dry else self.actuators.placement
        if placement is None:
            return [action(intent, Outcome.FAILED, "no placement actuator configured")]
        _place(placement, intent)
        return [action(intent, done)]

    def _apply_caps(
        self,
        intent: SetPowerCap | ReleasePowerCap,
        dry: bool,
        action: Callable[..., Action],
    ) -> list[Action]:
        """A cap change, per GPU: the targets that took it, and those that failed (why)."""
        caps = self.actuators.recorded_caps if dry else self.actuators.caps
        if caps is None:
            return [action(intent, Outcome.FAILED, "no cap actuator configured")]
        if isinstance(intent, SetPowerCap):
            result = caps.set_caps(intent.targets, intent.watts, self.lease_s)
        else:
            result = caps.release_caps(intent.targets)
        out: list[Action] = []
        ok, failed = result.ok, ~result.ok
        if ok.any():
            done = Outcome.RECORDED if dry else Outcome.APPLIED
            out.append(action(intent.subset(ok), done, before=result.before_w[ok]))
        if failed.any():
            errors = sorted({msg for i, msg in result.errors.items() if failed[i]}) or ["failed"]
            log.error("cap_actuator_failed", targets=int(failed.sum()), errors=errors[:5])
            detail = "; ".join(errors[:5])
            out.append(
                action(intent.subset(failed), Outcome.FAILED, detail, result.before_w[failed])
            )
        return out


def _place(placement: PlacementActuator, intent: Intent) -> None:
    """A node or job intent, through the placement system (or its recorder)."""
    if isinstance(intent, DrainNode):
        placement.drain(intent.node, intent.reason)
    elif isinstance(intent, ResumeNode):
        placement.resume(intent.node)
    elif isinstance(intent, SetNodeWeight):
        placement.set_weight(intent.node, intent.weight)
    elif isinstance(intent, SetNodeFeatures):
        placement.set_features(intent.node, intent.add, intent.remove)
    elif isinstance(intent, RequeueJob):
        placement.requeue(intent.job)
    else:
        raise TypeError(f"no actuator for {intent.kind}")

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
from agent.core.protocols import CapActuator, CapResult, Notifier, PlacementActuator
from agent.core.situation import NodeStates

log = structlog.get_logger("ooda.act")

FloatArray = npt.NDArray[np.float64]


class RecordingCapActuator:
    """Dry-run caps: remembers what it was asked, changes nothing."""

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

    def node_states_reader(self) -> PlacementActuator | None:
        """Where the loop reads node states: the live placement's, with the drains recorded in
        dry-run laid over them (so a dry-run advises the resume live would do); None when no
        placement is configured."""
        return self.recorded_placement if self.placement is not None else None


class Executor:
    """`dry_run(intent)` says, per intent, whether it only gets recorded."""

    def __init__(
        self,
        actuators: Actuators,
        dry_run: Callable[[Intent], bool],
        lease_s: float = 120.0,
        why_dry: Callable[[Intent], str | None] | None = None,
    ) -> None:
        self.actuators = actuators
        self.dry_run = dry_run
        self.lease_s = lease_s
        # Why an intent is only recorded (dry-run, an advisory kind, a freeze window), written
        # into its Action's detail so the audit trail says it.
        self.why_dry = why_dry

    def execute(
        self, allowed: Sequence[tuple[str, Intent]], action_id: Callable[[], str], now_s: float
    ) -> list[Action]:
        actions: list[Action] = []
        for decision_id, intent in allowed:
            dry = self.dry_run(intent)
            try:
                done = self._apply(decision_id, intent, dry, action_id, now_s)
                why = self.why_dry(intent) if dry and self.why_dry is not None else None
                if why:
                    done = [
                        replace(a, detail=f"advisory: {why}")
                        if a.outcome is Outcome.RECORDED and not a.detail
                        else a
                        for a in done
                    ]
                actions.extend(done)
            except Exception as exc:
                # Any failure of one intent is that intent's FAILED action: the actions already
                # taken this cycle are still returned, audited and remembered by the guard.
                unexpected = not isinstance(exc, OodaError)
                log.error(
                    "actuator_failed",
                    kind=str(intent.kind),
                    target=intent.target_name(),
                    error=str(exc),
                    exc_info=unexpected,
                )
                actions.append(
                    Action(
                        action_id(),
                        decision_id,
                        intent,
                        Outcome.FAILED,
                        dry,
                        f"unexpected {type(exc).__name__}: {exc}" if unexpected else str(exc),
                        time_s=now_s,
                    )
                )
        return actions

    def _apply(
        self,
        decision_id: str,
        intent: Intent,
        dry: bool,
        action_id: Callable[[], str],
        now_s: float,
    ) -> list[Action]:
        acts = self.actuators
        done = Outcome.RECORDED if dry else Outcome.APPLIED

        def action(what: Intent, outcome: Outcome, detail: str = "", before: Any = None) -> Action:
            return Action(action_id(), decision_id, what, outcome, dry, detail, before, now_s)

        if isinstance(intent, SetPowerCap | ReleasePowerCap):
            caps = acts.recorded_caps if dry else acts.caps
            if caps is None:
                return [action(intent, Outcome.FAILED, "no cap actuator configured")]
            if isinstance(intent, SetPowerCap):
                result = caps.set_caps(intent.targets, intent.watts, self.lease_s)
            else:
                result = caps.release_caps(intent.targets)
            out: list[Action] = []
            ok, failed = result.ok, ~result.ok
            if ok.any():
                out.append(action(intent.subset(ok), done, before=result.before_w[ok]))
            if failed.any():
                errors = sorted({msg for i, msg in result.errors.items() if failed[i]}) or [
                    "failed"
                ]
                log.error("cap_actuator_failed", targets=int(failed.sum()), errors=errors[:5])
                detail = "; ".join(errors[:5])
                out.append(
                    action(intent.subset(failed), Outcome.FAILED, detail, result.before_w[failed])
                )
            return out
        if isinstance(intent, Notify):
            notifier = acts.recorded_notes if dry else acts.notifier
            if notifier is None:
                return [action(intent, Outcome.FAILED, "no notifier configured")]
            notifier.notify(intent)
            return [action(intent, done)]
        placement = acts.recorded_placement if dry else acts.placement
        if placement is None:
            return [action(intent, Outcome.FAILED, "no placement actuator configured")]
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
        return [action(intent, done)]

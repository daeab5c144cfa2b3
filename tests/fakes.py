"""The hand-written fakes the tests share: a queued telemetry source, a placement system, cap
actuators that renew, adopt or time out, and the guard's two halves or a whole loop wired as
the assembly wires them (agent.assembly builds the agent every command runs; tests that need
their own policies or edges build a Loop here)."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from agent.act.audit import AuditLog
from agent.act.authority import Authority
from agent.act.executor import Actuators, Executor, RecordingCapActuator
from agent.act.gate import Gate
from agent.act.guard import GuardSettings
from agent.act.ledger import Ledger
from agent.act.rollout import Rollout
from agent.core.clock import Clock, FakeClock
from agent.core.intents import GpuTargets
from agent.core.protocols import CapActuator, CapResult, Notifier, PlacementActuator
from agent.core.situation import NodeStates
from agent.core.snapshot import Snapshot
from agent.loop import Loop
from agent.orient.orienter import Orienter
from policies.base import Policy

FloatArray = np.ndarray  # type: ignore[type-arg]


class FakeSource:
    """A telemetry source that returns queued snapshots (or raises queued errors)."""

    def __init__(self, items: Sequence[Snapshot | Exception]) -> None:
        self.items = list(items)

    def observe(self, now_s: float) -> Snapshot:
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


class FakePlacement:
    """A placement system that remembers what was asked: every node in service (or the states
    `states_for` gives), drains, resumes, weights, features and requeues kept in `calls`."""

    def __init__(self, states_for: Callable[[Sequence[str]], NodeStates] | None = None) -> None:
        self.states_for = states_for
        self.calls: list[tuple[str, str, object]] = []
        self.drained: list[str] = []

    def node_states(self, node_names: Sequence[str]) -> NodeStates:
        if self.states_for is not None:
            return self.states_for(node_names)
        return NodeStates.unknown(len(node_names))

    def drain(self, node: str, reason: str) -> None:
        self.calls.append(("drain", node, reason))
        self.drained.append(node)

    def resume(self, node: str) -> None:
        self.calls.append(("resume", node, None))

    def set_weight(self, node: str, weight: int) -> None:
        self.calls.append(("weight", node, weight))

    def set_features(self, node: str, add: frozenset[str], remove: frozenset[str]) -> None:
        self.calls.append(("features", node, (add, remove)))

    def requeue(self, job: str) -> None:
        self.calls.append(("requeue", job, None))


class RenewingCaps(RecordingCapActuator):
    """A cap actuator whose caps are leases (the CapLeaseRenewer protocol)."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.renewals: list[float] = []
        self.fail = fail

    def renew_leases(self, lease_s: float) -> tuple[GpuTargets, CapResult]:
        self.renewals.append(lease_s)
        if self.fail:
            raise RuntimeError("node3 unreachable")
        return GpuTargets.empty(), CapResult.all_ok(0)


class AdoptingCaps(RenewingCaps):
    """...that also takes over caps a restart found in force (CapLeaseAdopter)."""

    def __init__(self) -> None:
        super().__init__()
        self.adopted: list[tuple[list[str], list[float]]] = []

    def adopt_leases(self, targets: GpuTargets, watts: FloatArray) -> None:
        self.adopted.append((targets.names(), watts.tolist()))


class TimingOutCaps(AdoptingCaps):
    """Nodes that act on a cap and time out answering: every call fails, whatever was done."""

    def set_caps(self, targets: GpuTargets, watts: FloatArray, lease_s: float) -> CapResult:
        super().set_caps(targets, watts, lease_s)
        n = len(targets)
        return CapResult(
            np.zeros(n, dtype=bool), np.full(n, np.nan), dict.fromkeys(range(n), "timed out")
        )


def make_gate(
    settings: GuardSettings | None = None,
    *,
    dry_run: bool = False,
    policy_dry_run: Mapping[str, bool | None] | None = None,
    rollout: Rollout | None = None,
    reset_file: Path | None = None,
) -> Gate:
    """The guard's two halves as the assembly wires them: a gate over a fresh ledger
    (`gate.ledger`), live or advice as `dry_run` (the agent's) and `policy_dry_run` say."""
    authority = Authority(dry_run, policy_dry_run, rollout)
    return Gate(Ledger(settings), authority, reset_file=reset_file)


def make_loop(
    source: FakeSource | object,
    policies: Sequence[Policy],
    *,
    dry_run: bool = False,
    caps: CapActuator | None = None,
    placement: PlacementActuator | None = None,
    notifier: Notifier | None = None,
    node_states: PlacementActuator | None = None,
    guard: GuardSettings | None = None,
    clock: Clock | None = None,
    budget_w: float | None = None,
    audit: AuditLog | None = None,
    orienter: Orienter | None = None,
) -> Loop:
    """A loop over hand-written edges, wired as agent.assembly wires the real ones."""
    authority = Authority(dry_run, {p.name: p.settings.dry_run for p in policies})
    ledger = Ledger(guard)
    actuators = Actuators(caps=caps, placement=placement, notifier=notifier)
    return Loop(
        source=source,  # type: ignore[arg-type]
        orienter=orienter or Orienter(),
        policies=policies,
        ledger=ledger,
        gate=Gate(ledger, authority),
        executor=Executor(actuators, authority, ledger),
        authority=authority,
        audit=audit if audit is not None else AuditLog(stream=io.StringIO()),
        clock=clock or FakeClock(500.0),
        budget_w=budget_w,
        placement=node_states if node_states is not None else actuators.node_states_reader(),
    )

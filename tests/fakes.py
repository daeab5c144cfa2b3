"""The hand-written fakes the tests share: a queued telemetry source, a placement system, cap
actuators that renew, adopt or time out, a health model that reads XIDs, and the guard's two
halves or a whole loop wired as the assembly wires them (agent.assembly builds the agent every
command runs; tests that need their own policies or edges build a Loop here)."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.act.audit import AuditLog
from agent.act.authority import Authority
from agent.act.executor import Actuators, Executor, RecordingCapActuator
from agent.act.gate import Gate
from agent.act.guard import GuardSettings
from agent.act.ledger import Ledger
from agent.act.rollout import Rollout
from agent.core.clock import Clock, FakeClock
from agent.core.errors import TelemetryError
from agent.core.intents import GpuTargets
from agent.core.protocols import CapActuator, CapResult, Notifier, PlacementActuator
from agent.core.situation import HealthSeverity, HealthStatus, NodeStates, Situation
from agent.core.snapshot import Metric, Snapshot, build_snapshot
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
    """A placement system that remembers what it was asked (`calls`). Its nodes' states: from
    `states` when given; else from `reasons` (node -> drain reason, "" in service, a reason
    starting "ooda:" ours; a node not named is unknown to it), which drains and resumes change;
    else every node known and in service."""

    def __init__(
        self,
        reasons: Mapping[str, str] | None = None,
        *,
        states: Callable[[Sequence[str]], NodeStates] | None = None,
    ) -> None:
        self.reasons = dict(reasons) if reasons is not None else None
        self.states = states
        self.calls: list[tuple[str, str, object]] = []

    def node_states(self, node_names: Sequence[str]) -> NodeStates:
        names = list(node_names)
        if self.states is not None:
            return self.states(names)
        n = len(names)
        if self.reasons is None:
            reasons = np.full(n, "", dtype=np.str_)
            known = np.ones(n, dtype=bool)
        else:
            reasons = np.array([self.reasons.get(x, "") for x in names], dtype=np.str_)
            known = np.array([x in self.reasons for x in names], dtype=bool)
        drained = reasons != ""
        return NodeStates(
            drained=drained,
            drained_by_us=drained & np.char.startswith(reasons, "ooda:"),
            reason=reasons,
            weight=np.ones(n, dtype=np.int64),
            features=tuple(frozenset() for _ in range(n)),
            opted_out=np.zeros(n, dtype=bool),
            known=known,
        )

    def drain(self, node: str, reason: str) -> None:
        self.calls.append(("drain", node, reason))
        if self.reasons is not None:
            self.reasons[node] = reason

    def resume(self, node: str) -> None:
        self.calls.append(("resume", node, None))
        if self.reasons is not None:
            self.reasons[node] = ""

    def set_weight(self, node: str, weight: int) -> None:
        self.calls.append(("weight", node, weight))

    def set_features(self, node: str, add: frozenset[str], remove: frozenset[str]) -> None:
        self.calls.append(("features", node, (add, remove)))

    def requeue(self, job: str) -> None:
        self.calls.append(("requeue", job, None))

    def done(self, what: str) -> list[str]:
        """The targets of the calls of one kind ("drain", "resume", ...), in order."""
        return [target for kind, target, _ in self.calls if kind == what]

    @property
    def changes(self) -> list[str]:
        """Every call as "kind target"."""
        return [f"{kind} {target}" for kind, target, _ in self.calls]


class HealthFromXid:
    """Stands in for orient's health model: a fatal XID (79: the GPU fell off the bus, by
    default) means drain the node, as NVIDIA's remediation says; everything else is the real
    orienter's (`inner`). `since_known`: the condition dates from this cycle (else unknown)."""

    def __init__(
        self,
        inner: Orienter | None = None,
        fatal: Sequence[int] = (79,),
        remediation: str = "drain the node, reset the GPU",
        since_known: bool = True,
    ) -> None:
        self.inner = inner or Orienter()
        self.fatal = tuple(fatal)
        self.remediation = remediation
        self.since_known = since_known

    def orient(
        self, snapshot: Snapshot, budget_w: Any, nodes: Any = None, priority: Any = None
    ) -> Situation:
        situation = self.inner.orient(snapshot, budget_w, nodes, priority)
        xid, ok = snapshot.column(Metric.XID)
        codes = np.nan_to_num(xid).astype(np.int64)
        bad = ok & np.isin(codes, self.fatal)
        health = HealthStatus(
            severity=np.where(bad, int(HealthSeverity.DRAIN), int(HealthSeverity.OK)).astype(
                np.int64
            ),
            code=np.where(bad, np.char.add("xid:", codes.astype(str)), "").astype(np.str_),
            remediation=np.where(bad, self.remediation, "").astype(np.str_),
            since_s=np.where(bad & self.since_known, snapshot.time_s, np.nan),
        )
        return replace(situation, health=health)

    def to_dict(self) -> dict[str, Any]:
        return self.inner.to_dict()

    def load_dict(self, data: Any) -> None:
        self.inner.load_dict(data)


class RenewingCaps(RecordingCapActuator):
    """A cap actuator whose caps are leases (the CapLeaseRenewer protocol, as the node client)."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.renewals: list[float] = []
        self.fail = fail

    @property
    def set_calls(self) -> int:
        return sum(1 for kind, _t, _w in self.calls if kind == "set")

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


def app_fleet(jobs: list[str], power_w: Sequence[float] | None = None) -> Snapshot:
    """GPUs of the given jobs ('' idle), two to a node, at 1,800 MHz and `power_w` (300 W each
    unless given): a fleet for the application-throughput join."""
    n = len(jobs)
    return build_snapshot(
        time_s=100.0,
        node_of_gpu=[f"node{i // 2 + 1}" for i in range(n)],
        gpu=[i % 2 for i in range(n)],
        uuid=[f"GPU-{i}" for i in range(n)],
        model=["H100"] * n,
        job=jobs,
        values={
            Metric.POWER_W: [300.0] * n if power_w is None else list(power_w),
            Metric.SM_CLOCK_MHZ: [1800.0] * n,
        },
        age_s=[1.0] * n,
        stale=[False] * n,
    )


class FakePrometheus:
    """Answers by the metric a query names: {metric: {job: value}}; `fail` names metrics whose
    queries fail."""

    def __init__(self, answers: dict[str, dict[str, float]], fail: tuple[str, ...] = ()) -> None:
        self.answers = answers
        self.fail = fail
        self.queries: list[str] = []

    def query(self, expr: str, now_s: float) -> list[dict[str, Any]]:
        self.queries.append(expr)
        for metric, by_job in self.answers.items():
            if metric in expr:
                if metric in self.fail:
                    raise TelemetryError(f"prometheus: connection refused (query {expr})")
                return [
                    {"metric": {"hpc_job": job}, "value": [now_s, str(v)]}
                    for job, v in by_job.items()
                ]
        return []

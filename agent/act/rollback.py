"""`ooda rollback`: release every cap the agent set and resume every node it drained, audited.

It needs no running daemon and none of its memory. What we did is found where it is durable:
- caps: the audit log, read across its rotated files: every cap that may be in force, that is
  every live (not dry-run) `set_power_cap` *decision* (written and fsynced before its action, so
  a cap applied while its action record could not be written, as on a full disk, is still
  found), less the GPUs the guard refused it for, less those an applied release set back since;
  an applied action's watts are the cap's;
- drains: the placement system itself (our drains carry the reason prefix `ooda:`), asked about
  every node the audit log names, every node the placement system lists (when it can: the
  `NodeLister` protocol) and any node given.
A node someone else drained since is left alone; so is a node already back in service.
Each release and resume is one decision and one action in the audit log (policy `rollback`).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.act.audit import AuditLog
from agent.act.authority import Authority
from agent.act.executor import Actuators, Executor
from agent.core.intents import (
    Action,
    GpuTargets,
    Intent,
    Outcome,
    ReleasePowerCap,
    ResumeNode,
    split_gpu_names,
)
from agent.core.keyed import KeyedColumns
from agent.core.protocols import CapActuator, NodeLister, PlacementActuator
from agent.core.text import small_ints

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
StrArray = npt.NDArray[np.str_]

POLICY = "rollback"


@dataclass
class RollbackPlan:
    caps: GpuTargets  # GPUs whose last change by us was a cap, never released since
    cap_w: FloatArray  # the cap we set last on each
    drained: list[str]  # nodes the placement system says we drained
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (target, why left alone)
    nodes_checked: int = 0
    notes: list[str] = field(default_factory=list)  # what the operator should know

    def summary(self) -> dict[str, Any]:
        return {
            "caps_to_release": len(self.caps),
            "gpus": self.caps.names(),
            "nodes_to_resume": list(self.drained),
            "skipped": [{"target": t, "why": w} for t, w in self.skipped],
            "nodes_checked": self.nodes_checked,
            "notes": list(self.notes),
        }


# Decisions whose refusals may still come (the loop writes a cycle's refusals right after its
# decisions): enough for many cycles, bounded for an audit log of years.
_OPEN_DECISIONS = 4096


class _CapLedger:
    """Per GPU (columnar): whether a cap of ours may be in force, and its watts."""

    def __init__(self) -> None:
        self.state = KeyedColumns(
            {
                "uuid": ("U128", ""),
                "watts": (np.float64, np.nan),
                "active": (np.bool_, False),
            }
        )
        # decision id -> (its GPUs' names, their active flags and watts before it). Names, not
        # slots: a slot moves when a new key is added.
        self.before: OrderedDict[str, tuple[StrArray, BoolArray, FloatArray]] = OrderedDict()

    def _names(self, rec: dict[str, Any]) -> StrArray | None:
        names = rec.get("target")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            return None
        return np.asarray(names, dtype=np.str_)

    def _slots(self, rec: dict[str, Any]) -> IntArray | None:
        names = self._names(rec)
        if names is None:
            return None
        slots = self.state.slots(names)
        uuids = rec.get("uuid")
        if isinstance(uuids, list) and len(uuids) == len(names):
            self.state["uuid"][slots] = np.asarray([str(u) for u in uuids], dtype=np.str_)
        return slots

    def set(self, rec: dict[str, Any], slots: IntArray) -> None:
        after = rec.get("after")
        try:
            watts = (
                np.asarray(after, dtype=np.float64)
                if isinstance(after, list) and len(after) == len(slots)
                else np.full(len(slots), np.nan)
            )
        except (TypeError, ValueError):
            watts = np.full(len(slots), np.nan)
        self.state["watts"][slots] = watts
        self.state["active"][slots] = True

    def decision(self, rec: dict[str, Any]) -> None:
        slots = self._slots(rec)
        if slots is None:
            return
        names = self.state.keys[slots]
        did = str(rec.get("decision_id", ""))
        self.before[did] = (
            names.copy(),
            self.state["active"][slots].copy(),
            self.state["watts"][slots].copy(),
        )
        while len(self.before) > _OPEN_DECISIONS:
            self.before.popitem(last=False)
        self.set(rec, slots)  # may be in force from now: its action may never be recorded

    def refused(self, rec: dict[str, Any]) -> None:
        """The guard refused (part of) a decision: those GPUs are as they were before it."""
        saved = self.before.get(str(rec.get("decision_id", "")))
        names = self._names(rec)
        if saved is None or names is None:
            return
        decided, active, watts = saved
        where = {str(name): k for k, name in enumerate(decided.tolist())}
        pos = np.asarray([where.get(str(n), -1) for n in names.tolist()], dtype=np.int64)
        known = pos >= 0
        if not known.any():
            return
        slots = self.state.slots(names[known])
        self.state["active"][slots] = active[pos[known]]
        self.state["watts"][slots] = watts[pos[known]]

    def action(self, rec: dict[str, Any], kind: str) -> None:
        slots = self._slots(rec)
        if slots is None:
            return
        outcome = rec.get("outcome")
        if kind == "release_power_cap":
            if outcome == str(Outcome.APPLIED):
                self.state["active"][slots] = False
        elif outcome == str(Outcome.APPLIED):
            self.set(rec, slots)
        elif outcome == str(Outcome.REFUSED):
            self.refused(rec)
        # FAILED: the actuator may have applied it before failing (a timeout): still in force.


def our_caps(records: Iterable[dict[str, Any]]) -> tuple[GpuTargets, FloatArray]:
    """The caps of ours that may be in force (see the module docstring), columnar per record."""
    ledger = _CapLedger()
    for rec in records:
        kind = rec.get("kind")
        if kind not in ("set_power_cap", "release_power_cap") or rec.get("dry_run"):
            continue
        event = rec.get("event")
        if event == "action":
            ledger.action(rec, str(kind))
        elif event == "decision" and kind == "set_power_cap":
            ledger.decision(rec)
        elif event == "refusal" and kind == "set_power_cap":
            ledger.refused(rec)
    state = ledger.state
    sel = state["active"]
    keys = state.keys[sel]
    if keys.size == 0:
        return GpuTargets.empty(), np.zeros(0)
    node, gpu_text = split_gpu_names(keys)
    gpu, gpu_ok = small_ints(gpu_text)
    targets = GpuTargets(
        node=node,
        gpu=gpu,
        uuid=state["uuid"][sel].astype(np.str_),
    )
    return targets.subset(gpu_ok), state["watts"][sel][gpu_ok]


def nodes_named(records: Iterable[dict[str, Any]]) -> list[str]:
    """Every node our drain actions name (applied ones: what we may still hold)."""
    out: set[str] = set()
    for rec in records:
        if (
            rec.get("event") == "action"
            and rec.get("kind") == "drain_node"
            and rec.get("outcome") == str(Outcome.APPLIED)
            and isinstance(rec.get("target"), str)
        ):
            out.add(rec["target"])
    return sorted(out)


def plan_rollback(
    records: Sequence[dict[str, Any]],
    placement: PlacementActuator | None,
    extra_nodes: Sequence[str] = (),
) -> RollbackPlan:
    caps, cap_w = our_caps(records)
    plan = RollbackPlan(caps=caps, cap_w=cap_w, drained=[])
    if placement is None:
        plan.notes.append("no placement actuator configured: no node is resumed")
        return plan
    names = set(nodes_named(records)) | set(extra_nodes)
    if isinstance(placement, NodeLister):
        names |= set(placement.all_nodes())
    else:
        plan.notes.append(
            "the placement system cannot list its nodes: only the nodes the audit log names "
            "(and --node) were checked"
        )
    ordered = sorted(names)
    plan.nodes_checked = len(ordered)
    if not ordered:
        return plan
    states = placement.node_states(ordered)
    ours = set(nodes_named(records))
    for k, node in enumerate(ordered):
        if not states.known[k]:
            if node in ours:
                plan.skipped.append((node, "unknown to the placement system"))
        elif states.drained_by_us[k]:
            plan.drained.append(node)
        elif node in ours and states.drained[k]:
            plan.skipped.append((node, f"drained by someone else now ({str(states.reason[k])!r})"))
    return plan


def run_rollback(
    plan: RollbackPlan,
    *,
    caps: CapActuator | None,
    placement: PlacementActuator | None,
    audit: AuditLog,
    dry_run: bool,
    now_s: float,
    run_id: str | None = None,
) -> list[Action]:
    """Release and resume what the plan says, each one decision and one audited action."""
    run_id = run_id or secrets.token_hex(3)
    counter = iter(range(1, 1 << 30))

    def next_id(prefix: str) -> str:
        return f"{prefix}-rollback-{run_id}-{next(counter):04d}"

    intents: list[Intent] = []
    if len(plan.caps):
        intents.append(
            ReleasePowerCap(
                policy=POLICY,
                reason="ooda rollback: release every cap the agent set",
                evidence={"last_cap_w": plan.cap_w},
                targets=plan.caps,
            )
        )
    intents.extend(
        ResumeNode(
            policy=POLICY, reason="ooda rollback: resume every node the agent drained", node=node
        )
        for node in plan.drained
    )
    executor = Executor(
        Actuators(caps=caps, placement=placement),
        Authority(always="ooda rollback --dry-run" if dry_run else None),
    )
    pairs = [(next_id("d"), intent) for intent in intents]
    with audit.batch():  # the decisions are durable before anything is changed
        audit.event("rollback", run_id=run_id, dry_run=dry_run, time_s=now_s, **plan.summary())
        for decision_id, intent in pairs:
            audit.decision(decision_id, intent, dry_run, now_s)
    actions = executor.execute(pairs, lambda: next_id("a"), now_s)
    with audit.batch():
        for action in actions:
            audit.action(action)
    return actions

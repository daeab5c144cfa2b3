"""What a killed agent did after its last state save, found again in the audit log.

The daemon saves what it owns after each cycle that acted. A kill between an actuator call and
that save (SIGKILL, power lost) would forget caps it had set: nobody would ever release them.
The audit log still has them, because every decision is fsynced before its actuator runs and
every action right after. On start, the loop's records made after the save (its decisions timed
after the loop's clock at the save, and the records of those decisions; all of them when there
is no state to start from) are read back:

- The last live cap change of ours per GPU is kept **pending** in the ledger. It comes from an
  applied action, or from a decision that has no action on record: the kill came while its
  actuator ran, so whether it was done is unknown. A pending cap is adopted as ours at the first
  cycle that sees the GPU with that very cap in force (within the dead band). A pending release
  ends our ownership once the GPU is seen at its default. Telemetry decides, not the log: the
  twin's cluster is restored from its own save and may not have them, and a cap someone changed
  since is not ours.
- Live node actions (drains, resumes, weight and feature changes) go into the ledger's history
  as they were, for the cooldowns, rate limits and circuit breaker. Who drained a node is read
  from the placement system itself (our reason prefix), so ownership of drains needs nothing
  here.

Advice (dry-run records) is not recovered: it is recorded again at the next cycle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.act.audit import ReadStats, audit_files, file_records
from agent.act.ledger import Ledger
from agent.core.clock import as_time_s
from agent.core.intents import (
    Action,
    DrainNode,
    Intent,
    IntentKind,
    Outcome,
    ResumeNode,
    SetNodeFeatures,
    SetNodeWeight,
)
from agent.core.keyed import KeyedColumns

# The agent loop's own ids: `d-<run>-<cycle>-<n>`, `a-<run>-<cycle>-<n>`, and `...-exit...` for
# the on-exit step (not `ooda rollback`'s or `ooda guard`'s: they save no state of ours).
_LOOP_ID = re.compile(r"^[da]-[0-9a-f]+-(?:\d+|exit)(?:-|$)")
_CAP_KINDS = (str(IntentKind.SET_POWER_CAP), str(IntentKind.RELEASE_POWER_CAP))


@dataclass
class Recovered:
    """What was found after the last save, and what became of it."""

    records: int = 0  # the loop's records after the save
    pending_caps: int = 0  # GPUs whose last change of ours awaits telemetry
    unconfirmed: int = 0  # of those: from decisions whose outcome was never recorded
    node_actions: int = 0  # live node actions replayed into the ledger's history
    skipped_lines: int = 0  # lines that did not parse (a torn last line)


def _time(record: dict[str, Any]) -> float | None:
    return as_time_s(record.get("time_s"))


def _loop_records(file: Path, found: Recovered) -> list[dict[str, Any]]:
    """The loop's decision, refusal and action records of one audit file, in order."""
    stats = ReadStats()
    out = [
        r
        for r in file_records(file, stats)
        if r.get("event") in ("decision", "refusal", "action")
        and isinstance(r.get("decision_id"), str)
        and _LOOP_ID.match(r["decision_id"])
    ]
    found.skipped_lines += stats.skipped
    return out


def unsaved_records(audit_path: Path, saved_s: float, found: Recovered) -> list[dict[str, Any]]:
    """The loop's records of the decisions made after `saved_s` (the loop's clock when the
    state was saved), oldest first. Files are read newest first, and only until one starts with a
    decision the save covered."""
    chunks: list[list[dict[str, Any]]] = []
    for file in reversed(audit_files(audit_path)):
        records = _loop_records(file, found)
        chunks.append(records)
        first = next((_time(r) for r in records if r["event"] == "decision"), None)
        if first is not None and first <= saved_s:
            break
    ordered = [r for chunk in reversed(chunks) for r in chunk]
    after = {
        r["decision_id"]
        for r in ordered
        if r["event"] == "decision" and (t := _time(r)) is not None and t > saved_s
    }
    return [r for r in ordered if r["decision_id"] in after]


def _names(record: dict[str, Any]) -> list[str]:
    target = record.get("target")
    if isinstance(target, list):
        return [str(x) for x in target]
    return [str(target)] if isinstance(target, str) else []


def _watts(record: dict[str, Any], n: int) -> np.ndarray[Any, np.dtype[np.float64]]:
    after = record.get("after")
    if isinstance(after, list) and len(after) == n:
        return np.array([x if isinstance(x, int | float) else np.nan for x in after], dtype=float)
    return np.full(n, np.nan)


def _node_intent(record: dict[str, Any]) -> Intent | None:
    kind, node = record.get("kind"), record.get("target")
    if not isinstance(node, str):
        return None
    policy, reason = str(record.get("policy", "")), str(record.get("reason", ""))
    after = record.get("after")
    fields = after if isinstance(after, dict) else {}
    if kind == IntentKind.DRAIN_NODE:
        return DrainNode(policy=policy, reason=reason, node=node)
    if kind == IntentKind.RESUME_NODE:
        return ResumeNode(policy=policy, reason=reason, node=node)
    if kind == IntentKind.SET_NODE_WEIGHT and isinstance(fields.get("weight"), int):
        return SetNodeWeight(policy=policy, reason=reason, node=node, weight=fields["weight"])
    if kind == IntentKind.SET_NODE_FEATURES:
        return SetNodeFeatures(
            policy=policy,
            reason=reason,
            node=node,
            add=frozenset(map(str, fields.get("add", []))),
            remove=frozenset(map(str, fields.get("remove", []))),
        )
    return None


def recover(ledger: Ledger, audit_path: Path, saved_s: float) -> Recovered:
    """Read what the loop did after `saved_s` back into the `ledger` (see the module's doc)."""
    found = Recovered()
    records = unsaved_records(audit_path, saved_s, found)
    found.records = len(records)
    acted = {r["decision_id"] for r in records if r["event"] == "action"}
    refused: dict[str, set[str]] = {}
    for r in records:
        if r["event"] == "refusal":
            refused.setdefault(r["decision_id"], set()).update(_names(r))
    time_of = {r["decision_id"]: _time(r) for r in records if r["event"] == "decision"}
    # Per GPU name, the last change: watts (NaN: a release), when, and whether unconfirmed.
    last = KeyedColumns(
        {"watts": (np.float64, np.nan), "time_s": (np.float64, 0.0), "unconfirmed": (bool, False)}
    )
    for r in records:
        t = time_of.get(r["decision_id"])
        if t is None or r.get("dry_run") is not False:  # advice: recorded again next cycle
            continue
        applied = r["event"] == "action" and r.get("outcome") == str(Outcome.APPLIED)
        if r.get("kind") not in _CAP_KINDS:
            intent = _node_intent(r) if applied else None
            if intent is not None:
                action_id = str(r.get("action_id", ""))
                ledger.record(
                    Action(action_id, r["decision_id"], intent, Outcome.APPLIED, False, time_s=t),
                    t,
                )
                found.node_actions += 1
            continue
        unconfirmed = r["event"] == "decision" and r["decision_id"] not in acted
        if not (unconfirmed or applied):
            continue
        names = np.asarray(_names(r), dtype=np.str_)
        release = r.get("kind") == str(IntentKind.RELEASE_POWER_CAP)
        watts = np.full(names.size, np.nan) if release else _watts(r, names.size)
        keep = np.full(names.size, release) | np.isfinite(watts)
        if unconfirmed:
            keep &= ~np.isin(names, sorted(refused.get(r["decision_id"], ())))
        slots = last.slots(names[keep])  # records in order: a later change overwrites
        last["watts"][slots] = watts[keep]
        last["time_s"][slots] = t
        last["unconfirmed"][slots] = unconfirmed
    if len(last):
        ledger.remember_pending(last.keys, last["watts"], last["time_s"])
        found.pending_caps = len(last)
        found.unconfirmed = int(last["unconfirmed"].sum())
    return found

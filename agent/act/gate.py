"""The gate: every intent passes here before any actuator sees it. Every refusal rule lives here;
what the agent owns and did lives in the ledger (agent.act.ledger), which the gate reads.

For caps (columnar, per GPU): no action on GPUs that cannot be seen (stale or unknown); caps
clipped to the GPU's own constraints (never outside NVML's min/max; unknown bounds are refused);
a dead band (a change smaller than `cap_dead_band_w` is no change); a per-GPU cooldown (no second
change within `cap_cooldown_s`, except lowering a cap, which is the safe direction); releases only
of caps we set (ownership).

For every target, caps and nodes alike: nothing outside the rollout's scope (node names,
partitions) and nothing on a node that opted out (`NodeStates.opted_out`, the feature or label
`ooda-ignore`): neither the node nor its GPUs' caps. No node action on a node whose GPUs are all
stale.

Node intents: a per-node cooldown; ownership (never drain, re-weight or re-feature a node someone
else drained: only undoing our own weight or features is allowed there; resumes only of our
drains); a global rate limit on drains and one on weight/feature changes; and the drain circuit
breaker: never more than `breaker_max_nodes` nodes, nor `breaker_max_pct` % of the cluster,
drained by us within `breaker_window_s`. The drain that would go beyond trips it; once open it
refuses every drain, says so every cycle (a cycle error and a critical Notify) and stays open,
across restarts (the ledger saves it), until a person resets it: `ooda guard reset` leaves a
request file in the daemon's state directory that the gate consumes at its next review (audited).

Whether an intent is live or only advice (it changes which caps count as ours, and which drains
count towards the limits) is the authority's answer (agent.act.authority). Every refusal carries
its reason and is audited by the caller.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.act.authority import Authority
from agent.act.guard import GUARD_POLICY, GuardSettings
from agent.act.ledger import Ledger
from agent.core.intents import (
    DrainNode,
    Intent,
    LockClocks,
    Notify,
    ReleasePowerCap,
    RequeueJob,
    ResetClocks,
    ResumeNode,
    SetNodeFeatures,
    SetNodeWeight,
    SetPowerCap,
    Severity,
)
from agent.core.keyed import RowIndex
from agent.core.situation import NodeStates, Situation

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]
NodeIntent = DrainNode | ResumeNode | SetNodeWeight | SetNodeFeatures

NOT_SEEN = "GPU not seen this cycle"
STALE = "telemetry stale: no action on what cannot be seen"


@dataclass(frozen=True, slots=True)
class Refusal:
    intent: Intent  # what was refused (for caps: the refused targets only)
    reason: str
    origin: Intent | None = None  # the intent it came from (the decision)


@dataclass
class Review:
    allowed: list[Intent] = field(default_factory=list)
    origin: list[Intent] = field(default_factory=list)  # per allowed: the intent it came from
    refused: list[Refusal] = field(default_factory=list)
    unchanged: int = 0  # targets already where the intent wants them (dead band, our drains)
    raised: list[Intent] = field(default_factory=list)  # the gate's own intents (in allowed)
    alarms: list[str] = field(default_factory=list)  # what a person must know (cycle errors)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # to audit
    # Within this review: the drains allowed so far (node, live) and weight/feature changes.
    drains: list[tuple[str, bool]] = field(default_factory=list)
    steered: int = 0

    def allow(self, intent: Intent, origin: Intent) -> None:
        self.allowed.append(intent)
        self.origin.append(origin)

    def refuse(self, intent: Intent, reason: str) -> None:
        self.refused.append(Refusal(intent, reason, intent))


class _Nodes:
    """Per node of this cycle's snapshot: its index, why it may not be touched at all (scope,
    opt-out), and whether any of its GPUs can be seen."""

    def __init__(self, situation: Situation, authority: Authority) -> None:
        snap = situation.snapshot
        self.names = snap.node_names
        nodes = situation.nodes
        block = authority.scope.refusals(self.names, nodes)
        if nodes is not None and nodes.opted_out.shape == self.names.shape:
            block[(block == "") & nodes.opted_out] = "opted out (ooda-ignore): never touched"
        self.block = block
        self.visible = np.bincount(snap.node[snap.fresh], minlength=snap.n_nodes) > 0
        self._index: dict[str, int] | None = None

    def index(self, node: str) -> int | None:
        if self._index is None:
            self._index = {str(n): k for k, n in enumerate(self.names.tolist())}
        return self._index.get(node)


@dataclass(frozen=True, eq=False)
class _CapView:
    """One cap intent's targets as the gate sees them, per target."""

    rows: npt.NDArray[np.int64]  # the snapshot row (valid where `known`)
    known: BoolArray  # seen this cycle
    fresh: BoolArray
    bounded: BoolArray  # the GPU's cap range is known
    ours: FloatArray  # our cap as this intent sees it (recorded ones if advice), NaN: none
    slots: npt.NDArray[np.int64]  # the ledger's slot of those that have one (`have`)
    have: BoolArray
    current: FloatArray  # the cap in force as this intent sees it
    wanted: FloatArray  # the cap it would leave, clipped to the GPU's range
    cooling: BoolArray  # a raise within the cooldown


@dataclass(frozen=True, eq=False)
class _NodeCase:
    """One node intent and what the gate knows of its node."""

    intent: NodeIntent
    k: int  # the node's index in the snapshot
    states: NodeStates | None
    slot: int  # the node's slot in the ledger
    dry: bool  # only advice
    others: bool  # drained by someone else

    @property
    def held(self) -> str:
        reason = str(self.states.reason[self.k]) if self.states is not None else ""
        return f"drained by someone else (reason: {reason!r})"


UNCHANGED = "\0unchanged"  # a node rule's verdict: already as the intent wants it


class Gate:
    def __init__(
        self,
        ledger: Ledger | None = None,
        authority: Authority | None = None,
        *,
        reset_file: Path | None = None,
    ) -> None:
        self.ledger = ledger or Ledger()
        self.authority = authority or Authority()
        self.reset_file = reset_file

    @property
    def settings(self) -> GuardSettings:
        return self.ledger.settings

    def review(self, intents: Sequence[Intent], situation: Situation, now_s: float) -> Review:
        review = Review()
        self._consume_reset(now_s, review)
        self.authority.pin(now_s)
        self.ledger.begin_review(now_s)
        # Each target's row, and each seen GPU's entry of ours: found by hash, once a cycle
        # (targets are most GPUs at scale; a binary search over UUIDs cost ten times as much).
        index = self.ledger.rows(situation.snapshot)
        ours_at = self.ledger.caps.lookup(situation.snapshot.uuid)
        nodes = _Nodes(situation, self.authority)
        for intent in intents:
            dry = self.authority.advisory(intent)
            if intent.expires_s < now_s:
                review.refuse(intent, "expired before it could be applied")
            elif isinstance(intent, SetPowerCap | ReleasePowerCap):
                self._review_caps(intent, situation, index, ours_at, nodes, now_s, dry, review)
            elif isinstance(intent, LockClocks | ResetClocks):
                # Until the node daemon's clock lever lands with the caps' safety (leases,
                # bounds, ownership, rollback), a clock intent changes nothing.
                review.refuse(intent, "clock locks are not yet applied through the node daemon")
            elif isinstance(intent, RequeueJob):
                self._review_requeue(intent, nodes, review)
            elif isinstance(intent, NodeIntent):
                self._review_node(intent, situation, nodes, now_s, dry, review)
            else:
                review.allow(intent, intent)  # notifications change nothing on the cluster
        if self.ledger.breaker.open:
            self._alarm(review)
        return review

    # -- caps --------------------------------------------------------------------------------------

    def _review_caps(
        self,
        intent: SetPowerCap | ReleasePowerCap,
        situation: Situation,
        index: RowIndex,
        ours_at: tuple[npt.NDArray[np.int64], BoolArray],
        nodes: _Nodes,
        now_s: float,
        dry: bool,
        review: Review,
    ) -> None:
        """`index`: the snapshot's row of each UUID; `ours_at`: per snapshot row, its slot in
        the ledger's caps and whether it has one."""
        if intent.targets.uuid.shape[0] == 0:
            return
        if situation.snapshot.n_gpus == 0:  # nothing seen: nothing to index into
            review.refused.append(Refusal(intent, NOT_SEEN, intent))
            return
        view = self._cap_view(intent, situation, index, ours_at, now_s, dry)
        reasons = self._cap_refusals(intent, view, situation, nodes)
        ok = reasons == ""
        unchanged = ok & (np.abs(view.wanted - view.current) < self.settings.cap_dead_band_w)
        review.unchanged += int(unchanged.sum())
        if isinstance(intent, ReleasePowerCap) and unchanged.any():
            settled = unchanged & np.isfinite(view.ours)  # ours, and at the default already
            if settled.any():
                self._found_released(intent, settled, ours_at[0][view.rows][settled], dry, review)
        for reason in np.unique(reasons[~ok].astype(np.str_)):
            review.refused.append(Refusal(intent.subset(reasons == reason), str(reason), intent))
        go = ok & ~unchanged
        if go.any():
            review.allow(_clipped(intent, go, view.wanted), intent)

    def _cap_view(
        self,
        intent: SetPowerCap | ReleasePowerCap,
        situation: Situation,
        index: RowIndex,
        ours_at: tuple[npt.NDArray[np.int64], BoolArray],
        now_s: float,
        dry: bool,
    ) -> _CapView:
        s = self.settings
        uuids = intent.targets.uuid
        n = uuids.shape[0]
        rows, known = index.find_picked(uuids, intent.targets.picked())
        lo = situation.min_cap_w[rows]
        hi = situation.max_cap_w[rows]
        # A GPU not seen is refused, whatever we remember of it.
        have = known & ours_at[1][rows]
        slots = ours_at[0][rows][have]
        ours = np.full(n, np.nan)
        last_change_s = np.full(n, -np.inf)
        ours[have], last_change_s[have] = self.ledger.our_caps(slots, dry)
        current = np.where(dry & np.isfinite(ours), ours, situation.cap_w[rows])
        if isinstance(intent, SetPowerCap):
            wanted = np.clip(intent.watts, lo, hi)
        else:
            wanted = situation.default_cap_w[rows]
        raising = ~(wanted < current)  # NaN current counts as raising: unknown is not safe
        # Above our own last cap is a raise too, whatever the telemetry says: a limit read
        # before our change took effect (scrape lag) must not open the cooldown.
        raising |= np.isfinite(ours) & (wanted - ours >= s.cap_dead_band_w)
        return _CapView(
            rows=rows,
            known=known,
            fresh=known & situation.snapshot.fresh[rows],
            bounded=np.isfinite(lo) & np.isfinite(hi),
            ours=ours,
            slots=slots,
            have=have,
            current=current,
            wanted=wanted,
            cooling=raising & (now_s - last_change_s < s.cap_cooldown_s),
        )

    def _cap_refusals(
        self,
        intent: SetPowerCap | ReleasePowerCap,
        view: _CapView,
        situation: Situation,
        nodes: _Nodes,
    ) -> npt.NDArray[np.object_]:
        """Per target, the first rule that refuses it ("" when none does), in order."""
        s = self.settings
        reasons = np.full(view.rows.shape, "", dtype=object)
        reasons[~view.known] = NOT_SEEN
        if situation.snapshot.n_nodes:  # scope and opt-out, per node
            blocked = np.where(view.known, nodes.block[situation.snapshot.node[view.rows]], "")
            hit = view.known & (blocked != "")
            reasons[hit] = blocked[hit]
        rules: list[tuple[BoolArray, str]] = [
            (view.known & ~view.fresh, STALE),
            (~view.bounded, "the GPU's cap range is unknown"),
        ]
        if isinstance(intent, SetPowerCap):  # a policy's NaN is no cap (clipping keeps it NaN)
            rules.append((~np.isfinite(intent.watts), "the cap asked is not a number"))
        else:
            rules.append((~np.isfinite(view.ours), "not capped by us"))
            rules.append((~np.isfinite(view.wanted), "the GPU's default limit is unknown"))
        changing = np.abs(view.wanted - view.current) >= s.cap_dead_band_w
        rules.append(
            (view.cooling & changing, f"cooldown: changed less than {s.cap_cooldown_s:g} s ago")
        )
        for hit, reason in rules:
            reasons[(reasons == "") & hit] = reason
        return reasons

    def _found_released(
        self,
        release: ReleasePowerCap,
        settled: BoolArray,
        slots: npt.NDArray[np.int64],
        dry: bool,
        review: Review,
    ) -> None:
        """A release of ours that finds the GPUs at their default already (a reset, a reboot):
        nothing to do, but our cap is gone, so the GPUs are no longer ours. Kept, a later
        release of ours would undo a cap someone else set there."""
        self.ledger.forget_cap(slots, live=not dry)
        review.events.append(
            (
                "guard_cap_found_released",
                {
                    "policy": release.policy,
                    "uuids": release.targets.uuid[settled].tolist(),
                    "reason": "our release found the default limit in place: no longer ours",
                },
            )
        )

    # -- node intents ------------------------------------------------------------------------------

    def _review_requeue(self, intent: RequeueJob, nodes: _Nodes, review: Review) -> None:
        """Not a change to the node, but to work on it: scope and opt-out still hold, so a node
        they cannot be checked for (not seen, or none named under a scope) is refused."""
        k = nodes.index(intent.node) if intent.node else None
        if intent.node and k is None:
            review.refuse(
                intent,
                f"node {intent.node} not seen this cycle: its scope and opt-out cannot be checked",
            )
        elif k is not None and nodes.block[k]:
            review.refuse(intent, f"{nodes.block[k]} (node {intent.node})")
        elif k is None and not self.authority.scope.everything:
            review.refuse(intent, "the job's node is not known: the rollout scope cannot hold")
        else:
            review.allow(intent, intent)

    def _review_node(
        self,
        intent: NodeIntent,
        situation: Situation,
        nodes: _Nodes,
        now_s: float,
        dry: bool,
        review: Review,
    ) -> None:
        """A drain, resume, weight or feature change: each rule in turn, the first refusal
        wins; a node already as the intent wants it is unchanged."""
        k, why = _node_in_reach(intent.node, situation, nodes)
        if k is None:
            review.refuse(intent, why)
            return
        case = self._node_case(intent, k, situation.nodes, dry)
        verdict = (
            self._ownership(case)
            or self._node_cooldown(case, now_s)
            or self._node_limits(case, situation.snapshot.n_nodes, now_s, review)
        )
        if verdict == UNCHANGED:
            review.unchanged += 1
        elif verdict:
            review.refuse(intent, verdict)
        else:
            self._allow_node(case, review)

    def _node_case(
        self, intent: NodeIntent, k: int, states: NodeStates | None, dry: bool
    ) -> _NodeCase:
        others = states is not None and bool(states.drained[k] and not states.drained_by_us[k])
        slot = int(self.ledger.nodes.slots(np.array([intent.node]))[0])
        return _NodeCase(intent, k, states, slot, dry, others)

    def _ownership(self, case: _NodeCase) -> str:
        """Never touch a node someone else drained (only undo our own weight or features
        there); a drain of a node drained by us, or a resume of one in service, is unchanged."""
        intent = case.intent
        if isinstance(intent, DrainNode):
            return self._drain_ownership(case)
        if isinstance(intent, ResumeNode):
            return self._resume_ownership(case)
        found = int(self.ledger.nodes["found_weight"][case.slot])
        undo = (
            not intent.add
            if isinstance(intent, SetNodeFeatures)
            else found >= 0 and intent.weight == found
        )
        if case.others and not undo:
            what = "re-weighted" if isinstance(intent, SetNodeWeight) else "re-featured"
            return f"{case.held}: never {what} by us (only our own changes undone)"
        return ""

    def _drain_ownership(self, case: _NodeCase) -> str:
        if case.others:
            return f"{case.held}: never touched by us"
        states, k = case.states, case.k
        # Live, only a real drain of ours is one (a drain recorded as advice is not).
        ours_now = states is not None and (
            bool(states.drained_by_us[k]) if case.dry else states.live_drained_by_us(k)
        )
        recorded = case.dry and np.isfinite(self.ledger.nodes["drained_s"][case.slot])
        return UNCHANGED if ours_now or recorded else ""

    def _resume_ownership(self, case: _NodeCase) -> str:
        if case.others:
            return "drained by someone else: never resumed by us"
        states, k = case.states, case.k
        drained = states is not None and (
            bool(states.drained[k]) if case.dry else states.live_drained(k)
        )
        recorded = case.dry and np.isfinite(self.ledger.nodes["drained_s"][case.slot])
        return "" if drained or recorded else UNCHANGED  # in service already

    def _node_cooldown(self, case: _NodeCase, now_s: float) -> str:
        since = now_s - float(self.ledger.nodes["last_change_s"][case.slot])
        if since < self.settings.node_cooldown_s:
            return f"cooldown: node changed {since:.0f} s ago"
        return ""

    def _node_limits(self, case: _NodeCase, n_nodes: int, now_s: float, review: Review) -> str:
        """The drain limits (circuit breaker, rate) or the weight/feature rate limit."""
        if isinstance(case.intent, DrainNode):
            # Advice counts every drain, as live would; a live drain only the live ones. Advice
            # beside a live agent must not trip the breaker that holds the live drains.
            may_trip = not case.dry or self.authority.dry_run
            return self._drain_limits(case.intent.node, n_nodes, now_s, review, case.dry, may_trip)
        if isinstance(case.intent, SetNodeWeight | SetNodeFeatures):
            return self._steer_rate(case.dry, now_s, review.steered)
        return ""

    def _steer_rate(self, dry: bool, now_s: float, steered: int) -> str:
        s = self.settings
        window = s.steer_rate_window_s
        ledger = self.ledger
        history = [*ledger.steers, *ledger.advised_steers] if dry else ledger.steers
        recent = sum(1 for t, _ in history if t > now_s - window) + steered
        if recent >= s.steer_rate_max:
            return (
                f"rate limit: {recent} weight/feature changes in the last {window:g} s "
                f"(at most {s.steer_rate_max})"
            )
        return ""

    def _allow_node(self, case: _NodeCase, review: Review) -> None:
        intent = case.intent
        if isinstance(intent, DrainNode):
            review.drains.append((intent.node, not case.dry))
        elif isinstance(intent, SetNodeWeight | SetNodeFeatures):
            review.steered += 1  # the rate limit counts those within the review too
            found = int(self.ledger.nodes["found_weight"][case.slot])
            if isinstance(intent, SetNodeWeight) and found < 0 and case.states is not None:
                self.ledger.note_found_weight(intent, int(case.states.weight[case.k]))
        review.allow(intent, intent)

    # -- drains: the circuit breaker and the rate limit --------------------------------------------

    def breaker_limit(self, n_nodes: int) -> int:
        """The most nodes we may drain within the breaker's window in a cluster of `n_nodes`."""
        s = self.settings
        by_share = max(s.breaker_min_nodes, int(np.floor(s.breaker_max_pct / 100.0 * n_nodes)))
        return min(s.breaker_max_nodes, by_share)

    def _drain_limits(
        self,
        node: str,
        n_nodes: int,
        now_s: float,
        review: Review,
        advice: bool,
        may_trip: bool,
    ) -> str:
        """Why this drain may not go ahead ("" when it may); trips the breaker when due and
        `may_trip`. `advice`: recorded drains count too (else only those applied)."""
        b = self.ledger.breaker
        if b.open:
            return (
                f"circuit breaker open since t={b.opened_s:.0f} s ({b.reason}): "
                "no drains until a person runs `ooda guard reset`"
            )
        ledger = self.ledger
        history = [*ledger.drains, *ledger.advised_drains] if advice else ledger.drains
        this_review = [n for n, live in review.drains if live or advice]
        start = now_s - self.settings.breaker_window_s
        counted = {n for t, n in history if t > start and t >= b.last_reset_s}
        counted |= set(this_review)
        limit = self.breaker_limit(n_nodes)
        if node not in counted and len(counted) + 1 > limit:
            return self._trip(node, counted, limit, n_nodes, now_s, review, may_trip)
        window = self.settings.drain_rate_window_s
        recent = sum(1 for t, _ in history if t > now_s - window) + len(this_review)
        if recent >= self.settings.drain_rate_max:
            return (
                f"rate limit: {recent} drains in the last {window:g} s "
                f"(at most {self.settings.drain_rate_max}); retried when the window has room"
            )
        return ""

    def _trip(
        self,
        node: str,
        counted: set[str],
        limit: int,
        n_nodes: int,
        now_s: float,
        review: Review,
        may_trip: bool,
    ) -> str:
        """The drain of `node` would go beyond the breaker's limit: it trips (unless only
        advice beside a live agent asked), and the drain is refused."""
        s = self.settings
        why = (
            f"draining {node} would make {len(counted) + 1} nodes drained by us within "
            f"{s.breaker_window_s:g} s; the limit is {limit} ({s.breaker_max_nodes} nodes or "
            f"{s.breaker_max_pct:g}% of {n_nodes})"
        )
        if not may_trip:  # advice beside a live agent: refused, the breaker stays closed
            return f"circuit breaker would trip (advice; it stays closed): {why}"
        b = self.ledger.breaker
        b.open, b.opened_s, b.trips = True, now_s, b.trips + 1
        b.reason = why
        review.events.append(
            (
                "guard_breaker_tripped",
                {
                    "node": node,
                    "reason": b.reason,
                    "drained_in_window": sorted(counted),
                    "limit": limit,
                    "cluster_nodes": n_nodes,
                    "time_s": now_s,
                },
            )
        )
        return f"circuit breaker tripped: {b.reason}"

    def _alarm(self, review: Review) -> None:
        b = self.ledger.breaker
        message = (
            f"drain circuit breaker OPEN since t={b.opened_s:.0f} s: {b.reason}; every drain is "
            "refused until a person runs `ooda guard reset`"
        )
        review.alarms.append(message)
        if self.settings.breaker_notify:
            note = Notify(
                policy=GUARD_POLICY,
                reason=message,
                evidence={"opened_s": b.opened_s, "trips": b.trips},
                target="cluster",
                severity=Severity.CRITICAL,
                summary="ooda: drain circuit breaker open; `ooda guard reset` to drain again",
            )
            review.allow(note, note)
            review.raised.append(note)

    # -- the reset ---------------------------------------------------------------------------------

    def reset_breaker(self, now_s: float, by: str = "", note: str = "") -> dict[str, Any]:
        """Close the breaker and start counting drains afresh. Returns what to audit."""
        b = self.ledger.breaker
        fields: dict[str, Any] = {
            "was_open": b.open,
            "opened_s": b.opened_s,
            "reason": b.reason,
            "by": by,
            "note": note,
            "time_s": now_s,
        }
        b.open, b.opened_s, b.reason = False, None, ""
        b.last_reset_s = now_s
        return fields

    def _consume_reset(self, now_s: float, review: Review) -> None:
        """Apply a reset request left by `ooda guard reset`, once, and remove it."""
        path = self.reset_file
        if path is None:
            return
        try:
            stat = path.stat()
        except FileNotFoundError:
            return
        except OSError as exc:
            review.alarms.append(f"guard reset request {path}: cannot read ({exc})")
            return
        data = _reset_request(path)
        request_id = str(data.get("id") or f"{stat.st_ino}-{stat.st_mtime_ns}")
        breaker = self.ledger.breaker
        if request_id != breaker.last_reset_id:
            fields = self.reset_breaker(now_s, str(data.get("by", "")), str(data.get("note", "")))
            breaker.last_reset_id = request_id
            fields |= {"request_id": request_id, "requested_at": data.get("requested_at")}
            if "unreadable" in data:
                fields["request_unreadable"] = data["unreadable"]
            review.events.append(("guard_reset", fields))
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            review.alarms.append(
                f"guard reset applied, but its request {path} cannot be removed ({exc})"
            )


def _reset_request(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        # A person asked for a reset; an unreadable note does not make that less true.
        return {"unreadable": str(exc)}
    return data


def _node_in_reach(node: str, situation: Situation, nodes: _Nodes) -> tuple[int | None, str]:
    """The node's index, or why no node action may touch it at all: not seen, out of scope or
    opted out, every GPU stale, unknown to the placement system."""
    k = nodes.index(node)
    if k is None:
        return None, f"node {node} not seen this cycle"
    if nodes.block[k]:
        return None, str(nodes.block[k])
    if not nodes.visible[k]:
        return None, (
            f"telemetry stale: every GPU of {node} is stale; no action on what cannot be seen"
        )
    states = situation.nodes
    if states is not None and not states.known[k]:
        return None, f"node {node} unknown to the placement system"
    return k, ""


def _clipped(intent: SetPowerCap | ReleasePowerCap, go: BoolArray, wanted: FloatArray) -> Intent:
    """The allowed targets of `intent`; a cap clipped to each GPU's range (the request kept in
    the evidence when clipping changed it)."""
    allowed = intent.subset(go)
    if not isinstance(intent, SetPowerCap):
        return allowed
    requested = intent.watts[go]
    return SetPowerCap(
        policy=allowed.policy,
        reason=allowed.reason,
        evidence={**allowed.evidence, "requested_w": requested}
        if np.any(wanted[go] != requested)
        else allowed.evidence,
        expires_s=allowed.expires_s,
        targets=allowed.targets,
        watts=wanted[go],
    )

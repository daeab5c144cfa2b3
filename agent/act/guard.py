"""The guard: every intent passes here before any actuator sees it.

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
across restarts (it is part of `to_dict`), until a person resets it: `ooda guard reset` leaves a
request file in the daemon's state directory that the guard consumes at its next cycle (audited).

Every refusal carries its reason and is audited by the caller.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import socket
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, Field

from agent.act.rollout import Rollout
from agent.core.intents import (
    Action,
    DrainNode,
    Intent,
    Notify,
    Outcome,
    ReleasePowerCap,
    RequeueJob,
    ResumeNode,
    SetNodeFeatures,
    SetNodeWeight,
    SetPowerCap,
    Severity,
    gpu_names,
    split_gpu_names,
)
from agent.core.keyed import KeyedColumns, LastRowIndex, RowIndex
from agent.core.settings import STRICT_SETTINGS
from agent.core.situation import Situation
from agent.core.snapshot import Snapshot

BoolArray = npt.NDArray[np.bool_]

RESET_FILE = "guard-reset.request"
GUARD_POLICY = "guard"  # the policy name on the guard's own intents (its breaker alarm)
IDLE_JOB = "<idle>"  # what a cap was chosen for when its GPU was idle
_NODE_TIMES = ("last_change_s", "drained_s")  # per node, the times a clock jump can put ahead
_OURS = {True: "our_cap_w", False: "live_cap_w"}  # counting recorded caps as ours, or not


class GuardSettings(BaseModel):
    model_config = STRICT_SETTINGS

    cap_cooldown_s: float = Field(
        60.0, ge=0.0, description="Least time between two raises of one GPU's cap (s)."
    )
    cap_dead_band_w: float = Field(
        10.0, ge=0.0, description="Cap changes smaller than this are skipped (W)."
    )
    node_cooldown_s: float = Field(
        300.0, ge=0.0, description="Least time between two actions on one node (s)."
    )
    drain_rate_max: int = Field(
        3,
        ge=0,
        le=10_000,
        description="Rate limit: most drains within drain_rate_window_s (count); the drains "
        "beyond are refused until the window has room.",
    )
    drain_rate_window_s: float = Field(
        600.0, gt=0.0, description="The window of the drain rate limit (s)."
    )
    breaker_max_nodes: int = Field(
        5,
        ge=0,
        le=100_000,
        description="Circuit breaker: most distinct nodes drained by us within breaker_window_s "
        "(nodes); the drain beyond trips the breaker.",
    )
    breaker_max_pct: float = Field(
        10.0,
        ge=0.0,
        le=100.0,
        description="Circuit breaker: most nodes drained by us within breaker_window_s as a "
        "share of the cluster's nodes (%, rounded down, never below breaker_min_nodes); the "
        "lower of this and breaker_max_nodes holds.",
    )
    breaker_min_nodes: int = Field(
        1,
        ge=0,
        le=100_000,
        description="The percentage limit never goes below this many nodes (nodes), so one "
        "failing node of a small cluster can be drained.",
    )
    breaker_window_s: float = Field(
        3600.0, gt=0.0, description="The window the circuit breaker counts drains in (s)."
    )
    breaker_notify: bool = Field(
        True, description="While the breaker is open, send a critical Notify every cycle."
    )
    steer_rate_max: int = Field(
        20,
        ge=0,
        le=100_000,
        description="Rate limit: most node weight and feature changes within "
        "steer_rate_window_s (count).",
    )
    steer_rate_window_s: float = Field(
        600.0, gt=0.0, description="The window of the weight/feature rate limit (s)."
    )


NOT_SEEN = "GPU not seen this cycle"
# How long a cap change found after a crash (`pending`) waits for its GPU to be seen.
PENDING_HOLD_S = 1800.0
# What settling a pending change can find, as the `guard_caps_recovered` event lists them.
SETTLE_RESULTS = ("adopted", "released", "not_in_force", "given_up")


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
    raised: list[Intent] = field(default_factory=list)  # the guard's own intents (in allowed)
    alarms: list[str] = field(default_factory=list)  # what a person must know (cycle errors)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # to audit

    def allow(self, intent: Intent, origin: Intent) -> None:
        self.allowed.append(intent)
        self.origin.append(origin)

    def refuse(self, intent: Intent, reason: str) -> None:
        self.refused.append(Refusal(intent, reason, intent))


@dataclass
class BreakerState:
    open: bool = False
    opened_s: float | None = None
    reason: str = ""
    trips: int = 0
    last_reset_s: float = float("-inf")  # drains before this no longer count
    last_reset_id: str = ""  # the reset request last applied (never applied twice)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["last_reset_s"] = None if not np.isfinite(self.last_reset_s) else self.last_reset_s
        return out

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> BreakerState:
        last = data.get("last_reset_s")
        opened = data.get("opened_s")
        return BreakerState(
            open=bool(data.get("open", False)),
            opened_s=None if opened is None else float(opened),
            reason=str(data.get("reason", "")),
            trips=int(data.get("trips", 0)),
            last_reset_s=float("-inf") if last is None else float(last),
            last_reset_id=str(data.get("last_reset_id", "")),
        )


class _Nodes:
    """Per node of this cycle's snapshot: its index, why it may not be touched at all (scope,
    opt-out), and whether any of its GPUs can be seen."""

    def __init__(self, situation: Situation, rollout: Rollout | None) -> None:
        snap = situation.snapshot
        self.names = snap.node_names
        nodes = situation.nodes
        block = (
            rollout.scope.refusals(self.names, nodes)
            if rollout is not None
            else np.full(self.names.shape, "", dtype=object)
        )
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
class Settled:
    """Pending cap changes settled against telemetry (`Guard.adopt_pending`)."""

    event: dict[str, Any]  # the audit event's fields: GPU names by what became of them
    rows: npt.NDArray[np.int64]  # the snapshot rows of the caps adopted as ours
    watts: npt.NDArray[np.float64]  # and those caps


class Guard:
    def __init__(
        self,
        settings: GuardSettings | None = None,
        *,
        rollout: Rollout | None = None,
        reset_file: Path | None = None,
        is_dry: Callable[[Intent], bool] | None = None,
    ) -> None:
        self.settings = settings or GuardSettings()
        self.rollout = rollout
        self.reset_file = reset_file
        # Per intent: only recorded? (the executor's predicate; default: the loop's flag)
        self.is_dry = is_dry
        self.caps = KeyedColumns(
            {
                # Our cap, applied or (advising) recorded: what a dry-run intent sees as ours.
                "our_cap_w": (np.float64, np.nan),
                # Our cap applied for real: only this makes a GPU ours to a live intent (a cap
                # a dry-run policy only recorded beside a live agent never was).
                "live_cap_w": (np.float64, np.nan),
                "last_change_s": (np.float64, -np.inf),
                # The job the cap was last chosen for ("" unknown, IDLE_JOB: the GPU was idle).
                # Objects: job ids (Kubernetes namespace/pod names) may be of any length.
                "for_job": (object, ""),
            },
            hashed=True,  # asked about each cycle's targets: a new key array every time
        )
        self.nodes = KeyedColumns(
            {
                "last_change_s": (np.float64, -np.inf),
                "drained_s": (np.float64, np.nan),  # our drain (applied or recorded), NaN: none
                "found_weight": (np.int64, -1),  # the weight before our first change, -1: none
            }
        )
        # Cap changes of ours whose outcome is not known, by GPU name ("node/gpuN"; NaN watts:
        # a release): held in the audit log after the last state save (agent.act.recovery), or
        # from a call that failed (`failed_call`). Ours once telemetry shows them.
        self.pending = KeyedColumns(
            {
                "watts": (np.float64, np.nan),
                "time_s": (np.float64, 0.0),
                "failed_call": (bool, False),
            }
        )
        self.breaker = BreakerState()
        self._rows = LastRowIndex()  # each UUID's row in the snapshot, kept while they stay
        self.drains: list[tuple[float, str]] = []  # (time, node) of our drains, newest last
        self.steers: list[tuple[float, str]] = []  # (time, node) of our weight/feature changes
        # The same, only recorded (advice): they count for advice, never against live changes.
        self.advised_drains: list[tuple[float, str]] = []
        self.advised_steers: list[tuple[float, str]] = []
        self._found_pending: dict[int, int] = {}  # id(weight intent) -> the weight found

    # -- review ---------------------------------------------------------------------------------

    def rows(self, snapshot: Snapshot) -> RowIndex:
        """The row of each of the snapshot's UUIDs (kept while they stay the same)."""
        return self._rows.of(snapshot.uuid)

    def review(
        self, intents: Sequence[Intent], situation: Situation, now_s: float, dry_run_caps: bool
    ) -> Review:
        review = Review()
        self._consume_reset(now_s, review)
        if self.rollout is not None:
            self.rollout.pin(now_s)
        self._prune(now_s)
        self._found_pending.clear()
        # Each target's row, and each seen GPU's entry of ours: found by hash, once a cycle
        # (targets are most GPUs at scale; a binary search over UUIDs cost ten times as much).
        index = self.rows(situation.snapshot)
        ours_at = self.caps.lookup(situation.snapshot.uuid)
        nodes = _Nodes(situation, self.rollout)
        pending: list[tuple[str, bool]] = []  # drains allowed in this review, and if live
        steering = 0
        for intent in intents:
            dry = self.is_dry(intent) if self.is_dry is not None else dry_run_caps
            if intent.expires_s < now_s:
                review.refuse(intent, "expired before it could be applied")
            elif isinstance(intent, SetPowerCap | ReleasePowerCap):
                self._review_caps(intent, situation, index, ours_at, nodes, now_s, dry, review)
            else:
                steering += self._review_node(
                    intent, situation, nodes, now_s, dry, dry_run_caps, review, pending, steering
                )
        if self.breaker.open:
            self._alarm(review)
        return review

    def _review_caps(
        self,
        intent: SetPowerCap | ReleasePowerCap,
        situation: Situation,
        index: RowIndex,
        ours_at: tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]],
        nodes: _Nodes,
        now_s: float,
        dry_run: bool,
        review: Review,
    ) -> None:
        """`index`: the snapshot's row of each UUID; `ours_at`: per snapshot row, its entry in
        `caps` and whether it has one."""
        s = self.settings
        uuids = intent.targets.uuid
        n = uuids.shape[0]
        if n == 0:
            return
        if situation.snapshot.n_gpus == 0:  # nothing seen: nothing to index into
            review.refused.append(Refusal(intent, NOT_SEEN, intent))
            return
        rows, known = index.find(uuids)
        fresh = known & situation.snapshot.fresh[rows]
        lo = situation.min_cap_w[rows]
        hi = situation.max_cap_w[rows]
        bounded = np.isfinite(lo) & np.isfinite(hi)
        # A GPU not seen is refused below, whatever we remember of it.
        have = known & ours_at[1][rows]
        slot = ours_at[0][rows][have]
        ours = np.full(n, np.nan)  # our cap as this intent sees it (recorded ones if dry)
        ours[have] = self.caps[_OURS[dry_run]][slot]
        last_change_s = np.full(n, -np.inf)
        last_change_s[have] = self.caps["last_change_s"][slot]
        telemetry = situation.cap_w[rows]
        current = np.where(dry_run & np.isfinite(ours), ours, telemetry)
        if isinstance(intent, SetPowerCap):
            wanted = np.clip(intent.watts, lo, hi)
        else:
            wanted = situation.default_cap_w[rows]
        since = now_s - last_change_s
        raising = ~(wanted < current)  # NaN current counts as raising: unknown is not safe
        # Above our own last cap is a raise too, whatever the telemetry says: a limit read
        # before our change took effect (scrape lag) must not open the cooldown.
        raising |= np.isfinite(ours) & (wanted - ours >= s.cap_dead_band_w)
        cooling = raising & (since < s.cap_cooldown_s)

        reasons = np.full(n, "", dtype=object)
        reasons[~known] = NOT_SEEN
        if situation.snapshot.n_nodes:
            blocked = np.where(known, nodes.block[situation.snapshot.node[rows]], "")
            hit = known & (blocked != "")
            reasons[hit] = blocked[hit]
        reasons[(reasons == "") & known & ~fresh] = (
            "telemetry stale: no action on what cannot be seen"
        )
        reasons[(reasons == "") & ~bounded] = "the GPU's cap range is unknown"
        if isinstance(intent, SetPowerCap):  # a policy's NaN is no cap (clipping keeps it NaN)
            reasons[(reasons == "") & ~np.isfinite(intent.watts)] = "the cap asked is not a number"
        if isinstance(intent, ReleasePowerCap):
            reasons[(reasons == "") & ~np.isfinite(ours)] = "not capped by us"
            reasons[(reasons == "") & ~np.isfinite(wanted)] = "the GPU's default limit is unknown"
        reasons[(reasons == "") & cooling & (np.abs(wanted - current) >= s.cap_dead_band_w)] = (
            f"cooldown: changed less than {s.cap_cooldown_s:g} s ago"
        )
        ok = reasons == ""
        unchanged = ok & (np.abs(wanted - current) < s.cap_dead_band_w)
        review.unchanged += int(unchanged.sum())
        if isinstance(intent, ReleasePowerCap) and unchanged.any():
            settled = unchanged & np.isfinite(ours)  # ours, and at the default already
            if settled.any():
                self._settle(intent, settled, ours_at[0][rows][settled], dry_run, review)
        go = ok & ~unchanged
        for reason in np.unique(reasons[~ok].astype(np.str_)):
            review.refused.append(Refusal(intent.subset(reasons == reason), str(reason), intent))
        if go.any():
            allowed = intent.subset(go)
            if isinstance(intent, SetPowerCap):
                requested = intent.watts[go]
                clipped = SetPowerCap(
                    policy=allowed.policy,
                    reason=allowed.reason,
                    evidence={**allowed.evidence, "requested_w": requested}
                    if np.any(wanted[go] != requested)
                    else allowed.evidence,
                    expires_s=allowed.expires_s,
                    targets=allowed.targets,
                    watts=wanted[go],
                )
                review.allow(clipped, intent)
            else:
                review.allow(allowed, intent)

    def _settle(
        self,
        release: ReleasePowerCap,
        settled: npt.NDArray[np.bool_],
        slots: npt.NDArray[np.int64],
        dry_run: bool,
        review: Review,
    ) -> None:
        """A release of ours that finds the GPUs at their default already (a reset, a reboot):
        nothing to do, but our cap is gone, so the GPUs are no longer ours. Kept, a later
        release of ours would undo a cap someone else set there."""
        self.caps["our_cap_w"][slots] = np.nan
        if not dry_run:
            self.caps["live_cap_w"][slots] = np.nan
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

    def _review_node(
        self,
        intent: Intent,
        situation: Situation,
        nodes: _Nodes,
        now_s: float,
        dry: bool,
        all_dry: bool,
        review: Review,
        pending: list[tuple[str, bool]],
        steered: int,
    ) -> int:
        """Review one node (or job) intent; returns 1 when it is an allowed weight/feature
        change (the rate limit counts those within the review too)."""
        s = self.settings
        if isinstance(intent, RequeueJob):
            # Not a change to the node, but to work on it: scope and opt-out still hold, so a
            # node they cannot be checked for (not seen, or none named under a scope) is refused.
            k = nodes.index(intent.node) if intent.node else None
            if intent.node and k is None:
                review.refuse(
                    intent,
                    f"node {intent.node} not seen this cycle: its scope and opt-out cannot be "
                    "checked",
                )
            elif k is not None and nodes.block[k]:
                review.refuse(intent, f"{nodes.block[k]} (node {intent.node})")
            elif k is None and self.rollout is not None and not self.rollout.scope.everything:
                review.refuse(intent, "the job's node is not known: the rollout scope cannot hold")
            else:
                review.allow(intent, intent)
            return 0
        if not isinstance(intent, DrainNode | ResumeNode | SetNodeWeight | SetNodeFeatures):
            review.allow(intent, intent)  # notifications change nothing on the cluster
            return 0
        node = intent.node
        k = nodes.index(node)
        if k is None:
            review.refuse(intent, f"node {node} not seen this cycle")
            return 0
        if nodes.block[k]:
            review.refuse(intent, str(nodes.block[k]))
            return 0
        if not nodes.visible[k]:
            review.refuse(
                intent,
                f"telemetry stale: every GPU of {node} is stale; no action on what cannot be seen",
            )
            return 0
        states = situation.nodes
        if states is not None and not states.known[k]:
            review.refuse(intent, f"node {node} unknown to the placement system")
            return 0
        others = states is not None and bool(states.drained[k] and not states.drained_by_us[k])
        held = (
            f"drained by someone else (reason: {str(states.reason[k])!r})"
            if states is not None and others
            else ""
        )
        slot = int(self.nodes.slots(np.array([node]))[0])
        drained_s = float(self.nodes["drained_s"][slot])
        found = int(self.nodes["found_weight"][slot])
        if isinstance(intent, DrainNode):
            if others:
                review.refuse(intent, f"{held}: never touched by us")
                return 0
            # Live, only a real drain of ours is one (a drain recorded as advice is not).
            ours_now = states is not None and (
                bool(states.drained_by_us[k]) if dry else states.live_drained_by_us(k)
            )
            if ours_now or (dry and np.isfinite(drained_s)):
                review.unchanged += 1  # already drained by us (or, advising, recorded so)
                return 0
        elif isinstance(intent, ResumeNode):
            if others:
                review.refuse(intent, "drained by someone else: never resumed by us")
                return 0
            drained = states is not None and (
                bool(states.drained[k]) if dry else states.live_drained(k)
            )
            if not drained and not (dry and np.isfinite(drained_s)):
                review.unchanged += 1  # in service already
                return 0
        else:
            undo = (
                not intent.add
                if isinstance(intent, SetNodeFeatures)
                else found >= 0 and intent.weight == found
            )
            if others and not undo:
                what = "re-weighted" if isinstance(intent, SetNodeWeight) else "re-featured"
                review.refuse(intent, f"{held}: never {what} by us (only our own changes undone)")
                return 0
        since = now_s - float(self.nodes["last_change_s"][slot])
        if since < s.node_cooldown_s:
            review.refuse(intent, f"cooldown: node changed {since:.0f} s ago")
            return 0
        if isinstance(intent, DrainNode):
            # Advice counts every drain, as live would; a live drain only the live ones. Advice
            # beside a live agent must not trip the breaker that holds the live drains.
            why = self._drain_limits(
                node, situation.snapshot.n_nodes, now_s, pending, review, dry, not dry or all_dry
            )
            if why:
                review.refuse(intent, why)
                return 0
            pending.append((node, not dry))
        elif isinstance(intent, SetNodeWeight | SetNodeFeatures):
            window = s.steer_rate_window_s
            history = [*self.steers, *self.advised_steers] if dry else self.steers
            recent = sum(1 for t, _ in history if t > now_s - window) + steered
            if recent >= s.steer_rate_max:
                review.refuse(
                    intent,
                    f"rate limit: {recent} weight/feature changes in the last {window:g} s "
                    f"(at most {s.steer_rate_max})",
                )
                return 0
            if isinstance(intent, SetNodeWeight) and found < 0 and states is not None:
                self._found_pending[id(intent)] = int(states.weight[k])
            review.allow(intent, intent)
            return 1
        review.allow(intent, intent)
        return 0

    def clock_went_back(self, now_s: float) -> float:
        """The clock jumped back (NTP, a restored VM): times remembered after `now_s` become
        now, so a cooldown lasts its length from the jump, not until the clock catches up hours
        later. Returns how far the newest remembered time was ahead (0: nothing was)."""
        ahead = 0.0
        for cols, names in (
            (self.caps, ("last_change_s",)),
            (self.nodes, _NODE_TIMES),
            (self.pending, ("time_s",)),
        ):
            for name in names:
                times = cols[name]
                with np.errstate(invalid="ignore"):
                    future = times > now_s
                if future.any():
                    ahead = max(ahead, float(times[future].max()) - now_s)
                    times[future] = now_s
        b = self.breaker
        if b.last_reset_s > now_s:  # else drains after the jump would never count towards it
            ahead = max(ahead, b.last_reset_s - now_s)
            b.last_reset_s = now_s
        # The rate limits' windows too.
        for history in (self.drains, self.steers, self.advised_drains, self.advised_steers):
            if any(t > now_s for t, _ in history):
                ahead = max(ahead, max(t for t, _ in history) - now_s)
                history[:] = [(min(t, now_s), n) for t, n in history]
        return ahead

    # -- drains: the circuit breaker and the rate limit -------------------------------------------

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
        pending: list[tuple[str, bool]],
        review: Review,
        advice: bool,
        may_trip: bool,
    ) -> str:
        """Why this drain may not go ahead ("" when it may); trips the breaker when due and
        `may_trip`. `advice`: recorded drains count too (else only those applied)."""
        s = self.settings
        b = self.breaker
        if b.open:
            return (
                f"circuit breaker open since t={b.opened_s:.0f} s ({b.reason}): "
                "no drains until a person runs `ooda guard reset`"
            )
        history = [*self.drains, *self.advised_drains] if advice else self.drains
        pending_nodes = [n for n, live in pending if live or advice]
        start = now_s - s.breaker_window_s
        counted = {n for t, n in history if t > start and t >= b.last_reset_s}
        counted |= set(pending_nodes)
        limit = self.breaker_limit(n_nodes)
        if node not in counted and len(counted) + 1 > limit:
            why = (
                f"draining {node} would make {len(counted) + 1} nodes drained by us within "
                f"{s.breaker_window_s:g} s; the limit is {limit} ({s.breaker_max_nodes} nodes or "
                f"{s.breaker_max_pct:g}% of {n_nodes})"
            )
            if not may_trip:  # advice beside a live agent: refused, the breaker stays closed
                return f"circuit breaker would trip (advice; it stays closed): {why}"
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
        window = s.drain_rate_window_s
        recent = sum(1 for t, _ in history if t > now_s - window) + len(pending_nodes)
        if recent >= s.drain_rate_max:
            return (
                f"rate limit: {recent} drains in the last {window:g} s "
                f"(at most {s.drain_rate_max}); retried when the window has room"
            )
        return ""

    def _alarm(self, review: Review) -> None:
        b = self.breaker
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

    def _prune(self, now_s: float) -> None:
        s = self.settings
        keep = max(s.drain_rate_window_s, s.breaker_window_s)
        self.drains = [(t, n) for t, n in self.drains if t > now_s - keep]
        self.advised_drains = [(t, n) for t, n in self.advised_drains if t > now_s - keep]
        steer_s = s.steer_rate_window_s
        self.steers = [(t, n) for t, n in self.steers if t > now_s - steer_s]
        self.advised_steers = [(t, n) for t, n in self.advised_steers if t > now_s - steer_s]

    # -- the reset ------------------------------------------------------------------------------

    def reset_breaker(self, now_s: float, by: str = "", note: str = "") -> dict[str, Any]:
        """Close the breaker and start counting drains afresh. Returns what to audit."""
        b = self.breaker
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
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            # A person asked for a reset; an unreadable note does not make that less true.
            data = {"unreadable": str(exc)}
        request_id = str(data.get("id") or f"{stat.st_ino}-{stat.st_mtime_ns}")
        if request_id != self.breaker.last_reset_id:
            fields = self.reset_breaker(now_s, str(data.get("by", "")), str(data.get("note", "")))
            self.breaker.last_reset_id = request_id
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

    # -- what was done --------------------------------------------------------------------------

    def record(self, action: Action, now_s: float) -> None:
        """Remember an applied (or, in dry-run, recorded) action: ownership, cooldowns, limits.
        A live cap change that failed may have been done all the same (a node that acted and
        timed out answering, a call still in flight at the deadline): it is kept pending, for
        telemetry to settle at the next cycle as after a restart (`adopt_pending`)."""
        intent = action.intent
        if action.outcome is Outcome.FAILED and not action.dry_run:
            if isinstance(intent, SetPowerCap | ReleasePowerCap):
                n = len(intent.targets)
                watts = intent.watts if isinstance(intent, SetPowerCap) else np.full(n, np.nan)
                names = gpu_names(intent.targets.node, intent.targets.gpu)
                self.remember_pending(names, watts, np.full(n, now_s), failed_call=True)
            return
        if action.outcome not in (Outcome.APPLIED, Outcome.RECORDED):
            return
        if isinstance(intent, SetPowerCap | ReleasePowerCap):
            slot = self.caps.slots(intent.targets.uuid)
            self.caps["last_change_s"][slot] = now_s
            cap_w = intent.watts if isinstance(intent, SetPowerCap) else np.nan
            self.caps["our_cap_w"][slot] = cap_w
            if action.outcome is Outcome.APPLIED:
                self.caps["live_cap_w"][slot] = cap_w
        elif isinstance(intent, DrainNode | ResumeNode | SetNodeWeight | SetNodeFeatures):
            k = int(self.nodes.slots(np.array([intent.node]))[0])
            self.nodes["last_change_s"][k] = now_s
            applied = action.outcome is Outcome.APPLIED
            if isinstance(intent, DrainNode):
                self.nodes["drained_s"][k] = now_s
                (self.drains if applied else self.advised_drains).append((now_s, intent.node))
            elif isinstance(intent, ResumeNode):
                self.nodes["drained_s"][k] = np.nan
            else:
                (self.steers if applied else self.advised_steers).append((now_s, intent.node))
            if isinstance(intent, SetNodeWeight):
                found = int(self.nodes["found_weight"][k])
                if found >= 0 and intent.weight == found:
                    self.nodes["found_weight"][k] = -1  # undone: nothing of ours left
                elif found < 0 and id(intent) in self._found_pending:
                    self.nodes["found_weight"][k] = self._found_pending[id(intent)]

    def remember_pending(
        self,
        names: npt.NDArray[np.str_],
        watts: npt.NDArray[np.float64],
        time_s: npt.NDArray[np.float64],
        failed_call: bool = False,
    ) -> None:
        """Cap changes of ours that may be in force (NaN watts: a release) but were never
        saved as ours (`failed_call`: the actuator said it failed): `adopt_pending` settles
        them against telemetry."""
        slots = self.pending.slots(names)
        self.pending["watts"][slots] = watts
        self.pending["time_s"][slots] = time_s
        self.pending["failed_call"][slots] = failed_call

    def adopt_pending(self, situation: Situation, now_s: float) -> Settled | None:
        """Settle the pending changes on GPUs seen fresh with a known cap: a cap in force as
        we set it (within the dead band) becomes ours; a release found done (the GPU at its
        default) ends our ownership; any other is not in force (never done, or changed since),
        and ownership stays as it was. Pending changes older than `PENDING_HOLD_S` are given up.
        None when nothing was settled."""
        if len(self.pending) == 0:
            return None
        snap = situation.snapshot
        watts, time_s = self.pending["watts"], self.pending["time_s"]
        release = np.isnan(watts)
        known = np.zeros(len(self.pending), dtype=bool)
        in_force = known.copy()
        row = np.full(len(self.pending), -1, dtype=np.int64)
        target = watts.copy()  # the cap each change would leave in force
        pending = self.pending.keys.astype(np.str_)
        if snap.n_gpus:
            # Names for the pending GPUs' nodes only: failed caps on a node that is down stay
            # pending for a while, and the whole fleet's names cost 60 ms at 100,000 GPUs.
            nodes = RowIndex(snap.node_names).positions(split_gpu_names(pending)[0])
            near = np.flatnonzero(np.isin(snap.node, nodes[nodes >= 0]))
            names = gpu_names(snap.node_names[snap.node[near]], snap.gpu[near])
            at_near = RowIndex(names).positions(pending)
            row[at_near >= 0] = near[at_near[at_near >= 0]]
            seen = row >= 0
            at = np.where(seen, row, 0)
            cap = situation.cap_w[at]
            # A decision's watts are the policy's request; what was sent is clipped to the
            # GPU's range (unknown bounds clip nothing).
            clipped = np.fmin(np.fmax(watts, situation.min_cap_w[at]), situation.max_cap_w[at])
            target = np.where(release, situation.default_cap_w[at], clipped)
            known = seen & snap.fresh[at] & np.isfinite(cap) & np.isfinite(target)
            with np.errstate(invalid="ignore"):
                in_force = known & (np.abs(cap - target) < self.settings.cap_dead_band_w)
        given_up = ~known & (now_s - time_s > PENDING_HOLD_S)
        if not (known.any() or given_up.any()):
            return None
        adopt = in_force & ~release
        if adopt.any():
            slots = self.caps.slots(snap.uuid[row[adopt]])
            self.caps["our_cap_w"][slots] = target[adopt]
            self.caps["live_cap_w"][slots] = target[adopt]
            self.caps["last_change_s"][slots] = time_s[adopt]
        ended = in_force & release
        if ended.any():
            pos, found = self.caps.lookup(snap.uuid[row[ended]])
            self.caps["our_cap_w"][pos[found]] = np.nan
            self.caps["live_cap_w"][pos[found]] = np.nan
        # A failed call's change not in force is no news: its failure is on record.
        outcomes = (adopt, ended, known & ~in_force & ~self.pending["failed_call"], given_up)
        event = {r: pending[m].tolist() for r, m in zip(SETTLE_RESULTS, outcomes, strict=True)}
        rows, adopted_w = row[adopt], target[adopt]
        self.pending.retain(~(known | given_up))
        return Settled(event, rows, adopted_w) if any(event.values()) else None

    def to_dict(self) -> dict[str, Any]:
        """Everything the guard remembers (ownership, cooldowns, the drain and weight/feature
        history of the rate limits, the circuit breaker), JSON-ready, for persistence."""
        return {
            "caps": self.caps.to_dict(),
            "nodes": self.nodes.to_dict(),
            "drains": [[t, n] for t, n in self.drains],
            "steers": [[t, n] for t, n in self.steers],
            "advised_drains": [[t, n] for t, n in self.advised_drains],
            "advised_steers": [[t, n] for t, n in self.advised_steers],
            "breaker": self.breaker.to_dict(),
            "pending": self.pending.to_dict(),
        }

    def load_dict(self, data: Mapping[str, Any]) -> None:
        caps = data.get("caps", {})
        if "our_cap_w" in caps and "live_cap_w" not in caps:
            # Saved before live and recorded caps were told apart: every cap counted as ours.
            caps = {**caps, "live_cap_w": caps["our_cap_w"]}
        self.caps.load_dict(caps)
        self.nodes.load_dict(data.get("nodes", {}))
        self.drains = [(float(t), str(n)) for t, n in data.get("drains", [])]
        self.steers = [(float(t), str(n)) for t, n in data.get("steers", [])]
        # Saved before advice was told apart: every drain and change counted as live.
        self.advised_drains = [(float(t), str(n)) for t, n in data.get("advised_drains", [])]
        self.advised_steers = [(float(t), str(n)) for t, n in data.get("advised_steers", [])]
        self.breaker = BreakerState.from_dict(data.get("breaker", {}))
        self.pending.load_dict(data.get("pending", {}))

    def stamp_cap_jobs(self, snapshot: Snapshot, asserted: BoolArray) -> None:
        """Per GPU a policy asked a cap for this cycle: the job it was chosen for."""
        rows = np.flatnonzero(asserted & snapshot.fresh)
        if rows.size == 0 or len(self.caps) == 0:
            return
        pos, found = self.caps.lookup(snapshot.uuid)  # the whole fleet's: the same each cycle
        pos, found = pos[rows], found[rows]
        jobs = np.where(snapshot.job[rows] != "", snapshot.job[rows], IDLE_JOB)
        self.caps["for_job"][pos[found]] = jobs[found]

    def caps_outlived(
        self, snapshot: Snapshot, asserted: BoolArray, recorded: bool = True
    ) -> BoolArray:
        """Per GPU: a cap of ours chosen for a job that has since left the GPU, and that no
        policy asks for any more. A cap fitted to one job's curve must not throttle the next.
        `recorded`: count caps only recorded (dry-run) as ours, else only those applied."""
        if len(self.caps) == 0 or snapshot.n_gpus == 0:
            return np.zeros(snapshot.n_gpus, dtype=bool)
        pos, found = self.caps.lookup(snapshot.uuid)
        stamped = self.caps["for_job"][pos]
        jobs = np.where(snapshot.job != "", snapshot.job, IDLE_JOB)
        ours = found & np.isfinite(self.caps[_OURS[recorded]][pos])
        return np.asarray(
            ours & snapshot.fresh & ~asserted & (stamped != "") & (stamped != jobs), dtype=bool
        )

    def capped_by_us(self, uuids: npt.NDArray[np.str_], recorded: bool = True) -> BoolArray:
        """Per UUID: a cap of ours is on it (`recorded`: applied or recorded in dry-run; else
        applied for real)."""
        if len(self.caps) == 0:
            return np.zeros(uuids.shape, dtype=bool)
        pos, found = self.caps.lookup(uuids)
        return np.asarray(found & np.isfinite(self.caps[_OURS[recorded]][pos]), dtype=bool)


def request_reset(state_dir: Path, by: str | None = None, note: str = "") -> dict[str, Any]:
    """Leave a reset request for the guard (`ooda guard reset`): written whole (a temporary
    file, fsynced, renamed into place, the directory fsynced), so a guard never reads half of
    one. The running daemon consumes it at its next cycle; with no daemon running it waits for
    the next start (after the persisted state is loaded). Returns the request."""
    state_dir.mkdir(parents=True, exist_ok=True)
    request = {
        "id": secrets.token_hex(8),
        "by": by or _who(),
        "note": note,
        "requested_at": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    fd, tmp = tempfile.mkstemp(prefix=".guard-reset-", dir=state_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(request, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, state_dir / RESET_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return request


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"

"""The ledger: what the agent owns and what it did, the half of the guard that remembers.

- **Caps of ours** per GPU (by UUID): the cap applied for real (`live_cap_w`: only this makes a
  GPU ours to a live intent), the cap applied or only recorded (`our_cap_w`: what advice sees as
  ours), when it last changed (cooldowns) and the job it was chosen for (a cap fitted to one
  job's curve must not throttle the next: `Ownership.outlived_release`).
- **Node actions** per node (cooldowns, our drains, the weight found before our first change)
  and the history the rate limits and the circuit breaker count (live and advised apart).
- **Pending settlements**: cap changes whose outcome is not known (found in the audit log after
  a restart, agent.act.recovery, or from a cap call that failed), settled against telemetry.
- **The circuit breaker's state**: open or closed, since when, why (the gate trips and resets it).

All of it is saved with the daemon's state (`to_dict`, the state file's `guard` part; the format
is the one the guard wrote before it was split, so a state saved by an older agent loads).

The loop meets the ledger once a cycle, in orient: `open_cycle` settles the pending changes,
pulls times back after a clock jump and returns the cycle's `Ownership` view (what is ours, and
the caps whose job has left). The executor writes what was done (`record`, `stamp_cap_jobs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.act.guard import GuardSettings
from agent.core.intents import (
    Action,
    DrainNode,
    GpuTargets,
    Intent,
    Outcome,
    ReleasePowerCap,
    ResumeNode,
    SetNodeFeatures,
    SetNodeWeight,
    SetPowerCap,
    gpu_names,
    split_gpu_names,
)
from agent.core.keyed import KeyedColumns, LastRowIndex, RowIndex
from agent.core.situation import Situation
from agent.core.snapshot import Snapshot

BoolArray = npt.NDArray[np.bool_]
History = list[tuple[float, str]]

IDLE_JOB = "<idle>"  # what a cap was chosen for when its GPU was idle
OWNERSHIP_POLICY = "ownership"  # the policy name on the ledger's own releases
_NODE_TIMES = ("last_change_s", "drained_s")  # per node, the times a clock jump can put ahead
_OURS = {True: "our_cap_w", False: "live_cap_w"}  # counting recorded caps as ours, or not
# How long a cap change found after a crash (`pending`) waits for its GPU to be seen.
PENDING_HOLD_S = 1800.0
# What settling a pending change can find, as the `guard_caps_recovered` event lists them.
SETTLE_RESULTS = ("adopted", "released", "not_in_force", "given_up")


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


@dataclass(frozen=True, eq=False)
class Settled:
    """Pending cap changes settled against telemetry (`Ledger.settle`)."""

    event: dict[str, Any]  # the audit event's fields: GPU names by what became of them
    rows: npt.NDArray[np.int64]  # the snapshot rows of the caps adopted as ours
    watts: npt.NDArray[np.float64]  # and those caps

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.event.items()}


@dataclass(eq=False)
class Ownership:
    """One cycle's view of the ledger, taken in orient: what is ours, and why a cap goes."""

    rows: RowIndex  # each of the snapshot's UUIDs' row
    capped_by_us: BoolArray  # per GPU: a cap of ours is on it (recorded ones too when advising)
    stamped_job: npt.NDArray[np.object_]  # per GPU: the job our cap was chosen for ("" none)
    settled: Settled | None = None
    clock_ahead_s: float | None = None  # the clock went back; how far our times were ahead
    asserted: BoolArray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def outlived(self, snapshot: Snapshot, asserted: BoolArray) -> BoolArray:
        """Per GPU: a cap of ours chosen for a job that has since left the GPU, and that no
        policy asks for any more (`asserted`)."""
        if snapshot.n_gpus == 0:
            return np.zeros(0, dtype=bool)
        jobs = np.where(snapshot.job != "", snapshot.job, IDLE_JOB)
        stamped = self.stamped_job
        return np.asarray(
            self.capped_by_us & snapshot.fresh & ~asserted & (stamped != "") & (stamped != jobs),
            dtype=bool,
        )

    def outlived_release(
        self, snapshot: Snapshot, proposed: list[Intent], now_s: float, interval_s: float
    ) -> ReleasePowerCap | None:
        """The release of our caps whose job has left the GPU (`outlived`), given this cycle's
        intents (`proposed`). A cap fitted to one job's curve must not throttle the next."""
        self.asserted = asserted_caps(snapshot, self.rows, proposed)
        outlived = self.outlived(snapshot, self.asserted)
        if not outlived.any():
            return None
        return ReleasePowerCap(
            policy=OWNERSHIP_POLICY,
            reason="the job this cap was chosen for has left the GPU",
            expires_s=now_s + interval_s,
            targets=GpuTargets.from_rows(snapshot, np.flatnonzero(outlived)),
        )


def asserted_caps(snapshot: Snapshot, rows: RowIndex, intents: list[Intent]) -> BoolArray:
    """Per GPU: does any intent ask a cap for it this cycle? (`rows`: the snapshot's UUIDs)"""
    asserted = np.zeros(snapshot.n_gpus, dtype=bool)
    if not snapshot.n_gpus:
        return asserted
    for intent in intents:
        if isinstance(intent, SetPowerCap):
            at, found = rows.find_picked(intent.targets.uuid, intent.targets.picked())
            asserted[at[found]] = True
    return asserted


class Ledger:
    def __init__(self, settings: GuardSettings | None = None) -> None:
        self.settings = settings or GuardSettings()
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
        self.drains: History = []  # (time, node) of our drains, newest last
        self.steers: History = []  # (time, node) of our weight/feature changes
        # The same, only recorded (advice): they count for advice, never against live changes.
        self.advised_drains: History = []
        self.advised_steers: History = []
        # The weight found on a node before a change the gate allowed this cycle, by the
        # intent's id: kept as ours to undo once the change is recorded as done.
        self._found_weights: dict[int, int] = {}

    # -- the cycle's view -------------------------------------------------------------------------

    def open_cycle(
        self, situation: Situation, now_s: float, recorded: bool, clock_went_back: bool = False
    ) -> Ownership:
        """Settle the pending changes against this cycle's telemetry, pull remembered times back
        to `now_s` when the clock went back, and return what is ours this cycle (`recorded`:
        caps only recorded count as ours, as when the agent advises)."""
        settled = self.settle(situation, now_s)
        ahead = self.clock_went_back(now_s) if clock_went_back else None
        ownership = self.view(situation.snapshot, recorded)
        ownership.settled = settled
        ownership.clock_ahead_s = ahead
        return ownership

    def view(self, snapshot: Snapshot, recorded: bool) -> Ownership:
        """What is ours on the snapshot's GPUs now (`recorded`: caps only recorded count)."""
        stamped = np.full(snapshot.n_gpus, "", dtype=object)
        if len(self.caps) and snapshot.n_gpus:
            pos, found = self.caps.lookup(snapshot.uuid)
            stamped = np.where(found, self.caps["for_job"][pos], "")
        return Ownership(
            rows=self.rows(snapshot),
            capped_by_us=self.capped_by_us(snapshot.uuid, recorded),
            stamped_job=stamped,
        )

    def rows(self, snapshot: Snapshot) -> RowIndex:
        """The row of each of the snapshot's UUIDs (kept while they stay the same)."""
        return self._rows.of(snapshot.uuid)

    def capped_by_us(self, uuids: npt.NDArray[np.str_], recorded: bool = True) -> BoolArray:
        """Per UUID: a cap of ours is on it (`recorded`: applied or recorded in dry-run; else
        applied for real)."""
        if len(self.caps) == 0:
            return np.zeros(uuids.shape, dtype=bool)
        pos, found = self.caps.lookup(uuids)
        return np.asarray(found & np.isfinite(self.caps[_OURS[recorded]][pos]), dtype=bool)

    def our_caps(
        self, slots: npt.NDArray[np.int64], recorded: bool
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Our cap at these `caps` slots as an intent sees it (`recorded`: advice), and when it
        last changed."""
        return self.caps[_OURS[recorded]][slots], self.caps["last_change_s"][slots]

    def caps_outlived(
        self, snapshot: Snapshot, asserted: BoolArray, recorded: bool = True
    ) -> BoolArray:
        """Per GPU: a cap of ours chosen for a job that has since left the GPU, and that no
        policy asks for any more. `recorded`: count caps only recorded (dry-run) as ours."""
        return self.view(snapshot, recorded).outlived(snapshot, asserted)

    # -- what was done ----------------------------------------------------------------------------

    def record(self, action: Action, now_s: float) -> None:
        """Remember an applied (or, in dry-run, recorded) action: ownership, cooldowns, limits.
        A live cap change that failed may have been done all the same (a node that acted and
        timed out answering, a call still in flight at the deadline): it is kept pending, for
        telemetry to settle at the next cycle as after a restart (`settle`)."""
        intent = action.intent
        if action.outcome is Outcome.FAILED and not action.dry_run:
            if isinstance(intent, SetPowerCap | ReleasePowerCap):
                self._pending_from_failure(intent, now_s)
            return
        if action.outcome not in (Outcome.APPLIED, Outcome.RECORDED):
            return
        applied = action.outcome is Outcome.APPLIED
        if isinstance(intent, SetPowerCap | ReleasePowerCap):
            self._record_caps(intent, applied, now_s)
        elif isinstance(intent, DrainNode | ResumeNode | SetNodeWeight | SetNodeFeatures):
            self._record_node(intent, applied, now_s)

    def _pending_from_failure(self, intent: SetPowerCap | ReleasePowerCap, now_s: float) -> None:
        n = len(intent.targets)
        watts = intent.watts if isinstance(intent, SetPowerCap) else np.full(n, np.nan)
        names = gpu_names(intent.targets.node, intent.targets.gpu)
        self.remember_pending(names, watts, np.full(n, now_s), failed_call=True)

    def _record_caps(
        self, intent: SetPowerCap | ReleasePowerCap, applied: bool, now_s: float
    ) -> None:
        slot = self.caps.slots_picked(intent.targets.uuid, intent.targets.picked())
        self.caps["last_change_s"][slot] = now_s
        cap_w = intent.watts if isinstance(intent, SetPowerCap) else np.nan
        self.caps["our_cap_w"][slot] = cap_w
        if applied:
            self.caps["live_cap_w"][slot] = cap_w

    def _record_node(
        self,
        intent: DrainNode | ResumeNode | SetNodeWeight | SetNodeFeatures,
        applied: bool,
        now_s: float,
    ) -> None:
        k = int(self.nodes.slots(np.array([intent.node]))[0])
        self.nodes["last_change_s"][k] = now_s
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
            elif found < 0 and id(intent) in self._found_weights:
                self.nodes["found_weight"][k] = self._found_weights[id(intent)]

    def note_found_weight(self, intent: SetNodeWeight, weight: int) -> None:
        """The weight on the node before this change (allowed this cycle): ours to restore."""
        self._found_weights[id(intent)] = weight

    def stamp_cap_jobs(self, snapshot: Snapshot, asserted: BoolArray) -> None:
        """Per GPU a policy asked a cap for this cycle: the job it was chosen for."""
        rows = np.flatnonzero(asserted & snapshot.fresh)
        if rows.size == 0 or len(self.caps) == 0:
            return
        pos, found = self.caps.lookup(snapshot.uuid)  # the whole fleet's: the same each cycle
        pos, found = pos[rows], found[rows]
        jobs = np.where(snapshot.job[rows] != "", snapshot.job[rows], IDLE_JOB)
        self.caps["for_job"][pos[found]] = jobs[found]

    def forget_cap(self, slots: npt.NDArray[np.int64], live: bool) -> None:
        """Our cap at these slots is gone (found at the default): no longer ours (`live`: to
        live intents either)."""
        self.caps["our_cap_w"][slots] = np.nan
        if live:
            self.caps["live_cap_w"][slots] = np.nan

    def begin_review(self, now_s: float) -> None:
        """A new review: histories older than every window go, as do last cycle's found
        weights."""
        self._prune(now_s)
        self._found_weights.clear()

    def _prune(self, now_s: float) -> None:
        s = self.settings
        keep = max(s.drain_rate_window_s, s.breaker_window_s)
        self.drains = [(t, n) for t, n in self.drains if t > now_s - keep]
        self.advised_drains = [(t, n) for t, n in self.advised_drains if t > now_s - keep]
        steer_s = s.steer_rate_window_s
        self.steers = [(t, n) for t, n in self.steers if t > now_s - steer_s]
        self.advised_steers = [(t, n) for t, n in self.advised_steers if t > now_s - steer_s]

    # -- pending changes --------------------------------------------------------------------------

    def remember_pending(
        self,
        names: npt.NDArray[np.str_],
        watts: npt.NDArray[np.float64],
        time_s: npt.NDArray[np.float64],
        failed_call: bool = False,
    ) -> None:
        """Cap changes of ours that may be in force (NaN watts: a release) but were never
        saved as ours (`failed_call`: the actuator said it failed): `settle` settles them
        against telemetry."""
        slots = self.pending.slots(names)
        self.pending["watts"][slots] = watts
        self.pending["time_s"][slots] = time_s
        self.pending["failed_call"][slots] = failed_call

    def settle(self, situation: Situation, now_s: float) -> Settled | None:
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
        pending = self.pending.keys.astype(np.str_)
        row, known, in_force, target = self._pending_in_force(situation, pending, release)
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
            self.forget_cap(pos[found], live=True)
        # A failed call's change not in force is no news: its failure is on record.
        outcomes = (adopt, ended, known & ~in_force & ~self.pending["failed_call"], given_up)
        event = {r: pending[m].tolist() for r, m in zip(SETTLE_RESULTS, outcomes, strict=True)}
        rows, adopted_w = row[adopt], target[adopt]
        self.pending.retain(~(known | given_up))
        return Settled(event, rows, adopted_w) if any(event.values()) else None

    def _pending_in_force(
        self, situation: Situation, pending: npt.NDArray[np.str_], release: BoolArray
    ) -> tuple[npt.NDArray[np.int64], BoolArray, BoolArray, npt.NDArray[np.float64]]:
        """Per pending change: its snapshot row (-1 unseen), whether its GPU is seen fresh with a
        known cap, whether the change is in force, and the cap it would leave in force."""
        snap = situation.snapshot
        watts = self.pending["watts"]
        n = len(self.pending)
        row = np.full(n, -1, dtype=np.int64)
        known = np.zeros(n, dtype=bool)
        if not snap.n_gpus:
            return row, known, known.copy(), watts.copy()
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
        # A decision's watts are the policy's request; what was sent is clipped to the GPU's
        # range (unknown bounds clip nothing).
        clipped = np.fmin(np.fmax(watts, situation.min_cap_w[at]), situation.max_cap_w[at])
        target = np.where(release, situation.default_cap_w[at], clipped)
        known = seen & snap.fresh[at] & np.isfinite(cap) & np.isfinite(target)
        with np.errstate(invalid="ignore"):
            in_force = known & (np.abs(cap - target) < self.settings.cap_dead_band_w)
        return row, known, in_force, target

    # -- time -------------------------------------------------------------------------------------

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

    # -- saved state ------------------------------------------------------------------------------

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

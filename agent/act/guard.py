"""The guard: every intent passes here before any actuator sees it.

For caps (columnar, per GPU): no action on GPUs that cannot be seen (stale or unknown); caps
clipped to the GPU's own constraints (never outside NVML's min/max; unknown bounds are refused);
a dead band (a change smaller than `cap_dead_band_w` is no change); a per-GPU cooldown (no second
change within `cap_cooldown_s`, except lowering a cap, which is the safe direction); releases only
of caps we set (ownership). Node intents: a per-node cooldown; resumes only of our drains.
Every refusal carries its reason and is audited by the caller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from agent.core.intents import (
    Action,
    DrainNode,
    Intent,
    Outcome,
    ReleasePowerCap,
    ResumeNode,
    SetNodeFeatures,
    SetNodeWeight,
    SetPowerCap,
)
from agent.core.keyed import KeyedColumns
from agent.core.situation import Situation

BoolArray = npt.NDArray[np.bool_]


class GuardSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cap_cooldown_s: float = Field(
        60.0, ge=0.0, description="Least time between two raises of one GPU's cap (s)."
    )
    cap_dead_band_w: float = Field(
        10.0, ge=0.0, description="Cap changes smaller than this are skipped (W)."
    )
    node_cooldown_s: float = Field(
        300.0, ge=0.0, description="Least time between two actions on one node (s)."
    )


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
    unchanged: int = 0  # cap targets already where the intent wants them (dead band)

    def allow(self, intent: Intent, origin: Intent) -> None:
        self.allowed.append(intent)
        self.origin.append(origin)

    def refuse(self, intent: Intent, reason: str) -> None:
        self.refused.append(Refusal(intent, reason, intent))


class Guard:
    def __init__(self, settings: GuardSettings | None = None) -> None:
        self.settings = settings or GuardSettings()
        self.caps = KeyedColumns(
            {"our_cap_w": (np.float64, np.nan), "last_change_s": (np.float64, -np.inf)}
        )
        self.nodes = KeyedColumns({"last_change_s": (np.float64, -np.inf)})

    # -- review ---------------------------------------------------------------------------------

    def review(
        self, intents: Sequence[Intent], situation: Situation, now_s: float, dry_run_caps: bool
    ) -> Review:
        review = Review()
        rows_by_uuid = _row_index(situation)
        for intent in intents:
            if intent.expires_s < now_s:
                review.refuse(intent, "expired before it could be applied")
            elif isinstance(intent, SetPowerCap | ReleasePowerCap):
                self._review_caps(intent, situation, rows_by_uuid, now_s, dry_run_caps, review)
            else:
                self._review_node(intent, situation, now_s, review)
        return review

    def _review_caps(
        self,
        intent: SetPowerCap | ReleasePowerCap,
        situation: Situation,
        rows_by_uuid: tuple[npt.NDArray[np.str_], npt.NDArray[np.int64]],
        now_s: float,
        dry_run: bool,
        review: Review,
    ) -> None:
        s = self.settings
        sorted_uuid, order = rows_by_uuid
        uuids = intent.targets.uuid
        n = uuids.shape[0]
        if n == 0:
            return
        pos = np.clip(np.searchsorted(sorted_uuid, uuids), 0, max(sorted_uuid.size - 1, 0))
        known = sorted_uuid[pos] == uuids if sorted_uuid.size else np.zeros(n, dtype=bool)
        rows = np.where(known, order[pos] if order.size else 0, 0)
        fresh = known & situation.snapshot.fresh[rows]
        lo = situation.min_cap_w[rows]
        hi = situation.max_cap_w[rows]
        bounded = np.isfinite(lo) & np.isfinite(hi)
        slot = self.caps.slots(uuids)
        ours = self.caps["our_cap_w"][slot]
        telemetry = situation.cap_w[rows]
        current = np.where(dry_run & np.isfinite(ours), ours, telemetry)
        if isinstance(intent, SetPowerCap):
            wanted = np.clip(intent.watts, lo, hi)
        else:
            wanted = situation.default_cap_w[rows]
        since = now_s - self.caps["last_change_s"][slot]
        raising = ~(wanted < current)  # NaN current counts as raising: unknown is not safe
        cooling = raising & (since < s.cap_cooldown_s)

        reasons = np.full(n, "", dtype=object)
        reasons[~known] = "GPU not seen this cycle"
        reasons[known & ~fresh] = "telemetry stale: no action on what cannot be seen"
        reasons[(reasons == "") & ~bounded] = "the GPU's cap range is unknown"
        if isinstance(intent, ReleasePowerCap):
            reasons[(reasons == "") & ~np.isfinite(ours)] = "not capped by us"
            reasons[(reasons == "") & ~np.isfinite(wanted)] = "the GPU's default limit is unknown"
        reasons[(reasons == "") & cooling & (np.abs(wanted - current) >= s.cap_dead_band_w)] = (
            f"cooldown: changed less than {s.cap_cooldown_s:g} s ago"
        )
        ok = reasons == ""
        unchanged = ok & (np.abs(wanted - current) < s.cap_dead_band_w)
        review.unchanged += int(unchanged.sum())
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

    def _review_node(
        self, intent: Intent, situation: Situation, now_s: float, review: Review
    ) -> None:
        if not isinstance(intent, DrainNode | ResumeNode | SetNodeWeight | SetNodeFeatures):
            review.allow(intent, intent)  # requeues and notifications
            return
        node = intent.node
        snap = situation.snapshot
        if node not in set(snap.node_names.tolist()):
            review.refuse(intent, f"node {node} not seen this cycle")
            return
        slot = self.nodes.slots(np.array([node]))
        since = now_s - float(self.nodes["last_change_s"][slot[0]])
        if since < self.settings.node_cooldown_s:
            review.refuse(intent, f"cooldown: node changed {since:.0f} s ago")
            return
        nodes = situation.nodes
        if nodes is not None and isinstance(intent, ResumeNode):
            k = int(np.flatnonzero(snap.node_names == node)[0])
            if nodes.drained[k] and not nodes.drained_by_us[k]:
                review.refuse(intent, "drained by someone else: never resumed by us")
                return
        review.allow(intent, intent)

    # -- what was done --------------------------------------------------------------------------

    def record(self, action: Action, now_s: float) -> None:
        """Remember an applied (or, in dry-run, recorded) action: ownership and cooldowns."""
        if action.outcome not in (Outcome.APPLIED, Outcome.RECORDED):
            return
        intent = action.intent
        if isinstance(intent, SetPowerCap | ReleasePowerCap):
            slot = self.caps.slots(intent.targets.uuid)
            self.caps["last_change_s"][slot] = now_s
            self.caps["our_cap_w"][slot] = (
                intent.watts if isinstance(intent, SetPowerCap) else np.nan
            )
        elif isinstance(intent, DrainNode | ResumeNode | SetNodeWeight | SetNodeFeatures):
            slot = self.nodes.slots(np.array([intent.node]))
            self.nodes["last_change_s"][slot] = now_s

    def to_dict(self) -> dict[str, Any]:
        """Everything the guard remembers (ownership, cooldowns), JSON-ready, for persistence."""
        return {"caps": self.caps.to_dict(), "nodes": self.nodes.to_dict()}

    def load_dict(self, data: Mapping[str, Any]) -> None:
        self.caps.load_dict(data.get("caps", {}))
        self.nodes.load_dict(data.get("nodes", {}))

    def capped_by_us(self, uuids: npt.NDArray[np.str_]) -> BoolArray:
        if len(self.caps) == 0:
            return np.zeros(uuids.shape, dtype=bool)
        pos, found = self.caps.lookup(uuids)
        return np.asarray(found & np.isfinite(self.caps["our_cap_w"][pos]), dtype=bool)


def _row_index(situation: Situation) -> tuple[npt.NDArray[np.str_], npt.NDArray[np.int64]]:
    uuid = situation.snapshot.uuid
    order = np.argsort(uuid, kind="stable").astype(np.int64)
    return uuid[order], order

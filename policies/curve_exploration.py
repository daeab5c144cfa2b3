"""curve_exploration: teach the power curves by small, bounded cap steps (opt-in).

A fleet whose caps never move teaches nothing about how its jobs slow down under a cap. This
policy lowers the cap of a few GPUs at a time, by a step small enough that even the most
cap-sensitive curve measured (the conservative prior) loses at most `max_slowdown_frac` of
throughput, holds it for `hold_s` so the learner sees the job at that draw, then gives the cap
back. It explores whole jobs (their GPUs share one curve), least confident first, only jobs whose
natural draw is known (without it a step teaches nothing), never the same job again within
`repeat_after_s`. It only ever lowers caps, so it can never push the fleet over a budget; under
the conflict rule the lowest cap wins, so other policies' lower caps stand.

Disabled unless configured: `[policies.curve_exploration] enabled = true`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from agent.core.curves import (
    CONSERVATIVE_A,
    CONSERVATIVE_B,
    LOWEST_CAP_DRAW_FRAC,
    power_for_throughput,
    slowdown_cap_draw_frac,
    throughput_at_power,
)
from agent.core.intents import GpuTargets, Intent, ReleasePowerCap, SetPowerCap
from agent.core.reads import Reads
from agent.core.situation import Situation
from agent.core.snapshot import Metric
from policies.base import BasePolicy, Decision, PolicyMemory, PolicySettings
from policies.common import power


class CurveExplorationSettings(PolicySettings):
    enabled: bool = Field(False, description="Run this policy (off unless configured).")
    max_gpus: int = Field(8, ge=1, le=10_000, description="GPUs under exploration at a time.")
    max_slowdown_frac: float = Field(
        0.05,
        gt=0.0,
        le=0.2,
        description="Largest throughput loss a step may cost, by the most sensitive curve.",
    )
    # (The bound is computed under pessimistic assumptions, so the true loss is usually far
    # smaller; below ~4% the steps become too small to teach anything.)
    hold_s: float = Field(
        120.0, ge=15.0, description="How long a step is held before the cap is given back (s)."
    )
    target_confidence: float = Field(
        0.6, ge=0.0, le=1.0, description="Jobs whose curve is less confident are explored."
    )
    repeat_after_s: float = Field(
        1800.0, ge=0.0, description="No second step on one job within this time (s)."
    )
    min_step_w: float = Field(
        20.0, ge=1.0, description="Steps smaller than this are not worth taking (W)."
    )


class Exploring(BaseModel):
    # Memory, not settings: restored from saved JSON, so lax types (a list back to a tuple).
    model_config = ConfigDict(extra="forbid", frozen=True)

    job: str
    uuid: str
    node: str
    gpu: int
    since_s: float  # when the step started
    cap_w: float
    restore_default: bool  # the GPU was at its default limit before
    # When the step ended and its cap was given back; None while it is in force.
    given_back_s: float | None = None
    # The least share of its cap the GPU draws under a binding cap, as far as this step has
    # shown (a step that did not bind puts it at least at draw / cap); 0: nothing shown.
    share_lo: float = 0.0


class CurveExplorationMemory(PolicyMemory):
    active: tuple[Exploring, ...] = ()
    last_explored_s: dict[str, float] = Field(default_factory=dict)


class CurveExploration(BasePolicy[CurveExplorationSettings, CurveExplorationMemory]):
    name: ClassVar[str] = "curve_exploration"
    reads: ClassVar[Reads] = Reads.every_cycle(Metric.POWER_W)  # the draw under each step
    safety: ClassVar[bool] = False
    description: ClassVar[str] = (
        "Lower a few GPUs' caps a little, within a slowdown bound, to learn their power curves."
    )
    Settings = CurveExplorationSettings
    Memory = CurveExplorationMemory

    def decide(
        self, situation: Situation, memory: PolicyMemory, now_s: float
    ) -> Decision[PolicyMemory]:
        assert isinstance(memory, CurveExplorationMemory)
        s = self.settings
        snap = situation.snapshot
        give_back_s = max(s.hold_s, 60.0)  # a step's cap lasts this long unless renewed
        if snap.n_gpus == 0:
            return Decision([], memory)
        row_of = {str(u): i for i, u in enumerate(snap.uuid.tolist())} if memory.active else {}
        plan = _Steps()
        now_w = power(situation)
        unbound = self._unbound_share(situation, now_w) if memory.active else None
        for e in memory.active:  # a few GPUs at most
            self._carry(situation, e, row_of.get(e.uuid), unbound, now_s, give_back_s, plan)
        last = {k: v for k, v in memory.last_explored_s.items() if now_s - v < s.repeat_after_s}
        self._new_steps(situation, now_w, last, now_s, plan)
        intents = self._intents(situation, plan, now_s + give_back_s)
        return Decision(
            intents, CurveExplorationMemory(active=tuple(plan.keep), last_explored_s=last)
        )

    def _carry(
        self,
        situation: Situation,
        e: Exploring,
        row: int | None,
        unbound: np.ndarray | None,
        now_s: float,
        give_back_s: float,
        plan: _Steps,
    ) -> None:
        """A step under way: held (re-aimed lower if it did not bind) while its job runs and
        its hold lasts; then given back until the cap is seen back, for a while."""
        snap = situation.snapshot
        given = now_s if e.given_back_s is None else e.given_back_s
        same_job = row is not None and str(snap.job_key[row]) == e.job
        still = same_job and bool(snap.fresh[row]) and bool(situation.busy[row])
        if e.given_back_s is None and still and now_s - e.since_s < self.settings.hold_s:
            assert row is not None and unbound is not None
            held = self._held(situation, e, row, unbound)
            plan.keep.append(held)
            plan.hold(row, held.cap_w)
        elif (
            row is not None
            and same_job
            and e.restore_default
            and situation.cap_w[row] < situation.default_cap_w[row] - 0.5
            and now_s - given <= give_back_s
        ):
            # Given back until the cap is seen back (a release may wait out a cooldown), for
            # a while: a lower cap from another policy may stand, and outlives the step.
            if bool(snap.fresh[row]):
                plan.release_rows.append(row)
            plan.keep.append(e.model_copy(update={"given_back_s": given}))

    def _held(self, situation: Situation, e: Exploring, row: int, unbound: np.ndarray) -> Exploring:
        held = e
        # The step in force did not bind: the GPU draws a larger share of its cap than
        # assumed (a stale or missing measurement); re-aim it now, or it teaches nothing.
        if situation.cap_w[row] <= e.cap_w + 0.5 and unbound[row] > 0.0:
            held = e.model_copy(update={"share_lo": float(np.fmax(e.share_lo, unbound[row]))})
        aimed = float(
            self._step_caps(
                situation, np.array([row]), measured=True, share_lo=np.array([held.share_lo])
            )[0]
        )
        if np.isfinite(aimed) and np.ceil(aimed) < e.cap_w - 1.0:  # only ever lower
            held = held.model_copy(update={"cap_w": float(np.ceil(aimed))})
        return held

    def _new_steps(
        self,
        situation: Situation,
        now_w: np.ndarray,
        last: dict[str, float],
        now_s: float,
        plan: _Steps,
    ) -> None:
        """New steps: least confident jobs first, whole jobs, within the GPU allowance."""
        s = self.settings
        snap = situation.snapshot
        room = s.max_gpus - sum(1 for e in plan.keep if e.given_back_s is None)
        curves = situation.curves
        known = (
            curves.natural_known
            if curves.natural_known is not None
            else np.zeros(snap.n_gpus, dtype=bool)
        )
        candidate = (
            snap.fresh
            & situation.busy
            & known
            & (curves.confidence < s.target_confidence)
            & np.isfinite(situation.cap_w)
            & np.isfinite(situation.min_cap_w)
        )
        if room <= 0 or not candidate.any():
            return
        rows = np.flatnonzero(candidate)
        keys, inverse = np.unique(snap.job_key[rows], return_inverse=True)
        sizes = np.bincount(inverse)
        # Every candidate's step at once (a step is per GPU), then per job whether it is
        # worth taking: every GPU's cap found, and its smallest step at least min_step_w.
        # The step's size is what it takes off the draw (a GPU near its maximum limit
        # draws well under a cap just below it).
        step_caps = self._step_caps(situation, rows)
        k = slowdown_cap_draw_frac(curves.cap_draw_frac[rows])
        draw_w = np.where(np.isfinite(now_w), now_w, curves.natural_w)
        with np.errstate(invalid="ignore"):
            step = draw_w[rows] - k * step_caps
        step = np.where(np.isfinite(step), step, -np.inf)
        job_step = np.full(keys.shape[0], np.inf)
        np.minimum.at(job_step, inverse, step)
        busy_keys = {str(e.job) for e in plan.keep}
        recent = np.isin(keys, np.asarray(sorted(set(last) | busy_keys), dtype=np.str_))
        conf = np.bincount(inverse, curves.confidence[rows]) / sizes
        order = np.argsort(conf, kind="stable")  # least confident first
        order = order[(job_step[order] >= s.min_step_w) & ~recent[order]]
        chosen = _whole_jobs(order.tolist(), sizes, room)
        rank = np.full(keys.shape[0], -1, dtype=np.int64)
        rank[chosen] = np.arange(len(chosen))
        picked = np.flatnonzero(rank[inverse] >= 0)  # at most max_gpus
        picked = picked[np.argsort(rank[inverse[picked]], kind="stable")]
        for i in picked.tolist():
            row = int(rows[i])
            cap = float(np.ceil(step_caps[i]))
            at_default = situation.cap_w[row] >= situation.default_cap_w[row] - 0.5
            plan.keep.append(
                Exploring(
                    job=str(keys[inverse[i]]),
                    uuid=str(snap.uuid[row]),
                    node=str(snap.node_names[snap.node[row]]),
                    gpu=int(snap.gpu[row]),
                    since_s=now_s,
                    cap_w=cap,
                    restore_default=bool(at_default),
                )
            )
            plan.hold(row, cap)
        for j in chosen:
            last[str(keys[j])] = now_s

    def _intents(self, situation: Situation, plan: _Steps, expires: float) -> list[Intent]:
        snap = situation.snapshot
        curves = situation.curves
        intents: list[Intent] = []
        if plan.hold_rows:
            idx = np.asarray(plan.hold_rows, dtype=np.int64)
            intents.append(
                SetPowerCap(
                    policy=self.name,
                    reason="exploration: a small cap step to learn the job's power curve",
                    evidence={
                        "confidence": np.round(curves.confidence[idx], 3),
                        "natural_w": np.round(curves.natural_w[idx], 1),
                        "max_slowdown_frac": self.settings.max_slowdown_frac,
                    },
                    expires_s=expires,
                    targets=GpuTargets.from_rows(snap, idx),
                    watts=np.asarray(plan.hold_w, dtype=np.float64),
                )
            )
        if plan.release_rows:
            rows = np.asarray(plan.release_rows, dtype=np.int64)
            intents.append(
                ReleasePowerCap(
                    policy=self.name,
                    reason="exploration step done: cap given back",
                    expires_s=expires,
                    targets=GpuTargets.from_rows(snap, rows),
                )
            )
        return intents

    @staticmethod
    def _unbound_share(situation: Situation, now_w: np.ndarray) -> np.ndarray:
        """Per GPU: where its limit surely does not bind, the share of the limit it draws (its
        share under a binding cap is at least that, or the limit would bind); 0 elsewhere.

        Only where the GPU reports its clock event reasons: the power cap bit says whether the
        limit holds the clocks down. Without it, a draw just under the limit may be a binding
        cap's margin, so nothing is inferred. The draw counted is the lower of the current one
        and the natural draw, so a noisy sample does not overstate the share."""
        cap_bit, reasons_ok = situation.snapshot.power_cap_holds()
        draw = np.fmin(now_w, situation.curves.natural_w)
        with np.errstate(divide="ignore", invalid="ignore"):
            share = draw / situation.cap_w
        ok = reasons_ok & ~cap_bit & np.isfinite(share) & (share < 1.0)
        return np.where(ok, share, 0.0)

    def _step_caps(
        self,
        situation: Situation,
        rows: np.ndarray,
        measured: bool = False,
        share_lo: np.ndarray | None = None,
    ) -> np.ndarray:
        """Per GPU: the cap that loses at most max_slowdown_frac by the more sensitive of the
        job's current curve and the conservative one, counting the natural draw at its high
        estimate and the draw under the cap at its lowest plausible share (so errors in either
        make the step smaller, never larger); never below the GPU's minimum.

        `measured`: once a step binds, the GPU's own draw under its cap is measured within a
        cycle; re-aiming with it gives the step its intended size (the blind first step often
        lands too near the natural draw to teach anything), while the bound on the loss holds
        as before (the natural draw still at its high estimate). `share_lo`: per row, a lower
        bound on the share shown by a step that did not bind (0: none); it raises the assumed
        share where none is measured, which keeps the bound (the share is at least that)."""
        s = self.settings
        curves = situation.curves
        natural = np.fmax(curves.natural_w_hi[rows], curves.natural_w[rows])
        k = np.full(rows.shape[0], LOWEST_CAP_DRAW_FRAC)
        if measured:
            own = curves.cap_draw_frac[rows]
            if share_lo is not None:
                k = np.fmax(k, np.where(np.isfinite(share_lo) & (share_lo < 1.0), share_lo, k))
            k = slowdown_cap_draw_frac(own, fallback=k)
        keep = 1.0 - s.max_slowdown_frac
        p_cons = power_for_throughput(keep, natural, CONSERVATIVE_A, CONSERVATIVE_B)
        p_own = power_for_throughput(keep, natural, curves.a[rows], curves.b[rows])
        power = np.fmax(p_cons, p_own)
        # Where the job draws below that already (its cap binds), step from its draw.
        draw_cap = np.minimum(situation.cap_w[rows], natural / np.maximum(k, 1e-3))
        cap = np.minimum(power / np.maximum(k, 1e-3), draw_cap)
        cap = np.maximum(cap, situation.min_cap_w[rows])
        lost = 1.0 - throughput_at_power(
            np.minimum(natural, k * cap), natural, CONSERVATIVE_A, CONSERVATIVE_B
        )
        # A step must bind (a cap above the draw teaches nothing, e.g. under the minimum cap).
        binds = k * cap < 0.97 * natural
        return np.where((lost <= s.max_slowdown_frac + 1e-6) & binds, cap, np.nan)


@dataclass
class _Steps:
    """This cycle's steps: those kept in memory, the caps to hold, the caps to give back."""

    keep: list[Exploring] = field(default_factory=list)
    hold_rows: list[int] = field(default_factory=list)
    hold_w: list[float] = field(default_factory=list)
    release_rows: list[int] = field(default_factory=list)

    def hold(self, row: int, cap_w: float) -> None:
        self.hold_rows.append(row)
        self.hold_w.append(cap_w)


def _whole_jobs(order: list[int], sizes: np.ndarray, room: int) -> list[int]:
    """Jobs (in `order`) whose GPUs all fit in the room left, taken whole, O(1) each."""
    chosen: list[int] = []
    for j in order:
        if sizes[j] > room:
            continue
        chosen.append(j)
        room -= int(sizes[j])
        if room <= 0:
            break
    return chosen

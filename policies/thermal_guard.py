"""thermal_guard: cap, then drain, GPUs that run hot or heat abnormally, before the hardware
throttles.

A GPU within `hot_margin_c` of its slowdown temperature, or flagged by orient as heating
abnormally (hotter than its peers at the same load, a failing fan) and within
`abnormal_margin_c`, gets its cap stepped down by `step_frac` of its draw, at most once per
`step_interval_s` (temperature follows power with a time constant of tens of seconds). A GPU
still hot at its lowest cap for `drain_after_s` gets its node drained. Caps are released after the
GPU has stayed `cool_margin_c` under its slowdown temperature for `release_hold_s`. The policy
remembers only the GPUs it holds (a few), in its memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from agent.core.intents import DrainNode, GpuTargets, Intent, ReleasePowerCap, SetPowerCap
from agent.core.reads import Reads
from agent.core.situation import Situation
from agent.core.snapshot import Metric
from policies.base import BasePolicy, Decision, PolicyMemory, PolicySettings
from policies.common import controllable, power, slowdown_temp_c

HEATING_KINDS = ("temp", "hot", "fan", "thermal")


class ThermalGuardSettings(PolicySettings):
    hot_margin_c: float = Field(
        5.0, ge=0.0, le=30.0, description="Act this close to the slowdown temperature (C)."
    )
    abnormal_margin_c: float = Field(
        15.0, ge=0.0, le=40.0, description="Act on abnormal heating this close to slowdown (C)."
    )
    cool_margin_c: float = Field(
        10.0, ge=0.0, le=40.0, description="Cool means this far under slowdown (C)."
    )
    step_frac: float = Field(
        0.1, gt=0.0, le=0.5, description="Each step lowers the cap by this share of the draw."
    )
    step_interval_s: float = Field(
        60.0, ge=0.0, description="Least time between two steps on one GPU (s)."
    )
    release_hold_s: float = Field(
        300.0, ge=0.0, description="Cool for this long before the cap goes (s)."
    )
    drain_after_s: float = Field(
        900.0, ge=0.0, description="Hot at the lowest cap this long: drain the node (s)."
    )
    lease_s: float = Field(600.0, gt=0.0, description="Lease of the thermal cap (s).")


class HeldGpu(BaseModel):
    # Memory, not settings: restored from saved JSON, so lax types (a list back to a tuple).
    model_config = ConfigDict(extra="forbid", frozen=True)

    cap_w: float
    last_step_s: float
    hot_at_floor_since_s: float | None = None
    cool_since_s: float | None = None


class ThermalGuardMemory(PolicyMemory):
    held: dict[str, HeldGpu] = Field(default_factory=dict)  # uuid -> what we hold it at


class ThermalGuard(BasePolicy[ThermalGuardSettings, ThermalGuardMemory]):
    name: ClassVar[str] = "thermal_guard"
    # Temperatures, and the draw a step down is sized on.
    reads: ClassVar[Reads] = Reads.every_cycle(Metric.TEMP_C, Metric.POWER_W)
    safety: ClassVar[bool] = True
    description: ClassVar[str] = "Cap, then drain, GPUs that run hot or heat abnormally."
    Settings = ThermalGuardSettings
    Memory = ThermalGuardMemory

    def decide(
        self, situation: Situation, memory: PolicyMemory, now_s: float
    ) -> Decision[PolicyMemory]:
        assert isinstance(memory, ThermalGuardMemory)
        snap = situation.snapshot
        if snap.n_gpus == 0:
            return Decision([], memory)
        heat = self._heat(situation)
        held = dict(memory.held)
        rows_all = np.flatnonzero(heat.hot | heat.abnormal | np.isin(snap.uuid, list(held)))
        row_of = {str(snap.uuid[r]): int(r) for r in rows_all}
        plan = _Plan()
        for uuid, row in row_of.items():
            entry = held.get(uuid)
            if heat.hot[row] or heat.abnormal[row]:
                held[uuid] = self._step_down(situation, heat, row, entry, now_s, plan)
            elif entry is not None and heat.seen[row]:  # unseen: hold what we have
                kept = self._cool_down(heat, row, entry, now_s, plan)
                if kept is None:
                    del held[uuid]
                else:
                    held[uuid] = kept
        # Forget GPUs no longer in the fleet.
        held = {u: e for u, e in held.items() if u in row_of}
        return Decision(self._intents(situation, heat, plan, now_s), ThermalGuardMemory(held=held))

    def _heat(self, situation: Situation) -> _Heat:
        """Per GPU: its temperature against its slowdown point, hot, heating abnormally, cool."""
        s = self.settings
        snap = situation.snapshot
        temp, temp_ok = snap.column(Metric.TEMP_C)
        slowdown = slowdown_temp_c(situation)
        seen = controllable(situation) & temp_ok
        abnormal = np.zeros(snap.n_gpus, dtype=bool)
        if situation.anomalies is not None:
            kinds = np.char.lower(situation.anomalies.kind.astype(np.str_))
            heating = np.zeros(snap.n_gpus, dtype=bool)
            for word in HEATING_KINDS:
                heating |= np.char.find(kinds, word) >= 0
            abnormal = (
                seen
                & situation.anomalies.flagged
                & heating
                & (temp >= slowdown - s.abnormal_margin_c)
            )
        return _Heat(
            temp=temp,
            slowdown=slowdown,
            seen=seen,
            hot=seen & (temp >= slowdown - s.hot_margin_c),
            abnormal=abnormal,
            cool=seen & (temp <= slowdown - s.cool_margin_c),
            draw=np.nan_to_num(power(situation), nan=0.0),
            current=np.where(np.isfinite(situation.cap_w), situation.cap_w, situation.max_cap_w),
        )

    def _step_down(
        self,
        situation: Situation,
        heat: _Heat,
        row: int,
        entry: HeldGpu | None,
        now_s: float,
        plan: _Plan,
    ) -> HeldGpu:
        """A hot GPU: its cap a step lower (at most once a step interval, never below its
        floor); held at the floor too long, its node is drained."""
        s = self.settings
        floor = float(situation.min_cap_w[row])
        if entry is None or now_s - entry.last_step_s >= s.step_interval_s:
            current = float(heat.current[row])
            base = min(current, float(heat.draw[row]) or current)
            if entry is not None:
                base = min(base, entry.cap_w)
            entry = HeldGpu(
                cap_w=max(floor, float(np.floor(base * (1.0 - s.step_frac)))),
                last_step_s=now_s,
                hot_at_floor_since_s=entry.hot_at_floor_since_s if entry else None,
            )
        at_floor = entry.cap_w <= floor + 0.5
        since = entry.hot_at_floor_since_s if at_floor else None
        if at_floor and since is None:
            since = now_s
        entry = entry.model_copy(update={"hot_at_floor_since_s": since, "cool_since_s": None})
        plan.cap(row, entry.cap_w)
        if since is not None and now_s - since >= s.drain_after_s:
            snap = situation.snapshot
            node = str(snap.node_names[snap.node[row]])
            plan.drains.setdefault(
                node,
                f"gpu{int(snap.gpu[row])} at {float(heat.temp[row]):.0f} C "
                f"at its lowest cap for {now_s - since:.0f} s",
            )
        return entry

    def _cool_down(
        self, heat: _Heat, row: int, entry: HeldGpu, now_s: float, plan: _Plan
    ) -> HeldGpu | None:
        """A GPU we hold that is no longer hot: released once cool for the hold (None), else
        held where it is."""
        cool = bool(heat.cool[row])
        cool_since = entry.cool_since_s if cool else None
        if cool and cool_since is None:
            cool_since = now_s
        if cool_since is not None and now_s - cool_since >= self.settings.release_hold_s:
            plan.release_rows.append(row)
            return None
        plan.cap(row, entry.cap_w)
        return entry.model_copy(update={"cool_since_s": cool_since, "hot_at_floor_since_s": None})

    def _intents(
        self, situation: Situation, heat: _Heat, plan: _Plan, now_s: float
    ) -> list[Intent]:
        s = self.settings
        snap = situation.snapshot
        intents: list[Intent] = []
        if plan.cap_rows:
            rows = np.asarray(plan.cap_rows, dtype=np.int64)
            intents.append(
                SetPowerCap(
                    policy=self.name,
                    reason="running hot or heating abnormally: cap before the hardware throttles",
                    evidence={
                        "temp_c": np.round(heat.temp[rows], 1),
                        "slowdown_temp_c": heat.slowdown[rows],
                        "power_w": np.round(heat.draw[rows], 1),
                        "abnormal": heat.abnormal[rows],
                    },
                    expires_s=now_s + s.lease_s,
                    targets=GpuTargets.from_rows(snap, rows),
                    watts=np.asarray(plan.cap_watts, dtype=np.float64),
                )
            )
        if plan.release_rows:
            rows = np.asarray(plan.release_rows, dtype=np.int64)
            intents.append(
                ReleasePowerCap(
                    policy=self.name,
                    reason=f"cool for {s.release_hold_s:g} s: thermal cap released",
                    evidence={"temp_c": np.round(heat.temp[rows], 1)},
                    expires_s=now_s + s.lease_s,
                    targets=GpuTargets.from_rows(snap, rows),
                )
            )
        for node, why in plan.drains.items():
            intents.append(
                DrainNode(
                    policy=self.name,
                    reason=f"ooda: thermal: {why}",
                    evidence={"node": node},
                    expires_s=now_s + s.lease_s,
                    node=node,
                )
            )
        return intents


@dataclass(frozen=True, eq=False)
class _Heat:
    """One cycle's temperatures, per GPU (ThermalGuard._heat)."""

    temp: np.ndarray
    slowdown: np.ndarray
    seen: np.ndarray  # controllable, with a temperature
    hot: np.ndarray
    abnormal: np.ndarray  # heating abnormally (an anomaly of a heating kind), warm already
    cool: np.ndarray
    draw: np.ndarray
    current: np.ndarray  # the cap in force (its max where unknown)


@dataclass
class _Plan:
    """What this cycle asks: caps (row, watts), releases, drains (node -> why)."""

    cap_rows: list[int] = field(default_factory=list)
    cap_watts: list[float] = field(default_factory=list)
    release_rows: list[int] = field(default_factory=list)
    drains: dict[str, str] = field(default_factory=dict)

    def cap(self, row: int, watts: float) -> None:
        self.cap_rows.append(row)
        self.cap_watts.append(watts)

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
        s = self.settings
        snap = situation.snapshot
        if snap.n_gpus == 0:
            return Decision([], memory)
        temp, temp_ok = snap.column(Metric.TEMP_C)
        slowdown = slowdown_temp_c(situation)
        seen = controllable(situation) & temp_ok
        hot = seen & (temp >= slowdown - s.hot_margin_c)
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
        cool = seen & (temp <= slowdown - s.cool_margin_c)
        draw = np.nan_to_num(power(situation), nan=0.0)
        current = np.where(np.isfinite(situation.cap_w), situation.cap_w, situation.max_cap_w)

        held = dict(memory.held)
        rows_all = np.flatnonzero(hot | abnormal | np.isin(snap.uuid, list(held)))
        row_of = {str(snap.uuid[r]): int(r) for r in rows_all}
        cap_rows: list[int] = []
        cap_watts: list[float] = []
        release_rows: list[int] = []
        drains: dict[str, str] = {}
        for uuid, row in row_of.items():
            entry = held.get(uuid)
            is_hot = bool(hot[row] or abnormal[row])
            floor = float(situation.min_cap_w[row])
            if is_hot:
                if entry is None or now_s - entry.last_step_s >= s.step_interval_s:
                    base = min(float(current[row]), float(draw[row]) or float(current[row]))
                    if entry is not None:
                        base = min(base, entry.cap_w)
                    new_cap = max(floor, float(np.floor(base * (1.0 - s.step_frac))))
                    entry = HeldGpu(
                        cap_w=new_cap,
                        last_step_s=now_s,
                        hot_at_floor_since_s=entry.hot_at_floor_since_s if entry else None,
                    )
                at_floor = entry.cap_w <= floor + 0.5
                since = entry.hot_at_floor_since_s if at_floor else None
                if at_floor and since is None:
                    since = now_s
                entry = entry.model_copy(
                    update={"hot_at_floor_since_s": since, "cool_since_s": None}
                )
                held[uuid] = entry
                cap_rows.append(row)
                cap_watts.append(entry.cap_w)
                if since is not None and now_s - since >= s.drain_after_s:
                    node = str(snap.node_names[snap.node[row]])
                    drains.setdefault(
                        node,
                        f"gpu{int(snap.gpu[row])} at {float(temp[row]):.0f} C "
                        f"at its lowest cap for {now_s - since:.0f} s",
                    )
            elif entry is not None:
                if not seen[row]:
                    continue  # cannot see it: hold what we have, act on nothing
                cool_since = entry.cool_since_s if cool[row] else None
                if cool[row] and cool_since is None:
                    cool_since = now_s
                if cool_since is not None and now_s - cool_since >= s.release_hold_s:
                    release_rows.append(row)
                    del held[uuid]
                    continue
                held[uuid] = entry.model_copy(
                    update={"cool_since_s": cool_since, "hot_at_floor_since_s": None}
                )
                cap_rows.append(row)
                cap_watts.append(entry.cap_w)
        # Forget GPUs no longer in the fleet.
        present = set(row_of)
        held = {u: e for u, e in held.items() if u in present}

        intents: list[Intent] = []
        if cap_rows:
            rows = np.asarray(cap_rows, dtype=np.int64)
            intents.append(
                SetPowerCap(
                    policy=self.name,
                    reason="running hot or heating abnormally: cap before the hardware throttles",
                    evidence={
                        "temp_c": np.round(temp[rows], 1),
                        "slowdown_temp_c": slowdown[rows],
                        "power_w": np.round(draw[rows], 1),
                        "abnormal": abnormal[rows],
                    },
                    expires_s=now_s + s.lease_s,
                    targets=GpuTargets.from_rows(snap, rows),
                    watts=np.asarray(cap_watts, dtype=np.float64),
                )
            )
        if release_rows:
            rows = np.asarray(release_rows, dtype=np.int64)
            intents.append(
                ReleasePowerCap(
                    policy=self.name,
                    reason=f"cool for {s.release_hold_s:g} s: thermal cap released",
                    evidence={"temp_c": np.round(temp[rows], 1)},
                    expires_s=now_s + s.lease_s,
                    targets=GpuTargets.from_rows(snap, rows),
                )
            )
        for node, why in drains.items():
            intents.append(
                DrainNode(
                    policy=self.name,
                    reason=f"ooda: thermal: {why}",
                    evidence={"node": node},
                    expires_s=now_s + s.lease_s,
                    node=node,
                )
            )
        return Decision(intents, ThermalGuardMemory(held=held))

"""idle_powerdown: idle GPUs get their lowest cap; the cap goes as soon as work arrives.

An idle H100 draws ~75 W whatever its cap, so the cap saves nothing while it idles; what it buys
is a bound: a job landing there cannot spike the fleet before the next cycle. A GPU counts as idle
after `idle_after_s` without work (not in the gap between two jobs). When work arrives, the
lowest cap is released (other policies' caps, such as the budget's, still win by the conflict
rule: the lowest cap wins).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from agent.core.intents import GpuTargets, Intent, ReleasePowerCap, SetPowerCap
from agent.core.reads import Reads
from agent.core.situation import Situation
from agent.core.snapshot import Metric
from policies.base import BasePolicy, Decision, PolicyMemory, PolicySettings
from policies.common import capped_by_us, controllable, power


class IdlePowerdownSettings(PolicySettings):
    idle_after_s: float = Field(
        120.0, ge=0.0, description="A GPU idle this long gets its lowest cap (s)."
    )
    lease_s: float = Field(300.0, gt=0.0, description="Lease of the idle cap (s).")


class IdlePowerdown(BasePolicy[IdlePowerdownSettings, PolicyMemory]):
    name: ClassVar[str] = "idle_powerdown"
    reads: ClassVar[Reads] = Reads.every_cycle(Metric.POWER_W)  # the idle draw
    safety: ClassVar[bool] = False
    description: ClassVar[str] = "The lowest cap for idle GPUs, restored as soon as work arrives."
    Settings = IdlePowerdownSettings
    Memory = PolicyMemory

    def decide(
        self, situation: Situation, memory: PolicyMemory, now_s: float
    ) -> Decision[PolicyMemory]:
        s = self.settings
        snap = situation.snapshot
        if snap.n_gpus == 0 or situation.idle_s is None:
            return Decision([], memory)
        ok = controllable(situation)
        idle_s = np.nan_to_num(situation.idle_s, nan=0.0)
        at_floor = situation.cap_w <= situation.min_cap_w + 1.0
        to_cap = np.flatnonzero(ok & ~situation.busy & (idle_s >= s.idle_after_s) & ~at_floor)
        to_restore = np.flatnonzero(ok & situation.busy & at_floor & capped_by_us(situation))
        intents: list[Intent] = []
        if to_cap.size:
            intents.append(
                SetPowerCap(
                    policy=self.name,
                    reason=f"idle for at least {s.idle_after_s:g} s",
                    evidence={
                        "idle_s": np.round(idle_s[to_cap], 1),
                        "power_w": np.round(np.nan_to_num(power(situation)[to_cap]), 1),
                    },
                    expires_s=now_s + s.lease_s,
                    targets=GpuTargets.from_rows(snap, to_cap),
                    watts=situation.min_cap_w[to_cap].copy(),
                )
            )
        if to_restore.size:
            intents.append(
                ReleasePowerCap(
                    policy=self.name,
                    reason="work arrived on a GPU held at its lowest cap",
                    evidence={"power_w": np.round(np.nan_to_num(power(situation)[to_restore]), 1)},
                    expires_s=now_s + s.lease_s,
                    targets=GpuTargets.from_rows(snap, to_restore),
                )
            )
        return Decision(intents, memory)

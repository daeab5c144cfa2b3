"""An example third-party policy for ooda: cap busy GPUs during quiet hours (e.g. when a site's
electricity is dear). It shows everything a plug-in needs: a name, typed settings with bounds,
units and descriptions, a memory model, and a pure `decide`."""

from __future__ import annotations

import datetime as dt
from typing import ClassVar

import numpy as np
from pydantic import Field

from agent.core.intents import GpuTargets, Intent, SetPowerCap
from agent.core.situation import Situation
from policies.base import BasePolicy, Decision, PolicyMemory, PolicySettings


class QuietHoursSettings(PolicySettings):
    start_hour: int = Field(22, ge=0, le=23, description="Quiet hours start (UTC hour).")
    end_hour: int = Field(6, ge=0, le=23, description="Quiet hours end (UTC hour).")
    cap_frac: float = Field(0.7, gt=0.0, le=1.0, description="Cap as a share of the maximum limit.")


class QuietHours(BasePolicy[QuietHoursSettings, PolicyMemory]):
    name: ClassVar[str] = "quiet_hours"
    safety: ClassVar[bool] = False
    description: ClassVar[str] = "Cap busy GPUs to a share of their maximum during quiet hours."
    Settings = QuietHoursSettings
    Memory = PolicyMemory

    def decide(
        self, situation: Situation, memory: PolicyMemory, now_s: float
    ) -> Decision[PolicyMemory]:
        s = self.settings
        hour = dt.datetime.fromtimestamp(now_s, tz=dt.UTC).hour
        quiet = (
            (s.start_hour <= hour or hour < s.end_hour)
            if s.start_hour > s.end_hour
            else (s.start_hour <= hour < s.end_hour)
        )
        if not quiet:
            return Decision([], memory)
        rows = np.flatnonzero(
            situation.busy & situation.snapshot.fresh & np.isfinite(situation.max_cap_w)
        )
        if rows.size == 0:
            return Decision([], memory)
        watts = np.maximum(
            np.floor(s.cap_frac * situation.max_cap_w[rows]), situation.min_cap_w[rows]
        )
        intent: Intent = SetPowerCap(
            policy=self.name,
            reason=f"quiet hours {s.start_hour:02d}-{s.end_hour:02d} UTC",
            evidence={"hour_utc": hour},
            expires_s=now_s + 3600.0,
            targets=GpuTargets.from_rows(situation.snapshot, rows),
            watts=watts,
        )
        return Decision([intent], memory)

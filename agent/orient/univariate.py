"""One series, one observation at a time: the robust baseline of agent.orient.baseline for a
single series (plain floats: a file of a million rows takes seconds, not minutes), with time-
aware weights for irregular sampling.

Each observation is scored against the baseline learned from the rows before it, then learned
(Huberized). The weight of an observation grows with the time since the previous one, in units
of the series' typical interval (itself learned causally): a long gap forgets more. A timestamp
that repeats or steps back counts as one typical interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agent.orient.stats import MAD_TO_SIGMA


@dataclass(frozen=True, slots=True)
class Scored:
    score: float  # |value - level| / scale (0 while warming up)
    anomaly: bool
    level: float  # what the baseline expected (NaN while warming up)
    sigma: float


class OnlineDetector:
    def __init__(
        self,
        threshold: float = 6.0,
        halflife_n: float = 50.0,
        warmup_n: int = 10,
        clip_z: float = 3.0,
    ) -> None:
        self.threshold = threshold
        self.halflife_n = halflife_n
        self.warmup_n = warmup_n
        self.clip_z = clip_z
        self.level = math.nan
        self.dev = 0.0
        self.n = 0
        self.last_t: float | None = None
        self.typical_dt: float | None = None

    def _steps(self, t: float | None) -> float:
        if t is None or self.last_t is None:
            return 1.0
        dt = t - self.last_t
        if dt <= 0.0:
            return 1.0  # a repeated or backward timestamp: one nominal sample
        if self.typical_dt is None:
            self.typical_dt = dt
            return 1.0
        steps = min(max(dt / self.typical_dt, 0.1), 10.0)
        # The typical interval follows slowly and is robust to one odd gap.
        clipped = min(max(dt, self.typical_dt / 10.0), self.typical_dt * 10.0)
        self.typical_dt += 0.05 * (clipped - self.typical_dt)
        return steps

    def update(self, value: float, t: float | None = None) -> Scored:
        steps = self._steps(t)
        if t is not None and (self.last_t is None or t > self.last_t):
            self.last_t = t
        sigma = max(self.dev * MAD_TO_SIGMA, 1e-9 * max(abs(self.level), 1.0))
        ready = self.n >= self.warmup_n and math.isfinite(self.level)
        if ready:
            resid = value - self.level
            score = abs(resid) / sigma
            out = Scored(score, score >= self.threshold, self.level, sigma)
        else:
            out = Scored(0.0, False, math.nan, math.nan)
        # Learn.
        if self.n == 0 or not math.isfinite(self.level):
            self.level, self.dev = value, 0.0
        else:
            alpha = max(1.0 - 2.0 ** (-steps / self.halflife_n), 1.0 / (self.n + 1.0))
            limit = self.clip_z * sigma if self.n >= self.warmup_n else math.inf
            resid = value - self.level
            clipped = min(max(resid, -limit), limit)
            self.level += alpha * clipped
            self.dev = (1.0 - alpha) * self.dev + alpha * abs(clipped)
        self.n += 1
        return out

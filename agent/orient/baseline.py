"""Robust online baselines: a level and a scale per series, updated one observation at a time.

Each series (one per GPU and metric, or one per CSV file) keeps an exponentially weighted level
and an exponentially weighted mean absolute deviation. Updates are Huberized: a residual larger
than `clip_z` scales moves the baseline by at most `clip_z` scales, so an outlier barely shifts
it and a lasting level shift is learned gradually instead of at once. The first `warmup_n`
observations after a reset average with equal weights (a fast, fair start) and score nothing.

Causal by construction: the score of an observation uses only the state before it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.core.keyed import KeyedColumns
from agent.orient.stats import MAD_TO_SIGMA, decay_alpha

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class Expected:
    """The baseline of each requested series: level, scale (a standard deviation) and readiness."""

    level: FloatArray
    sigma: FloatArray
    ready: BoolArray  # enough observations since the last reset to score


class RobustBaselines:
    """A bank of named baselines over string keys (GPU UUIDs), all columnar."""

    def __init__(
        self,
        names: Sequence[str],
        halflife_n: float = 50.0,
        warmup_n: int = 5,
        clip_z: float = 3.0,
    ) -> None:
        self.names = tuple(names)
        self.halflife_n = halflife_n
        self.warmup_n = warmup_n
        self.clip_z = clip_z
        spec: dict[str, tuple[Any, Any]] = {}
        for name in self.names:
            spec[f"{name}.level"] = (np.float64, np.nan)
            spec[f"{name}.dev"] = (np.float64, 0.0)
            spec[f"{name}.n"] = (np.int64, 0)
        self.state = KeyedColumns(spec)

    def slots(self, keys: npt.ArrayLike) -> IntArray:
        return self.state.slots(keys)

    def expected(self, name: str, slot: IntArray, floor: float | FloatArray = 0.0) -> Expected:
        st = self.state.cols
        level = st[f"{name}.level"][slot]
        sigma = np.maximum(st[f"{name}.dev"][slot] * MAD_TO_SIGMA, floor)
        ready = (st[f"{name}.n"][slot] >= self.warmup_n) & np.isfinite(level)
        return Expected(level=level, sigma=np.asarray(sigma, dtype=np.float64), ready=ready)

    def reset(self, name: str, slot: IntArray) -> None:
        st = self.state.cols
        st[f"{name}.level"][slot] = np.nan
        st[f"{name}.dev"][slot] = 0.0
        st[f"{name}.n"][slot] = 0

    def update(
        self,
        name: str,
        slot: IntArray,
        x: FloatArray,
        mask: BoolArray,
        floor: float | FloatArray = 0.0,
        steps: float | FloatArray = 1.0,
    ) -> None:
        """Learn `x` where `mask` (and x finite). `steps`: how many nominal samples this one
        stands for (irregular sampling: a long gap weighs more); `floor`: least scale."""
        st = self.state.cols
        ok = mask & np.isfinite(x)
        if not ok.any():
            return
        s = slot[ok]
        xv = x[ok]
        steps_arr = np.broadcast_to(np.asarray(steps, dtype=np.float64), x.shape)[ok]
        floor_arr = np.broadcast_to(np.asarray(floor, dtype=np.float64), x.shape)[ok]
        level = st[f"{name}.level"][s]
        dev = st[f"{name}.dev"][s]
        n = st[f"{name}.n"][s]
        first = (n == 0) | ~np.isfinite(level)
        # Equal weights while warming up, then exponential forgetting.
        alpha = np.maximum(decay_alpha(steps_arr, self.halflife_n), 1.0 / (n + 1.0))
        sigma = np.maximum(dev * MAD_TO_SIGMA, floor_arr)
        limit = np.where(n >= self.warmup_n, self.clip_z * sigma, np.inf)
        resid = np.where(first, 0.0, xv - level)
        clipped = np.clip(resid, -limit, limit)
        new_level = np.where(first, xv, level + alpha * clipped)
        new_dev = np.where(first, 0.0, (1.0 - alpha) * dev + alpha * np.abs(clipped))
        st[f"{name}.level"][s] = new_level
        st[f"{name}.dev"][s] = new_dev
        st[f"{name}.n"][s] = np.minimum(n + 1, 1_000_000)

    def to_dict(self) -> dict[str, Any]:
        return self.state.to_dict()

    def load_dict(self, data: Mapping[str, Any]) -> None:
        self.state.load_dict(data)

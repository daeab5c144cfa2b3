"""Natural draw per GPU, learned from telemetry: what each GPU's current job draws uncapped.

A GPU whose limit clearly does not bind shows its natural draw directly; under a binding cap the
natural draw is only known to be at least the draw, so nothing is learned there but a lower
bound, and how close to its cap the GPU draws (`cap_draw_frac`). The estimate rises fast and falls
slowly (a budget must hold through the next peak, not the average). A job that just started is
still ramping up (loading data, initializing), so its draw says little yet: it is marked uncertain
for `warmup_s`, and policies account for it at its cap. State is columnar, keyed by GPU UUID.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.core.keyed import KeyedColumns
from agent.core.snapshot import Metric, Snapshot
from agent.orient.stats import Grouper

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

BUSY_UTIL_PCT = 5.0
CLEAR_OF_CAP_FRAC = 0.75  # below this share of a lowered limit, the limit surely does not bind
# How close to its cap a GPU draws is a property of the job, each sample off by the draw's noise:
# the first samples are averaged alike (an average from the first sample on would keep that one
# sample's noise at weight 0.9^n), then old ones fade at this rate per sample.
CAP_FRAC_FADE = 0.05


@dataclass(frozen=True, eq=False)
class NaturalDraw:
    """Per snapshot row."""

    mean_w: FloatArray  # NaN where unknown
    std_w: FloatArray
    uncertain: BoolArray  # warming up, or never seen uncapped
    busy: BoolArray
    cap_draw_frac: FloatArray  # draw / limit under a binding cap (NaN: not seen capped yet)
    busy_for_s: FloatArray | None = None  # how long the GPU has run its current job (NaN idle)


class NaturalDrawTracker:
    """Exponentially weighted mean and variance of each GPU's uncapped draw, per job."""

    def __init__(
        self, rise_halflife_s: float = 30.0, fall_halflife_s: float = 120.0, warmup_s: float = 180.0
    ) -> None:
        self.rise_halflife_s = rise_halflife_s
        self.fall_halflife_s = fall_halflife_s
        self.warmup_s = warmup_s
        self._jobs = Grouper()
        self.state = KeyedColumns(
            {
                "job": (np.int64, 0),  # string_hash of the job label
                "busy_since": (np.float64, np.nan),
                "mean": (np.float64, np.nan),
                "var": (np.float64, 0.0),
                "seen": (np.bool_, False),  # seen uncapped since the job started
                "last_t": (np.float64, np.nan),
                "cap_frac": (np.float64, np.nan),
                "cap_frac_n": (np.float64, 0.0),  # samples behind cap_frac (since the job began)
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state.to_dict()}

    def load_dict(self, data: Mapping[str, Any]) -> None:
        self.state.load_dict(data.get("state", {}))

    def update(self, snapshot: Snapshot) -> NaturalDraw:
        n = snapshot.n_gpus
        if n == 0:
            empty = np.zeros(0)
            return NaturalDraw(
                empty, empty, np.zeros(0, dtype=bool), np.zeros(0, dtype=bool), empty
            )
        slot = self.state.slots(snapshot.uuid)
        st = self.state.cols
        now = snapshot.time_s
        power, power_ok = snapshot.column(Metric.POWER_W)
        util, util_ok = snapshot.column(Metric.UTIL_PCT)
        limit, limit_ok = snapshot.column(Metric.POWER_LIMIT_W)
        max_w, max_ok = snapshot.column(Metric.MAX_LIMIT_W)
        fresh = snapshot.fresh & power_ok
        has_job = snapshot.job != ""
        busy = fresh & (has_job | (util_ok & (util > BUSY_UTIL_PCT)))

        self._restart_changed(snapshot, slot, fresh, busy, now)
        # A ramping job draws little whatever its cap: learn only after its warm-up.
        warming = busy & ((now - st["busy_since"][slot]) < self.warmup_s)
        at_max = np.where(max_ok & limit_ok, limit >= max_w - 0.5, False)
        clear = at_max | (limit_ok & (power < CLEAR_OF_CAP_FRAC * limit))
        # Where the GPU reports its clock event reasons, it says itself whether the cap binds.
        cap_bit, reasons_ok = snapshot.power_cap_holds()
        # At the maximum limit the draw is the most the GPU can draw whatever the job wants:
        # that is its natural draw, as far as any cap can tell (even if the limit binds there).
        clear = np.where(reasons_ok, ~cap_bit | at_max, clear)
        learn = busy & clear & ~warming
        self._learn_clear_draw(slot[learn], power[learn], now)
        self._learn_held_draw(slot, busy & ~clear & limit_ok, power, limit, cap_bit, reasons_ok)

        mean = np.where(busy, st["mean"][slot], np.nan)
        return NaturalDraw(
            mean_w=mean,
            std_w=np.sqrt(st["var"][slot]),
            uncertain=busy & (warming | ~st["seen"][slot]),
            busy=busy,
            cap_draw_frac=np.where(busy, st["cap_frac"][slot], np.nan),
            busy_for_s=np.where(busy, now - st["busy_since"][slot], np.nan),
        )

    def _restart_changed(
        self,
        snapshot: Snapshot,
        slot: npt.NDArray[np.int64],
        fresh: npt.NDArray[np.bool_],
        busy: npt.NDArray[np.bool_],
        now_s: float,
    ) -> None:
        """A new job (or a GPU turning busy) restarts what we know; an idle GPU is busy since
        nothing."""
        st = self.state.cols
        job = self._jobs.hashes(snapshot.job)
        job_changed = (st["job"][slot] != job) | (busy & np.isnan(st["busy_since"][slot]))
        restart = fresh & job_changed
        st["job"][slot[restart]] = job[restart]
        st["busy_since"][slot[restart]] = np.where(busy[restart], now_s, np.nan)
        st["mean"][slot[restart]] = np.nan
        st["var"][slot[restart]] = 0.0
        st["seen"][slot[restart]] = False
        st["cap_frac"][slot[restart]] = np.nan
        st["cap_frac_n"][slot[restart]] = 0.0
        st["busy_since"][slot[fresh & ~busy]] = np.nan

    def _learn_clear_draw(
        self, s: npt.NDArray[np.int64], x: npt.NDArray[np.float64], now_s: float
    ) -> None:
        """Slots `s` drew `x` clear of their cap: their natural draw, averaged (rising faster
        than falling)."""
        st = self.state.cols
        dt = np.where(np.isnan(st["last_t"][s]), np.inf, now_s - st["last_t"][s])
        old = st["mean"][s]
        first = np.isnan(old)
        halflife = np.where(x > old, self.rise_halflife_s, self.fall_halflife_s)
        alpha = 1.0 - np.exp2(-np.maximum(dt, 0.0) / halflife)
        delta = np.where(first, 0.0, x - old)
        st["mean"][s] = np.where(first, x, old + alpha * delta)
        var_alpha = 1.0 - np.exp2(-np.maximum(dt, 0.0) / self.fall_halflife_s)
        st["var"][s] = np.where(
            first, (0.02 * x) ** 2, (1 - var_alpha) * (st["var"][s] + var_alpha * delta**2)
        )
        st["seen"][s] = True
        st["last_t"][s] = now_s

    def _learn_held_draw(
        self,
        slot: npt.NDArray[np.int64],
        held: npt.NDArray[np.bool_],
        power: npt.NDArray[np.float64],
        limit: npt.NDArray[np.float64],
        cap_bit: npt.NDArray[np.bool_],
        reasons_ok: npt.NDArray[np.bool_],
    ) -> None:
        """Under a (possibly) binding cap the natural draw is at least what the GPU draws now;
        where it surely binds (the GPU says so, or the known natural draw is well above the
        limit), learn how close to the limit the GPU draws."""
        st = self.state.cols
        b = slot[held]
        st["mean"][b] = np.fmax(st["mean"][b], power[held])
        surely = np.where(reasons_ok, cap_bit, st["mean"][slot] > 1.05 * limit)
        bound = held & surely & (st["seen"][slot] | reasons_ok)
        c = slot[bound]
        frac = power[bound] / limit[bound]
        prev = st["cap_frac"][c]
        n = np.where(np.isnan(prev), 0.0, st["cap_frac_n"][c]) + 1.0
        weight = np.maximum(1.0 / n, CAP_FRAC_FADE)
        st["cap_frac"][c] = np.where(np.isnan(prev), frac, prev + weight * (frac - prev))
        st["cap_frac_n"][c] = n

"""energy_efficiency: per job, the cap that minimizes energy (or energy x delay) within a bound on
slowdown, from the job's learned power curve.

For a job with natural draw N and curve T(x) (x = power / N), the energy per unit of work at a
share x is (x N + static_w) / T(x); energy x delay is that over T(x) again. With T concave both are
unimodal in x, so a vectorized golden-section search over every GPU at once finds the optimum;
the search is confined to x where T(x) >= 1 - max_slowdown_frac and the cap stays settable. The
cap for a share x is x N / k, k the share of its cap the GPU draws: its learned one, else the lowest
plausible one (so the GPU gets at least x N, and the bound holds).
Only curves learned with at least `min_confidence` are acted on: a prior is not evidence enough
to slow anyone's job down.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from agent.core.curves import (
    energy_optimal_share,
    power_for_throughput,
    slowdown_cap_draw_frac,
    throughput_at_power,
)
from agent.core.intents import GpuTargets, Intent, SetPowerCap
from agent.core.reads import Reads
from agent.core.situation import Situation
from agent.core.snapshot import Metric
from policies.base import BasePolicy, Decision, PolicyMemory, PolicySettings
from policies.common import FloatArray, controllable, pool_within_jobs, power


class EnergyEfficiencySettings(PolicySettings):
    objective: Literal["energy", "energy_delay"] = Field(
        "energy", description="Minimize energy per unit of work, or energy x delay."
    )
    max_slowdown_frac: float = Field(
        0.05, ge=0.0, le=0.5, description="Largest throughput loss allowed for any job (fraction)."
    )
    min_confidence: float = Field(
        0.5, ge=0.0, le=1.0, description="Act only on curves learned at least this confidently."
    )
    static_w: float = Field(
        0.0,
        ge=0.0,
        description="Power per GPU that does not scale with the cap (share of the node's).",
    )
    min_saving_frac: float = Field(
        0.02, ge=0.0, le=1.0, description="Skip caps that save less than this share of energy."
    )
    lease_s: float = Field(300.0, gt=0.0, description="Lease of the efficiency cap (s).")
    raise_step_w: float = Field(
        10.0,
        ge=0.0,
        description="A cap in force below what the bound needs is raised by at least this (W): "
        "the guard skips smaller changes (guard.cap_dead_band_w).",
    )


class EnergyEfficiency(BasePolicy[EnergyEfficiencySettings, PolicyMemory]):
    name: ClassVar[str] = "energy_efficiency"
    reads: ClassVar[Reads] = Reads.every_cycle(Metric.POWER_W)  # the draw each job is pooled on
    safety: ClassVar[bool] = False
    description: ClassVar[str] = (
        "Per job, the cap that minimizes energy (or energy x delay) within a slowdown bound."
    )
    Settings = EnergyEfficiencySettings
    Memory = PolicyMemory

    def decide(
        self, situation: Situation, memory: PolicyMemory, now_s: float
    ) -> Decision[PolicyMemory]:
        s = self.settings
        snap = situation.snapshot
        curves = situation.curves
        eligible = (
            controllable(situation)
            & situation.busy
            & np.isfinite(curves.natural_w)
            & (curves.confidence >= s.min_confidence)
        )
        rows = np.flatnonzero(eligible)
        if rows.size == 0:
            return Decision([], memory)
        natural, k = self._pooled(situation, rows)
        a, b = curves.a[rows], curves.b[rows]
        lo_cap, hi_cap = situation.min_cap_w[rows], situation.max_cap_w[rows]
        # The least share allowed: the slowdown bound, and what the lowest cap still gives.
        x_slow = power_for_throughput(1.0 - s.max_slowdown_frac, natural, a, b) / natural
        x_floor = np.minimum(1.0, k * lo_cap / natural)
        x_lo = np.clip(np.maximum(x_slow, x_floor), 0.0, 1.0)
        x = energy_optimal_share(natural, a, b, x_lo, s.static_w, s.objective)
        t = throughput_at_power(x * natural, natural, a, b)
        energy_ratio = (x * natural + s.static_w) / np.maximum(t, 1e-9) / (natural + s.static_w)
        saving = 1.0 - energy_ratio
        cap = self._past_dead_band(
            np.clip(np.ceil(x * natural / k), lo_cap, hi_cap), situation.cap_w[rows], hi_cap
        )
        act = (saving >= s.min_saving_frac) & (cap < hi_cap - 0.5)
        if not act.any():
            return Decision([], memory)
        sel = rows[act]
        intent: Intent = SetPowerCap(
            policy=self.name,
            reason=(
                f"{s.objective.replace('_', ' x ')}-optimal cap within "
                f"{100 * s.max_slowdown_frac:g}% slowdown"
            ),
            evidence={
                "natural_w": np.round(natural[act], 1),
                "power_w": np.round(np.nan_to_num(power(situation)[sel]), 1),
                "expected_throughput": np.round(t[act], 4),
                "expected_energy_saving": np.round(saving[act], 4),
                "confidence": np.round(curves.confidence[sel], 3),
                # Whose throughput the curve stands for: the job's own, or the SM-clock proxy.
                "throughput_source": throughput_source(situation, sel),
            },
            expires_s=now_s + s.lease_s,
            targets=GpuTargets.from_rows(snap, sel),
            watts=cap[act],
        )
        return Decision([intent], memory)

    def _past_dead_band(
        self, cap: FloatArray, in_force: FloatArray, hi_cap: FloatArray
    ) -> FloatArray:
        """A cap in force below the one the bound needs slows its job past the bound: it must
        rise, and a smaller raise than the guard's dead band would be skipped (a raise by a few
        watts as the estimates settle is the usual case), so it rises by at least
        `raise_step_w`. Caps above what is needed may come down (the guard lowers them only by
        its dead band or more: they stay within it of the bound's cap, on its safe side)."""
        short = np.isfinite(in_force) & (in_force < cap - 0.5)
        raised = np.minimum(np.maximum(cap, np.ceil(in_force + self.settings.raise_step_w)), hi_cap)
        return np.asarray(np.where(short, raised, cap), dtype=np.float64)

    @staticmethod
    def _pooled(situation: Situation, rows: np.ndarray) -> tuple[FloatArray, FloatArray]:
        """(natural draw, cap-draw share) of the given GPUs, pooled within each job.

        A job runs at the pace of its slowest GPU, and each GPU's natural draw is often known
        from a few noisy samples before its first cap: capping each by its own estimate would
        give the job's GPUs different shares of their true draw, and the most throttled sets
        the pace while the others spend watts that buy nothing. The noise of an estimate is
        bounded by the spread of one sample (the draw's own spread, from `natural_w_hi`)."""
        curves = situation.curves
        reference = curves.natural_w if curves.curve_natural_w is None else curves.curve_natural_w
        natural = reference[rows]
        # Where the share is not learned, the lowest plausible one: orient's prior (the whole
        # cap, for budgets) would give a cap that slows the job beyond the bound.
        k = slowdown_cap_draw_frac(curves.cap_draw_frac[rows])
        sample_sd = np.maximum(curves.natural_w_hi[rows] - curves.natural_w[rows], 0.0) / 2.0
        _, jobs = np.unique(situation.snapshot.job_key[rows], return_inverse=True)
        pooled_natural = pool_within_jobs(natural, sample_sd**2, jobs)
        # A share of the cap is measured with the draw's relative noise.
        rel_sd = sample_sd / np.maximum(natural, 1e-9)
        pooled_k = pool_within_jobs(k, (rel_sd * k) ** 2, jobs)
        return pooled_natural, pooled_k


def throughput_source(situation: Situation, rows: np.ndarray) -> np.ndarray:
    """Per row: which throughput is in use for its job (`sm_clock` when orient does not say)."""
    view = situation.throughput
    if view is None:
        return np.full(rows.shape[0], "sm_clock", dtype=np.str_)
    return np.asarray(view.kind[rows], dtype=np.str_)

"""inference_slo: per inference service, the lowest SM clock that keeps its p90 latencies under
their SLOs, learned online.

Decode is memory-bound and draws well under any cap (agent/sim/inference.py cites the
measurements), so a cap saves little there; a locked SM clock saves decode energy at almost no
cost in tokens, and prefill (TTFT) slows with the clock. Per service (a job whose throughput in
use is an inference server's, with its p90 TTFT or TPOT read), its load is its token rate, in
bins of `load_bin_frac` more rate each (log-spaced), and it learns per bin the lowest lock seen
comfortable there (both p90s under their SLO less `headroom_frac`) and the highest seen at risk
(a p90 at its SLO less `at_risk_frac`). A lock at risk at some load is at risk at every higher
load, one comfortable at some load is comfortable at every lower one, so:

- at risk: the lock backs off at once by `backoff_steps` steps of `step_frac` of the maximum
  clock (or is released), and is remembered as at risk at this load;
- otherwise the lock goes to the lowest known comfortable at this load or a higher one, or a
  step lower every `hold_cycles` while comfortable, never to or below a lock at risk at this load
  or a lower one, nor below `min_clock_frac`: when the load rises into a bin where the lock was at
  risk before, the lock rises before the latencies do; when a burst ends, it comes straight back.
- what was learned at risk is forgotten after `relearn_s` (a service's model, batch or prompts
  change). A service whose figures are not read keeps its lock and is released after
  `release_after_s`.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from agent.core.app_metrics import ThroughputKind
from agent.core.gpu_models import BUILTIN_MODELS
from agent.core.intents import GpuTargets, Intent, LockClocks, ResetClocks
from agent.core.reads import Reads
from agent.core.situation import Situation
from agent.core.snapshot import Metric
from policies.base import BasePolicy, Decision, PolicyMemory, PolicySettings
from policies.common import controllable


class InferenceSloSettings(PolicySettings):
    ttft_p90_slo_s: float = Field(0.5, gt=0, description="p90 time to first token (s).")
    tpot_p90_slo_s: float = Field(0.05, gt=0, description="p90 time per output token (s).")
    headroom_frac: float = Field(
        0.08, gt=0, lt=1, description="Step down only with both p90s this far under their SLOs."
    )
    at_risk_frac: float = Field(
        0.04, ge=0, lt=1, description="Back off when a p90 comes this close to its SLO."
    )
    step_frac: float = Field(
        0.025, gt=0, le=0.5, description="One step: this share of the maximum SM clock."
    )
    backoff_steps: int = Field(4, ge=1, le=20, description="Steps up at once when at risk.")
    min_clock_frac: float = Field(
        0.4, ge=0.1, le=1, description="The lowest lock: this share of the maximum SM clock."
    )
    hold_cycles: int = Field(1, ge=1, le=100, description="Cycles between two steps down.")
    relearn_s: float = Field(600.0, gt=0, description="A lock at risk is forgotten after (s).")
    load_bin_frac: float = Field(
        0.05, gt=0, le=1, description="Figures are learned per load bin: this much more rate."
    )
    settle_s: float = Field(
        30.0, ge=0, description="After a raise, figures this long are of the lock before (s)."
    )
    release_after_s: float = Field(300.0, gt=0, description="Released without figures this long.")
    lease_s: float = Field(120.0, gt=0, description="Lease of a clock lock (s).")


class ServiceClock(BaseModel):
    """One service's lock (share of the maximum clock; 1.0: none) and what was learned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lock_frac: float = 1.0
    comfortable: dict[int, float] = Field(default_factory=dict)  # bin -> lowest lock
    at_risk: dict[int, float] = Field(default_factory=dict)  # bin -> highest lock
    at_risk_s: dict[int, float] = Field(default_factory=dict)  # bin -> when
    calm_cycles: int = 0
    seen_s: float = 0.0
    raised_s: float = -1e18  # when the lock was last raised for a risk


class InferenceSloMemory(PolicyMemory):
    services: dict[str, ServiceClock] = Field(default_factory=dict)


def _worst_per_job(job: np.ndarray, n_jobs: int, values: np.ndarray) -> np.ndarray:
    """Per job (`job`: each row's job number): the highest finite value (NaN: none)."""
    out = np.full(n_jobs, np.nan)
    np.fmax.at(out, job, np.where(np.isfinite(values), values, np.nan))
    return out


def _mean_per_job(job: np.ndarray, n_jobs: int, values: np.ndarray) -> np.ndarray:
    """Per job: the mean of the values read (NaN: none read)."""
    read = ~np.isnan(values)
    count = np.bincount(job[read], minlength=n_jobs)
    total = np.bincount(job[read], values[read], minlength=n_jobs)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _max_clock_mhz(model: np.ndarray) -> np.ndarray:
    """Per GPU: its model's maximum SM clock (NaN for a model not known)."""
    out = np.full(model.shape, np.nan)
    for spec in BUILTIN_MODELS.values():
        out[model == spec.model_name] = spec.max_sm_clock_mhz
    return out


def _lock_frac(job: np.ndarray, services: dict[str, ServiceClock]) -> np.ndarray:
    """Per GPU: its job's lock (1.0: none, or not a service), looked up once per job."""
    jobs, inverse = np.unique(job, return_inverse=True)
    per_job = [services[j].lock_frac if j in services else 1.0 for j in jobs.tolist()]
    return np.asarray(per_job, dtype=np.float64)[inverse]


class InferenceSlo(BasePolicy[InferenceSloSettings, InferenceSloMemory]):
    name: ClassVar[str] = "inference_slo"
    reads: ClassVar[Reads] = Reads.every_cycle(Metric.SM_CLOCK_MHZ)
    safety: ClassVar[bool] = False
    description: ClassVar[str] = (
        "Per inference service, the lowest SM clock lock keeping its p90 TTFT and TPOT under SLO."
    )
    Settings = InferenceSloSettings
    Memory = InferenceSloMemory

    def decide(
        self, situation: Situation, memory: PolicyMemory, now_s: float
    ) -> Decision[PolicyMemory]:
        assert isinstance(memory, InferenceSloMemory)
        view = situation.throughput
        snap = situation.snapshot
        if view is None or snap.n_gpus == 0:
            return Decision([], memory)
        serving = controllable(situation) & (view.unit == "tokens") & view.application()
        serving &= view.kind != ThroughputKind.TRAINING
        # Grouped once (a mask per service would cost services x GPUs).
        rows = np.flatnonzero(serving)
        jobs, of_job = np.unique(snap.job[rows], return_inverse=True)
        ttft = _worst_per_job(of_job, jobs.size, view.ttft_p90_s[rows])
        tpot = _worst_per_job(of_job, jobs.size, view.tpot_p90_s[rows])
        rate = _mean_per_job(of_job, jobs.size, view.rate_per_s[rows])
        services: dict[str, ServiceClock] = {}
        for k, job in enumerate(jobs.tolist()):
            before = memory.services.get(job, ServiceClock(seen_s=now_s))
            services[job] = self._next(
                before, float(ttft[k]), float(tpot[k]), float(rate[k]), now_s
            )
        for job, kept in memory.services.items():  # not seen this cycle: kept a while
            if job not in services and now_s - kept.seen_s < self.settings.release_after_s:
                services[job] = kept
        intents = self._intents(situation, serving, services, memory.services, now_s)
        return Decision(intents, InferenceSloMemory(services=services))

    def _next(
        self, svc: ServiceClock, ttft: float, tpot: float, rate: float, now_s: float
    ) -> ServiceClock:
        """One service's next lock from its p90 latencies and rate (NaN: not read)."""
        s = self.settings
        if not (np.isfinite(ttft) or np.isfinite(tpot)) or not np.isfinite(rate):
            return svc
        worst = max(
            ttft / s.ttft_p90_slo_s if np.isfinite(ttft) else 0.0,
            tpot / s.tpot_p90_slo_s if np.isfinite(tpot) else 0.0,
        )
        # Load bins on a log scale of the rate: each `load_bin_frac` more load, the next bin.
        here = int(np.floor(np.log(max(rate, 1e-9)) / np.log1p(s.load_bin_frac)))
        kept = {b: t for b, t in svc.at_risk_s.items() if now_s - t < s.relearn_s}
        at_risk = {b: f for b, f in svc.at_risk.items() if b in kept}
        comfortable = dict(svc.comfortable)
        lock = svc.lock_frac
        raised_s = svc.raised_s
        if worst >= 1.0 - s.at_risk_frac:
            # Figures of a window that began before the last raise speak of the lock before it.
            if now_s - svc.raised_s >= s.settle_s:
                at_risk[here], kept[here] = max(at_risk.get(here, 0.0), lock), now_s
                comfortable = {
                    b: f for b, f in comfortable.items() if f > at_risk[here] or b < here
                }
            # Over its SLO already: full clock at once; close to it: some steps up.
            raised = 1.0 if worst >= 1.0 else min(1.0, lock + s.backoff_steps * s.step_frac)
            if raised > lock:
                lock, raised_s = raised, now_s
            calm = 0
        else:
            calm = svc.calm_cycles + 1
            if worst <= 1.0 - s.headroom_frac:
                comfortable[here] = min(comfortable.get(here, 1.0), lock)
                if calm >= s.hold_cycles:
                    lock, calm = lock - s.step_frac, 0
                # The lowest lock known comfortable at this load or a higher one.
                lock = min(lock, *(f for b, f in comfortable.items() if b >= here))
            risky = [f for b, f in at_risk.items() if b <= here]
            floor = max(risky) + s.step_frac if risky else 0.0
            lock = min(1.0, max(lock, floor, s.min_clock_frac))
        return ServiceClock(
            lock_frac=round(lock, 6),
            comfortable=comfortable,
            at_risk=at_risk,
            at_risk_s=kept,
            calm_cycles=calm,
            seen_s=now_s,
            raised_s=raised_s,
        )

    def _intents(
        self,
        situation: Situation,
        serving: np.ndarray,
        services: dict[str, ServiceClock],
        before: dict[str, ServiceClock],
        now_s: float,
    ) -> list[Intent]:
        """A lock for every locked service's GPUs (renewing its lease), a reset for those that
        went back to full clock."""
        snap = situation.snapshot
        frac = _lock_frac(snap.job, services)
        top = _max_clock_mhz(snap.model)
        locked = serving & (frac < 1.0 - 1e-9) & np.isfinite(top)
        released = serving & ~locked & (_lock_frac(snap.job, before) < 1.0 - 1e-9)
        intents: list[Intent] = []
        if locked.any():
            rows = np.flatnonzero(locked)
            intents.append(
                LockClocks(
                    policy=self.name,
                    reason="the lowest SM clock keeping the service's p90 latencies under SLO",
                    evidence={
                        "lock_frac": np.round(frac[rows], 3),
                        "ttft_p90_s": np.round(situation.throughput.ttft_p90_s[rows], 4),  # type: ignore[union-attr]
                        "tpot_p90_s": np.round(situation.throughput.tpot_p90_s[rows], 5),  # type: ignore[union-attr]
                    },
                    expires_s=now_s + self.settings.lease_s,
                    targets=GpuTargets.from_rows(snap, rows),
                    min_mhz=np.zeros(rows.size),
                    max_mhz=np.round(frac[rows] * top[rows]),
                )
            )
        if released.any():
            intents.append(
                ResetClocks(
                    policy=self.name,
                    reason="a p90 latency near its SLO: default clocks",
                    expires_s=now_s + self.settings.lease_s,
                    targets=GpuTargets.from_rows(snap, np.flatnonzero(released)),
                )
            )
        return intents

"""A twin run's KPIs, read from its step log: seconds above budget, work done, energy. The demo,
the replay test API, twin traces and the benchmarks all count them this way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent.core.efficiency import tokens_per_joule_or_none
from agent.sim.twin import Twin, TwinSpec


@dataclass
class RunKpis:
    violation_s: float
    work_gpu_s: float
    energy_kwh: float
    tokens: float = 0.0  # the inference services' generated tokens (0: none run)
    tokens_energy_j: float = 0.0  # the energy of the GPUs serving them

    @property
    def tokens_per_joule(self) -> float | None:
        """agent.core.efficiency's definition; None where no service ran."""
        return tokens_per_joule_or_none(self.tokens, self.tokens_energy_j)


def service_gpus(twin: Twin) -> npt.NDArray[np.intp]:
    """The GPUs of the twin's inference services (they run all day, from the start)."""
    gpus = np.flatnonzero(twin.job_row >= 0)
    return gpus[twin.jobs.service[twin.job_row[gpus]]]


def run_kpis(twin: Twin, interval_s: float) -> RunKpis:
    """Seconds above budget (not counting the first control interval after each budget change,
    when no controller could have reacted), work done and energy."""
    t, fleet, budget, work = twin.step_log()
    dt = np.diff(np.append(t, twin.t_s))
    over = np.isfinite(budget) & (fleet > budget)
    grace = np.zeros(t.shape, dtype=bool)
    if twin.spec.budget is not None:
        for change in twin.spec.budget.change_times():
            grace |= (t >= change) & (t < change + interval_s)
    return RunKpis(
        violation_s=float(dt[over & ~grace].sum()),
        work_gpu_s=float(work.sum()),
        energy_kwh=twin.energy_total_j / 3.6e6,
        tokens=float(twin.services.generation_tokens.sum()),
        tokens_energy_j=float(twin.energy_j[service_gpus(twin)].sum()),
    )


def uncapped_demand_w(
    spec: TwinSpec, duration_s: float, progress: Callable[[float], None] | None = None
) -> float:
    """The mean fleet draw of this twin (this seed) with no control: what a budget is sized on
    (`progress`: told the twin seconds run, as `Twin.run_until`)."""
    probe = Twin(spec)
    probe.run_until(duration_s, progress=progress)
    _t, fleet_w, _b, _w = probe.step_log()
    return float(fleet_w.mean()) if fleet_w.size else spec.expected_demand_w()

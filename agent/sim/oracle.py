"""The oracle: the best cap allocation under the budget given the twin's true curves, re-solved
whenever the twin's state changes (a bound no causal policy can beat). The only reader of
`Twin.true_curves()`.

It is held to the budget as the agent is: it plans under `budget x (1 - margin_frac)` (the
agent's power_budget margin) less three standard deviations of the fleet's draw noise, and
re-solves at every step while a job's true draw changes (a warm-up, a phase), so it never runs
above the budget on a plan made for a smaller draw (tests/test_oracle.py checks it over several
seeds)."""

from __future__ import annotations

import numpy as np

from agent.core.curves import (
    allocate_power,
    energy_optimal_share,
    power_for_throughput,
    throughput_at_cap,
)
from agent.sim.twin import FATAL_XIDS, FloatArray, Twin

# power_budget's default `margin_frac` (policies/power_budget.py; the twin may not import
# policies, and tests/test_oracle.py checks the two agree).
AGENT_MARGIN_FRAC = 0.01


class Oracle:
    """A twin controller (pass it to `Twin.step(control=...)`). With `priority_weights` it
    maximizes priority-weighted throughput, as the agent's power_budget does."""

    def __init__(
        self,
        priority_weights: dict[int, float] | None = None,
        margin_frac: float = AGENT_MARGIN_FRAC,
    ) -> None:
        self._key: tuple[object, ...] | None = None
        self.priority_weights = priority_weights
        self.margin_frac = margin_frac

    def __call__(self, twin: Twin) -> None:
        budget = twin.budget_w()
        if budget is None:
            return
        truth = twin.true_curves()
        busy = truth["busy"] > 0
        # The plan follows the true draw: a warming job's grows every step (as do a job's phases),
        # and a plan made for its draw a few seconds ago would run over the budget.
        key = (
            budget,
            twin.job_row.tobytes(),
            twin.xid.tobytes(),
            truth["natural_w"].tobytes(),
        )
        if key == self._key:
            return
        self._key = key
        model = twin.spec.model
        idle_draw = float((~busy).sum()) * model.idle_w
        # The oracle knows the draw noise exactly: it keeps 3 standard deviations of the fleet's
        # noise in hand, the least any controller needs to stay under the budget.
        noise_w = (
            3.0 * twin.spec.power_noise_frac * float(np.sqrt((truth["natural_w"][busy] ** 2).sum()))
        )
        available = (
            budget * (1.0 - self.margin_frac)
            - twin.spec.nodes * twin.spec.node_overhead_w
            - idle_draw
            - noise_w
        )
        caps = twin.max_w.copy()
        if busy.any():
            weight = None
            if self.priority_weights:
                prio = twin.job_priority()[busy]
                weight = np.ones(prio.size)
                for klass, w in self.priority_weights.items():
                    weight[prio == klass] = w
            alloc = allocate_power(
                available,
                truth["natural_w"][busy],
                truth["a"][busy],
                truth["b"][busy],
                truth["k"][busy],
                twin.min_w[busy],
                twin.max_w[busy],
                weight=weight,
            )
            caps[busy] = alloc.cap_w
        twin.cap_w[:] = caps


def oracle_throughput_bound(twin: Twin, budget_w: float) -> float:
    """The best total relative throughput reachable right now under `budget_w` (diagnostics)."""
    truth = twin.true_curves()
    busy = (truth["busy"] > 0) & ~np.isin(twin.xid, list(FATAL_XIDS))
    available = budget_w - float((~busy).sum()) * twin.spec.model.idle_w
    alloc = allocate_power(
        available,
        truth["natural_w"][busy],
        truth["a"][busy],
        truth["b"][busy],
        truth["k"][busy],
        twin.min_w[busy],
        twin.max_w[busy],
    )
    return float(
        throughput_at_cap(
            alloc.cap_w,
            truth["natural_w"][busy],
            truth["a"][busy],
            truth["b"][busy],
            truth["k"][busy],
        ).sum()
    )


class EnergyOracle:
    """Each running job at the cap that minimizes its energy per unit of work within
    `max_slowdown_frac`, from the true curves: the most an energy policy could save."""

    def __init__(self, max_slowdown_frac: float = 0.05, objective: str = "energy") -> None:
        self.max_slowdown_frac = max_slowdown_frac
        self.objective = objective
        self._key: bytes | None = None

    def __call__(self, twin: Twin) -> None:
        key = twin.job_row.tobytes()
        ramping = np.any(
            (twin.job_row >= 0)
            & (twin.t_s - twin.jobs.start_s[np.maximum(twin.job_row, 0)] < twin.spec.startup_s)
        )
        if key == self._key and not ramping:
            return
        self._key = key
        truth = twin.true_curves()
        busy = truth["busy"] > 0
        caps = twin.max_w.copy()
        if busy.any():
            natural, a, b, k = (
                truth["natural_w"][busy],
                truth["a"][busy],
                truth["b"][busy],
                truth["k"][busy],
            )
            x_slow = power_for_throughput(1.0 - self.max_slowdown_frac, natural, a, b) / natural
            x_floor = np.minimum(1.0, k * twin.min_w[busy] / natural)
            x_lo = np.clip(np.maximum(x_slow, x_floor), 0.0, 1.0)
            x = energy_optimal_share(natural, a, b, x_lo, 0.0, self.objective)
            caps[busy] = np.clip(x * natural / k, twin.min_w[busy], twin.max_w[busy])
            caps[busy] = np.where(x >= 0.999, twin.max_w[busy], caps[busy])
        twin.cap_w[:] = caps


def curve_truth(twin: Twin) -> dict[str, FloatArray]:
    """The twin's true curves per GPU, for scoring learned curves (tests, benchmarks): the
    agent itself never sees these."""
    return twin.true_curves()

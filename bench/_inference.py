"""The `inference` scenario of bench/decision_quality.py: inference services over an afternoon
(the twin's normal-day load curve and bursts; prefill and decode under SM clocks and caps,
agent/sim/inference.py), four controllers acting every interval:

- `ooda`: the `inference_slo` policy, deciding from what the agent sees: a Situation oriented
  from the twin's DCGM view, with each service's tokens and p90 latencies computed from its vLLM
  counters and histograms over the last window exactly as Prometheus's rate() and
  histogram_quantile() would. The act path for clock intents (the gate, the node daemon's clock
  lever) is not in yet (the gate refuses them), so its intents are applied to the twin here;
- `oracle`: per service GPU, the lock and cap of least draw whose p90 latencies at the true load
  now stay under the SLOs (a grid of clock shares and caps, from the twin's true model);
- `caps_only`: the same oracle with caps alone (no clock locks);
- `none`: no control.

One JSON line per controller: `tokens_per_joule` (the services' output tokens per joule of their
GPUs), `slo_attainment` (the share of service-seconds whose true p90 TTFT and TPOT kept their
SLOs), `energy_saving` (energy per token, against none) and `energy_saving_vs_oracle_saving`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from agent.core.app_metrics import (
    THROUGHPUT_KIND_LABEL,
    THROUGHPUT_UNIT_LABEL,
    VLLM_TPOT_BUCKETS_S,
    VLLM_TTFT_BUCKETS_S,
)
from agent.core.efficiency import tokens_per_joule
from agent.core.intents import LockClocks, ResetClocks
from agent.core.snapshot import Metric
from agent.orient.orienter import Orienter
from agent.sim.exporter import dcgm_snapshot, served_fields
from agent.sim.inference import service_state
from agent.sim.kpis import service_gpus
from agent.sim.phases import PhaseSpec
from agent.sim.twin import Twin, TwinSpec
from policies.base import PolicyMemory
from policies.inference_slo import InferenceSlo, InferenceSloSettings

INTERVAL_S = 15.0
WINDOW_S = 30.0  # the rate window: two scrapes at 15 s (docs/throughput.md: at least two)
# The SLOs: p90 TTFT at one of vLLM's bucket bounds (a quantile read from buckets is exact
# there, interpolated inside one), and a p90 TPOT.
TTFT_SLO_S = 0.25
TPOT_SLO_S = 0.04
PEAK_LOAD = 0.4  # the services' daily peak, a share of their capacity (bursts on top)
LOCK_GRID = np.round(np.arange(0.4, 1.0001, 0.025), 4)
CONTROLLERS = ("ooda", "oracle", "caps_only", "none")


def spec(seed: int) -> TwinSpec:
    """Four nodes of two GPUs, every node an inference service, from late morning (the load
    rising to its afternoon peak, with bursts)."""
    return TwinSpec(
        nodes=4,
        gpus_per_node=2,
        seed=seed,
        phases=PhaseSpec(inference_share=1.0, day_start_h=11.0, inference_peak_load=PEAK_LOAD),
    )


def histogram_quantile(q: float, buckets: tuple[float, ...], counts: np.ndarray) -> np.ndarray:
    """Prometheus's histogram_quantile per row of cumulative bucket counts (+Inf is the total,
    the last column): linear within the bucket; NaN for a row with no observations."""
    total = counts[:, -1]
    rank = q * total
    bounds = np.array((0.0, *buckets))
    out = np.full(counts.shape[0], np.nan)
    for i in range(counts.shape[0]):  # a few services
        if total[i] <= 0:
            continue
        k = int(np.searchsorted(counts[i], rank[i]))
        if k >= len(buckets):
            out[i] = buckets[-1]  # in the +Inf bucket: Prometheus returns the last bound
            continue
        lo_count = counts[i, k - 1] if k > 0 else 0.0
        width = counts[i, k] - lo_count
        frac = (rank[i] - lo_count) / width if width > 0 else 1.0
        out[i] = bounds[k] + (bounds[k + 1] - bounds[k]) * frac
    return out


@dataclass
class Window:
    """The services' cumulative vLLM counts at some time."""

    t_s: float
    tokens: np.ndarray
    ttft: np.ndarray  # services x (buckets + +Inf)
    tpot: np.ndarray

    @staticmethod
    def of(twin: Twin) -> Window:
        m = twin.services
        return Window(
            twin.t_s,
            m.generation_tokens.copy(),
            np.column_stack([m.ttft_buckets, m.requests]),
            np.column_stack([m.tpot_buckets, m.tpot_count]),
        )


def windowed(now: Window, then: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per service: tokens/s, p90 TTFT and p90 TPOT over [then, now], as Prometheus reads them."""
    dt = max(now.t_s - then.t_s, 1e-9)
    return (
        (now.tokens - then.tokens) / dt,
        histogram_quantile(0.9, VLLM_TTFT_BUCKETS_S, now.ttft - then.ttft),
        histogram_quantile(0.9, VLLM_TPOT_BUCKETS_S, now.tpot - then.tpot),
    )


def _service_rows(twin: Twin) -> tuple[np.ndarray, np.ndarray]:
    """Service GPUs, and per GPU the index of its service in the meters."""
    gpus = service_gpus(twin)
    index = np.searchsorted(twin.services.rows, twin.job_row[gpus])
    return gpus, index


class OodaController:
    def __init__(self) -> None:
        self.policy = InferenceSlo(
            InferenceSloSettings(ttft_p90_slo_s=TTFT_SLO_S, tpot_p90_slo_s=TPOT_SLO_S)
        )
        self.memory: PolicyMemory = InferenceSlo.Memory()
        self.orienter = Orienter()
        self.fields = served_fields("all")

    def act(self, twin: Twin, figures: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        snap = dcgm_snapshot(twin, self.fields)
        gpus, index = _service_rows(twin)
        rate, ttft, tpot = (np.full(snap.n_gpus, np.nan) for _ in range(3))
        kind = np.where(snap.job != "", "sm_clock", "").astype("U16")
        unit = np.full(snap.n_gpus, "", dtype="U16")
        per_gpu = np.bincount(index, minlength=twin.services.rows.shape[0])
        rate[gpus] = figures[0][index] / per_gpu[index]
        ttft[gpus], tpot[gpus] = figures[1][index], figures[2][index]
        kind[gpus], unit[gpus] = "vllm", "tokens"
        values = {
            **snap.values,
            Metric.APP_RATE_PER_S: rate,
            Metric.TTFT_P90_S: ttft,
            Metric.TPOT_P90_S: tpot,
        }
        snap = replace(
            snap,
            values=values,
            valid={**snap.valid, **{m: np.isfinite(v) for m, v in values.items()}},
            labels={**snap.labels, THROUGHPUT_KIND_LABEL: kind, THROUGHPUT_UNIT_LABEL: unit},
        )
        situation = self.orienter.orient(snap, None)
        decision = self.policy.decide(situation, self.memory, twin.t_s)
        self.memory = decision.memory
        for intent in decision.intents:
            rows = twin.rows_for(intent.targets.node.tolist(), intent.targets.gpu.tolist())  # type: ignore[attr-defined]
            if isinstance(intent, LockClocks):
                twin.lock_clocks(
                    rows, np.maximum(intent.min_mhz, twin.min_clock_mhz[rows]), intent.max_mhz
                )
            elif isinstance(intent, ResetClocks):
                twin.reset_clocks(rows)


def oracle_setting(twin: Twin, clocks: bool) -> None:
    """Per service GPU, the lock and cap of least draw keeping the p90s under the SLOs at the
    true load now."""
    gpus, _ = _service_rows(twin)
    if gpus.size == 0:
        return
    model = twin.spec.model
    load = twin._activity[gpus]
    locks = LOCK_GRID if clocks else np.array([1.0])
    caps = np.linspace(model.min_cap_w, model.max_cap_w, 21)
    grid_lock, grid_cap = (a.ravel() for a in np.meshgrid(locks, caps))
    best_lock, best_cap = np.ones(gpus.size), np.full(gpus.size, model.max_cap_w)
    for i in range(gpus.size):
        n = grid_lock.size
        state = service_state(
            np.full(n, load[i]),
            grid_lock,
            0.956 * grid_cap,
            model.idle_w,
            model.max_cap_w,
            np.ones(n),
        )
        ok = (state.ttft_p90_s <= TTFT_SLO_S) & (state.tpot_p90_s <= TPOT_SLO_S)
        ok &= state.pace >= 1.0 - 1e-9
        if ok.any():
            power = np.where(ok, state.power_w, np.inf)
            j = int(np.argmin(power))
            best_lock[i], best_cap[i] = grid_lock[j], grid_cap[j]
    twin.set_caps(gpus, best_cap)
    locked = best_lock < 1.0
    if locked.any():
        mhz = best_lock[locked] * twin.max_clock_mhz[gpus[locked]]
        twin.lock_clocks(gpus[locked], twin.min_clock_mhz[gpus[locked]], mhz)
    if (~locked).any():
        twin.reset_clocks(gpus[~locked])


@dataclass
class Outcome:
    tokens: float
    energy_j: float
    attained: int
    samples: int


def run(seed: int, controller: str, duration_s: float) -> Outcome:
    twin = Twin(spec(seed))
    twin.run_until(WINDOW_S)  # a first window of counts
    history = [Window.of(twin)]
    gpus, _ = _service_rows(twin)
    tokens0, energy0 = (
        float(twin.services.generation_tokens.sum()),
        float(twin.energy_j[gpus].sum()),
    )
    ooda = OodaController() if controller == "ooda" else None
    # The oracle knows the load at every step and re-solves at every step.
    control = (
        (lambda tw: oracle_setting(tw, clocks=controller == "oracle"))
        if controller in ("oracle", "caps_only")
        else None
    )
    attained = samples = 0
    while twin.t_s < WINDOW_S + duration_s - 1e-9:
        now = Window.of(twin)
        then = next((w for w in history if now.t_s - w.t_s <= WINDOW_S + 1e-9), history[0])
        figures = windowed(now, then)
        history = [w for w in history if now.t_s - w.t_s < WINDOW_S] + [now]
        if ooda is not None:
            ooda.act(twin, figures)
        end = twin.t_s + INTERVAL_S
        while twin.t_s < end - 1e-9:
            twin.step(control=control)
            last = twin.services.last
            assert last is not None
            # Judged on the truth: each service's p90 latencies now, against its SLOs.
            kept = (last.ttft_p90_s <= TTFT_SLO_S) & (last.tpot_p90_s <= TPOT_SLO_S)
            attained += int(kept.sum())
            samples += int(kept.size)
    gpus, _ = _service_rows(twin)
    return Outcome(
        tokens=float(twin.services.generation_tokens.sum()) - tokens0,
        energy_j=float(twin.energy_j[gpus].sum()) - energy0,
        attained=attained,
        samples=samples,
    )


def evaluate(seed: int, duration_s: float = 2 * 3600.0) -> list[dict[str, Any]]:
    outcomes = {c: run(seed, c, duration_s) for c in CONTROLLERS}
    per_token = {c: o.energy_j / max(o.tokens, 1e-9) for c, o in outcomes.items()}
    saving = {c: 1.0 - per_token[c] / per_token["none"] for c in CONTROLLERS}
    rows = []
    for c, o in outcomes.items():
        rows.append(
            {
                "scenario": "inference",
                "controller": c,
                "tokens_per_joule": round(float(tokens_per_joule(o.tokens, o.energy_j)), 4),
                "slo_attainment": round(o.attained / max(o.samples, 1), 4),
                "energy_saving": round(saving[c], 4),
                "energy_saving_vs_oracle_saving": round(
                    saving[c] / saving["oracle"] if saving["oracle"] > 0 else float("nan"), 4
                ),
                "energy_kwh": round(o.energy_j / 3.6e6, 3),
            }
        )
    return rows

"""The twin's inference services: prefill and decode, SM clocks, tokens, latencies.

An LLM service alternates two phases (continuous batching): prefill, compute-bound, which turns
a request's prompt into its first token, and decode, memory-bound, one token per request per
step. Per service, columnar over services, at its load ℓ (0..1 of its capacity at full clock,
from the normal day's load curve and bursts: agent/sim/phases.py) and the effective SM clock of
each phase (r = f / f_max: the lower of a clock lock and what the power cap allows):

- time: a phase at clock r takes tau(r) = c / r + (1 - c) of its time at full clock, c its
  compute-bound share: c = 0.9 for prefill, 0.06 for decode. Decode is 77-91 % of inference
  time and "largely insensitive to GPU frequency": 2842 -> 180 MHz costs 1-6 % latency
  (Maliakel et al., arXiv:2501.08219, 2025); c = 0.06 gives 5 % at half the clock.
- power: idle + D (m + (1 - m) r^2.4) per phase (dynamic power ~ f V^2, V falling with f; m the
  share that does not scale with the SM clock: memory, 0.4 in decode, 0.15 in prefill). Decode
  draws 137-300 W of a 700 W H200 (Ma et al., "The Illusion of Power Capping in LLM Decode",
  arXiv:2605.11999, 2026): here 0.2-0.43 of the board limit (140-300 W of 700 W) from an empty
  to a full batch (the load), so no cap binds in decode; prefill draws 0.9 of it. Locking the
  clock to ~0.6 of its maximum saves about 30 % of decode's energy at ~3 % slower tokens
  (ibid.: up to 32 %).
- a power cap holds each phase's draw: its clock falls to r_cap, where the phase's draw meets
  cap_draw_frac x cap. Prefill, near the cap's level, is throttled first and hardest: a cap low
  enough to save decode energy slows prefill (TTFT) far more than a clock lock saving the same.
- utilization rho = ℓ (w tau_pre + (1 - w) tau_dec), w = 0.15 the prefill share of work at full
  clock. Tokens delivered: ℓ x capacity, less when rho > 1 (saturated). TTFT median:
  TTFT0 tau_pre (1 + rho / (2 (1 - rho))) (queueing, rho held under 0.98); TPOT median:
  TPOT0 tau_dec (1 + 0.3 ℓ) (a bigger batch steps slower). Requests' latencies are lognormal
  about their medians (sigma 0.5 and 0.25: assumptions), which the exporter turns into vLLM's
  histogram buckets (expected counts, so a run repeats exactly).

Constants for an 8B-class model on one H100-class GPU (assumptions within published serving
figures: ~2,500 output tokens/s per GPU at full batch, 40 ms TTFT and 15 ms TPOT unloaded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent.core.app_metrics import VLLM_TPOT_BUCKETS_S, VLLM_TTFT_BUCKETS_S

FloatArray = npt.NDArray[np.float64]

PREFILL_COMPUTE = 0.9
DECODE_COMPUTE = 0.06
PREFILL_STATIC = 0.15  # share of the phase's dynamic draw that does not scale with the SM clock
DECODE_STATIC = 0.4
CLOCK_POWER_EXP = 2.4
PREFILL_WORK = 0.15  # prefill's share of the work at full clock
PREFILL_DRAW_FRAC = 0.9  # of the board limit, at full clock
DECODE_DRAW_FRAC = (0.2, 0.43)  # of the board limit at full clock, from an empty to a full batch
TOKENS_PER_S_PER_GPU = 2500.0  # output tokens at full load and clock
PROMPT_PER_OUTPUT = 4.0  # prompt tokens per output token
TTFT0_S = 0.04
TPOT0_S = 0.015
TTFT_SIGMA = 0.5
TPOT_SIGMA = 0.25
RHO_MAX = 0.98
MIN_CLOCK_FRAC = 0.1
Z90 = 1.2815515655446004  # the standard normal's 0.9 quantile


def phase_time(r: FloatArray, compute: float) -> FloatArray:
    """A phase's time at clock share r, relative to its time at full clock."""
    return np.asarray(compute / np.maximum(r, MIN_CLOCK_FRAC) + (1.0 - compute))


def phase_draw_w(
    r: FloatArray, idle_w: float | FloatArray, dynamic_w: FloatArray, static: float
) -> FloatArray:
    """A phase's draw at clock share r."""
    scale = static + (1.0 - static) * np.maximum(r, MIN_CLOCK_FRAC) ** CLOCK_POWER_EXP
    return np.asarray(idle_w + dynamic_w * scale)


def clock_under_cap(
    limit_w: FloatArray, idle_w: float | FloatArray, dynamic_w: FloatArray, static: float
) -> FloatArray:
    """The clock share at which a phase's draw meets `limit_w` (1.0 where the limit does not
    bind; the lowest clock where even that draws more)."""
    share = (np.asarray(limit_w) - idle_w) / np.maximum(dynamic_w, 1e-9)
    scalable = np.clip((share - static) / (1.0 - static), 0.0, None)
    return np.clip(scalable ** (1.0 / CLOCK_POWER_EXP), MIN_CLOCK_FRAC, 1.0)


@dataclass(frozen=True, slots=True)
class ServiceState:
    """Per service, this step: clocks, draw, tokens and latencies."""

    r_prefill: FloatArray
    r_decode: FloatArray
    power_w: FloatArray  # per GPU of the service (its GPUs share its load evenly)
    natural_w: FloatArray  # the draw at full clock, no cap
    tokens_per_s: FloatArray  # output tokens, the whole service
    prompt_tokens_per_s: FloatArray
    requests_per_s: FloatArray
    rho: FloatArray
    ttft_median_s: FloatArray
    tpot_median_s: FloatArray
    pace: FloatArray  # tokens delivered / tokens asked for (1.0: keeping up)
    prefill_share: FloatArray  # share of the time spent in prefill

    @property
    def ttft_p90_s(self) -> FloatArray:
        return np.asarray(self.ttft_median_s * math.exp(Z90 * TTFT_SIGMA))

    @property
    def tpot_p90_s(self) -> FloatArray:
        return np.asarray(self.tpot_median_s * math.exp(Z90 * TPOT_SIGMA))


def service_state(
    load: FloatArray,
    lock_frac: FloatArray,
    limit_w: FloatArray,
    idle_w: float,
    board_w: float,
    gpus: FloatArray,
) -> ServiceState:
    """Per service: its load (0..1), its clock lock (share of the maximum clock; 1.0: none),
    the draw its cap allows per GPU (cap_draw_frac x cap), the GPUs' idle draw and board limit,
    and its GPU count."""
    load = np.clip(np.asarray(load, dtype=np.float64), 0.0, 1.0)
    pre_dyn = np.full(load.shape, PREFILL_DRAW_FRAC * board_w - idle_w)
    lo, hi = DECODE_DRAW_FRAC
    dec_dyn = (lo + (hi - lo) * load) * board_w - idle_w
    r_pre = np.minimum(lock_frac, clock_under_cap(limit_w, idle_w, pre_dyn, PREFILL_STATIC))
    r_dec = np.minimum(lock_frac, clock_under_cap(limit_w, idle_w, dec_dyn, DECODE_STATIC))
    t_pre, t_dec = phase_time(r_pre, PREFILL_COMPUTE), phase_time(r_dec, DECODE_COMPUTE)
    rho = load * (PREFILL_WORK * t_pre + (1.0 - PREFILL_WORK) * t_dec)
    pace = np.minimum(1.0, 1.0 / np.maximum(rho, 1e-9))
    # Share of the time in prefill (its work at this clock); decode steps the batch the rest.
    s_pre = np.clip(load * PREFILL_WORK * t_pre * pace, 0.0, 1.0)
    power = s_pre * phase_draw_w(r_pre, idle_w, pre_dyn, PREFILL_STATIC) + (
        1.0 - s_pre
    ) * phase_draw_w(r_dec, idle_w, dec_dyn, DECODE_STATIC)
    power = np.minimum(power, np.maximum(limit_w, idle_w))
    ones = np.ones(load.shape)
    natural = s_pre * phase_draw_w(ones, idle_w, pre_dyn, PREFILL_STATIC) + (
        1.0 - s_pre
    ) * phase_draw_w(ones, idle_w, dec_dyn, DECODE_STATIC)
    tokens = load * pace * TOKENS_PER_S_PER_GPU * gpus
    q = np.minimum(rho, RHO_MAX)
    return ServiceState(
        r_prefill=r_pre,
        r_decode=r_dec,
        power_w=power,
        natural_w=natural,
        tokens_per_s=tokens,
        prompt_tokens_per_s=tokens * PROMPT_PER_OUTPUT,
        requests_per_s=tokens / 256.0,  # 256 output tokens a request (an assumption)
        rho=rho,
        ttft_median_s=TTFT0_S * t_pre * (1.0 + q / (2.0 * (1.0 - q))),
        tpot_median_s=TPOT0_S * t_dec * (1.0 + 0.3 * load),
        pace=pace,
        prefill_share=s_pre,
    )


def _lognormal_cdf(x: FloatArray, median: FloatArray, sigma: float) -> FloatArray:
    """P(X <= x) for lognormal X, per (service, bucket) (x: buckets, median: services)."""
    from scipy.special import ndtr  # noqa: PLC0415  (only a twin with services pays the import)

    z = (np.log(np.asarray(x))[None, :] - np.log(np.asarray(median))[:, None]) / sigma
    return np.asarray(ndtr(z), dtype=np.float64)


class ServiceMeters:
    """Per service (twin job row): vLLM's counters and histograms, cumulative since the start,
    as expected counts (fractional: Prometheus's text format carries floats)."""

    def __init__(self) -> None:
        self.rows = np.zeros(0, dtype=np.int64)
        self.generation_tokens = np.zeros(0)
        self.prompt_tokens = np.zeros(0)
        self.requests = np.zeros(0)
        self.ttft_buckets = np.zeros((0, len(VLLM_TTFT_BUCKETS_S)))
        self.ttft_sum_s = np.zeros(0)
        self.tpot_buckets = np.zeros((0, len(VLLM_TPOT_BUCKETS_S)))
        self.tpot_sum_s = np.zeros(0)
        self.tpot_count = np.zeros(0)
        self.last: ServiceState | None = None

    def ensure(self, rows: npt.NDArray[np.int64]) -> None:
        """Services are added, never removed (they run all day)."""
        if rows.shape == self.rows.shape and np.array_equal(rows, self.rows):
            return
        new = rows.shape[0] - self.rows.shape[0]
        self.rows = rows.copy()
        for name in (
            "generation_tokens",
            "prompt_tokens",
            "requests",
            "ttft_sum_s",
            "tpot_sum_s",
            "tpot_count",
        ):
            setattr(self, name, np.concatenate([getattr(self, name), np.zeros(new)]))
        self.ttft_buckets = np.vstack(
            [self.ttft_buckets, np.zeros((new, len(VLLM_TTFT_BUCKETS_S)))]
        )
        self.tpot_buckets = np.vstack(
            [self.tpot_buckets, np.zeros((new, len(VLLM_TPOT_BUCKETS_S)))]
        )

    def add(self, state: ServiceState, dt: float) -> None:
        """Count dt seconds of the services' work."""
        self.last = state
        if dt <= 0:
            return
        requests = state.requests_per_s * dt
        tokens = state.tokens_per_s * dt
        self.generation_tokens += tokens
        self.prompt_tokens += state.prompt_tokens_per_s * dt
        self.requests += requests
        mean_ttft = state.ttft_median_s * math.exp(TTFT_SIGMA**2 / 2)
        self.ttft_sum_s += requests * mean_ttft
        self.ttft_buckets += requests[:, None] * _lognormal_cdf(
            np.asarray(VLLM_TTFT_BUCKETS_S), state.ttft_median_s, TTFT_SIGMA
        )
        # One TPOT observation per output token after the first (vLLM observes per token).
        steps = np.maximum(tokens - requests, 0.0)
        self.tpot_count += steps
        self.tpot_sum_s += steps * state.tpot_median_s * math.exp(TPOT_SIGMA**2 / 2)
        self.tpot_buckets += steps[:, None] * _lognormal_cdf(
            np.asarray(VLLM_TPOT_BUCKETS_S), state.tpot_median_s, TPOT_SIGMA
        )

"""Tokens per joule: the one definition the demo, replay, `/metrics` and the dashboard share.

Tokens per joule = generated (output) tokens / energy in joules over the same interval, the
energy being that of the GPUs serving the job or service whose tokens they are. Only jobs whose
throughput in use is an application's own token count (agent.core.throughput: vLLM, TGI, Triton,
Dynamo) have one; training steps and the SM-clock proxy are not tokens. Where no job reports
tokens, or their GPUs' draw is not known, it is unknown (NaN / None), never 0.

Over an instant, tokens/s over watts is the same quotient (a watt is a joule a second), so a
snapshot's per-job figure and an interval's totals are one definition."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent.core.app_metrics import TOKENS_UNIT
from agent.core.snapshot import Metric, Snapshot
from agent.core.throughput import throughput_view

FloatArray = npt.NDArray[np.float64]
StrArray = npt.NDArray[np.str_]


def tokens_per_joule(tokens: FloatArray | float, energy_j: FloatArray | float) -> FloatArray:
    """Tokens over the energy that made them (the same interval, the same GPUs); NaN where
    either is unknown or no energy was spent (no quotient to speak of)."""
    tokens_a = np.asarray(tokens, dtype=np.float64)
    energy_a = np.asarray(energy_j, dtype=np.float64)
    known = np.isfinite(tokens_a) & np.isfinite(energy_a) & (energy_a > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(np.where(known, tokens_a / energy_a, np.nan), dtype=np.float64)


def tokens_per_joule_or_none(tokens: float, energy_j: float) -> float | None:
    """The scalar quotient for a report: None where it is unknown."""
    value = float(tokens_per_joule(tokens, energy_j))
    return value if math.isfinite(value) else None


@dataclass(frozen=True, eq=False)
class TokenRates:
    """Per job that reports application tokens (sorted ids): its tokens a second (the sum of its
    GPUs' shares) and the draw of those GPUs (NaN where one of them has no power reading)."""

    job: StrArray
    tokens_per_s: FloatArray
    power_w: FloatArray

    def tokens_per_joule(self) -> FloatArray:
        """Per job (NaN: unknown)."""
        return tokens_per_joule(self.tokens_per_s, self.power_w)

    def known(self) -> npt.NDArray[np.bool_]:
        """Jobs with both tokens and draw known."""
        return np.isfinite(self.tokens_per_joule())

    def total(self) -> tuple[float, float]:
        """Tokens a second and watts of the jobs whose figure is known (0, 0 with none)."""
        known = self.known()
        return float(self.tokens_per_s[known].sum()), float(self.power_w[known].sum())

    def cluster_tokens_per_joule(self) -> float:
        """The cluster's: all known jobs' tokens over their GPUs' energy (NaN with none)."""
        return float(tokens_per_joule(*self.total()))


def token_rows(snapshot: Snapshot) -> tuple[npt.NDArray[np.intp], FloatArray]:
    """The GPUs whose job's throughput in use is the application's token count, and each one's
    share of its job's tokens a second. Columnar; none without application sources."""
    _rate, app_ok = snapshot.column(Metric.APP_RATE_PER_S)
    if not app_ok.any():  # the common case without application sources: nothing to look at
        return np.zeros(0, dtype=np.intp), np.zeros(0)
    view = throughput_view(snapshot, None)
    rows = np.flatnonzero(view.application() & (view.unit == TOKENS_UNIT))
    return rows, view.rate_per_s[rows]


def token_rates(snapshot: Snapshot) -> TokenRates:
    """Per job, from one snapshot: the application's token rate where that is the throughput in
    use, and the draw of the GPUs it was joined to. Columnar: one unique over those GPUs."""
    rows, tokens_per_s = token_rows(snapshot)
    jobs, inverse = np.unique(snapshot.job[rows], return_inverse=True)
    power, power_ok = snapshot.column(Metric.POWER_W)
    watts = np.where(power_ok[rows], power[rows], np.nan)
    return TokenRates(
        job=np.asarray(jobs, dtype=np.str_),
        tokens_per_s=_sums(inverse, tokens_per_s, jobs.size),
        power_w=_sums(inverse, watts, jobs.size),
    )


def _sums(group: npt.NDArray[np.intp], values: FloatArray, groups: int) -> FloatArray:
    """Per group, the sum of its values (NaN where one of them is)."""
    return np.asarray(np.bincount(group, weights=values, minlength=groups), dtype=np.float64)

"""Per GPU, the throughput the agent goes by: its job's own (tokens or steps per second, from
the application's metrics, agent.observe.app_throughput), or, where the job exports none, the
SM-clock proxy (the SM clock relative to the job's uncapped clock: 1.0 runs at full pace).
Which one is in use is said per GPU (`kind`), so a person and the audit log can tell."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent.core.app_metrics import THROUGHPUT_KIND_LABEL, THROUGHPUT_UNIT_LABEL, ThroughputKind
from agent.core.snapshot import Metric, Snapshot

FloatArray = npt.NDArray[np.float64]
StrArray = npt.NDArray[np.str_]

PROXY_UNIT = "relative"  # the SM-clock proxy: a share of the job's uncapped pace


@dataclass(frozen=True, eq=False)
class ThroughputView:
    """Per GPU (Snapshot rows): which throughput is in use for its job ("" with no job), its
    unit, the GPU's share of it now (NaN: not known), and its job's p90 latencies (NaN: the
    application reports none)."""

    kind: StrArray
    unit: StrArray
    rate_per_s: FloatArray  # app: units per second; proxy: relative pace (no "per second")
    ttft_p90_s: FloatArray
    tpot_p90_s: FloatArray

    def application(self) -> npt.NDArray[np.bool_]:
        """GPUs whose job's own throughput is in use."""
        return np.asarray((self.kind != "") & (self.kind != ThroughputKind.SM_CLOCK), dtype=bool)

    def by_job(self, job: StrArray) -> dict[str, str]:
        """Job -> the throughput in use for it (jobs with a GPU in the view)."""
        jobs, first = np.unique(job, return_index=True)
        return {str(j): str(self.kind[i]) for j, i in zip(jobs, first, strict=True) if j}


def throughput_view(snapshot: Snapshot, natural_clock_mhz: FloatArray | None) -> ThroughputView:
    """The view of a snapshot: the application's figures where its join put them, the SM-clock
    proxy (clock / the job's uncapped clock, where that is known) for every other GPU with a
    job."""
    n = snapshot.n_gpus
    has_job = snapshot.job != ""
    kind = snapshot.labels.get(THROUGHPUT_KIND_LABEL)
    if kind is None or kind.shape != (n,):
        kind = np.where(has_job, str(ThroughputKind.SM_CLOCK), "").astype(np.str_)
    unit = snapshot.labels.get(THROUGHPUT_UNIT_LABEL)
    if unit is None or unit.shape != (n,):
        unit = np.full(n, "", dtype=np.str_)
    app_rate, app_ok = snapshot.column(Metric.APP_RATE_PER_S)
    app = app_ok & (kind != ThroughputKind.SM_CLOCK) & (kind != "")
    # A job with an application source whose rate is missing this cycle falls back to the proxy.
    kind = np.where(has_job & ~app, str(ThroughputKind.SM_CLOCK), kind).astype(np.str_)
    clock, clock_ok = snapshot.column(Metric.SM_CLOCK_MHZ)
    natural = np.full(n, np.nan) if natural_clock_mhz is None else natural_clock_mhz
    with np.errstate(invalid="ignore", divide="ignore"):
        proxy = np.where(clock_ok & (natural > 0), np.minimum(clock / natural, 1.0), np.nan)
    rate = np.where(app, app_rate, np.where(has_job, proxy, np.nan))
    ttft, _ = snapshot.column(Metric.TTFT_P90_S)
    tpot, _ = snapshot.column(Metric.TPOT_P90_S)
    return ThroughputView(
        kind=kind,
        unit=np.where(app, unit, np.where(has_job, PROXY_UNIT, "")).astype(np.str_),
        rate_per_s=rate,
        ttft_p90_s=np.where(app, ttft, np.nan),
        tpot_p90_s=np.where(app, tpot, np.nan),
    )

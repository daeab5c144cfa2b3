"""Application throughput joined to the fleet: a TelemetrySource decorator.

Inference servers and training jobs export their own throughput and latency to Prometheus
(agent.core.app_metrics has each server's metric names). Per configured source, three instant
queries at the cycle's time, aggregated by the label that names the job (never one per GPU):

- rate: `sum by (JOB) (rate(RATE{MATCH}[WINDOW]))`, tokens (or steps) per second;
- p90 TTFT and TPOT: `histogram_quantile(Q, sum by (JOB, le) (rate(HIST_bucket{MATCH}[WINDOW])))`
  times the histogram's unit in seconds, where the server has the histogram.

Each job's figures are joined to the GPUs that run it (the snapshot's `job`, after the
scheduler's join): every GPU carries its share of its job's rate (`app_rate_per_s`), its job's
latencies, and, as labels, which throughput is in use (`throughput_source`: the server's kind, or
`sm_clock` where no application figure is read: the proxy) and its unit. The first configured
source that has a job wins. A job with no series, a server that stopped (rate() needs two samples
in the window) or a window without requests is missing (NaN), never 0. A failed query leaves its
figures missing and says why in the snapshot's errors; the GPUs' telemetry is passed on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, Field, field_validator

from agent.core.app_metrics import (
    APPLICATION_KINDS,
    SERVERS,
    THROUGHPUT_KIND_LABEL,
    THROUGHPUT_UNIT_LABEL,
    ThroughputKind,
)
from agent.core.dcgm import LABEL_JOB
from agent.core.errors import OodaError
from agent.core.protocols import TelemetrySource
from agent.core.settings import STRICT_SECTION
from agent.core.snapshot import Metric, Snapshot
from agent.core.urls import check_http_url
from agent.observe import promql

FloatArray = npt.NDArray[np.float64]
StrArray = npt.NDArray[np.str_]


class InstantQuery(Protocol):
    """One PromQL instant query (agent.observe.prometheus.PrometheusSource is one)."""

    def query(self, expr: str, now_s: float) -> list[dict[str, Any]]: ...


# -- settings (the config's [throughput] section) ------------------------------------------------


class AppSourceConfig(BaseModel):
    """One application's metrics: `[[throughput.sources]]`."""

    model_config = STRICT_SECTION

    server: ThroughputKind = Field(
        description="vllm, tgi, triton, dynamo or training: which metric names apply "
        "(docs/throughput.md lists them)."
    )
    job_label: str = Field(
        LABEL_JOB,
        description="The series label naming the scheduler's job (added to the scrape target).",
    )
    match: dict[str, str] = Field(
        default_factory=dict, description='Exact label matchers, e.g. {namespace = "llm"}.'
    )
    window_s: float = Field(
        60.0, ge=1.0, le=3600.0, description="The rate window (s): at least 2 scrapes."
    )
    rate_metric: str | None = Field(
        None, description="The throughput counter, if not the server's (e.g. renamed)."
    )
    ttft_metric: str | None = Field(
        None, description="The TTFT histogram's base name, if not the server's ('' for none)."
    )
    tpot_metric: str | None = Field(
        None, description="The TPOT histogram's base name, if not the server's ('' for none)."
    )

    @field_validator("server", mode="before")
    @classmethod
    def _server(cls, value: Any) -> Any:
        if value == ThroughputKind.SM_CLOCK or value not in {str(k) for k in APPLICATION_KINDS}:
            known = ", ".join(str(k) for k in APPLICATION_KINDS)
            raise ValueError(f"unknown server {value!r} (known: {known})")
        return ThroughputKind(value)

    @field_validator("job_label")
    @classmethod
    def _label(cls, value: str) -> str:
        return promql.check_label_name(value)

    @field_validator("match")
    @classmethod
    def _matchers(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            promql.check_label_name(name)
        return value

    @field_validator("rate_metric", "ttft_metric", "tpot_metric")
    @classmethod
    def _metric(cls, value: str | None) -> str | None:
        if value:
            promql.check_metric_name(value)
        return value

    def spec(self) -> AppQuerySpec:
        server = SERVERS[self.server]
        return AppQuerySpec(
            kind=self.server,
            unit=server.unit,
            rate=self.rate_metric or server.rate,
            ttft=server.ttft if self.ttft_metric is None else self.ttft_metric,
            tpot=server.tpot if self.tpot_metric is None else self.tpot_metric,
            latency_to_s=server.latency_to_s,
            job_label=self.job_label,
            match=dict(self.match),
            window_s=self.window_s,
        )


class ThroughputSettings(BaseModel):
    """The `[throughput]` section: where each job's own throughput comes from."""

    model_config = STRICT_SECTION

    sources: list[AppSourceConfig] = Field(
        default_factory=list,
        description="Application metrics to read, in order (the first that has a job wins); "
        "none: every job's throughput is the SM-clock proxy.",
    )
    prometheus_url: str | None = Field(
        None,
        description="The Prometheus that scrapes them (default: [source.prometheus] url).",
    )
    timeout_s: float = Field(10.0, gt=0, le=120, description="Per-query timeout (s).")
    quantile: float = Field(
        0.9, gt=0, lt=1, description="The latency quantile read (the SLOs are written on it)."
    )

    @field_validator("prometheus_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None:
            check_http_url(value, "must be a URL")
        return value


# -- queries and the join ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AppQuerySpec:
    """One source's queries, resolved (metric names, the job label, matchers)."""

    kind: ThroughputKind
    unit: str
    rate: str
    ttft: str
    tpot: str
    latency_to_s: float
    job_label: str
    match: Mapping[str, str] = field(default_factory=dict)
    window_s: float = 60.0

    def rate_query(self) -> str:
        sel = promql.selector(self.rate, self.match)
        window = promql.duration(self.window_s)
        return f"sum {promql.by([self.job_label])} (rate({sel}[{window}]))"

    def quantile_query(self, histogram: str, quantile: float) -> str:
        sel = promql.selector(histogram + "_bucket", self.match)
        window = promql.duration(self.window_s)
        by = promql.by([self.job_label, "le"])
        return f"histogram_quantile({quantile:g}, sum {by} (rate({sel}[{window}])))"


@dataclass(frozen=True, slots=True)
class JobFigures:
    """Per job (sorted ids), what one source says: rate, p90 TTFT and TPOT (NaN: not read)."""

    jobs: StrArray
    rate_per_s: FloatArray
    ttft_s: FloatArray
    tpot_s: FloatArray


def _by_job(answer: list[dict[str, Any]], label: str) -> dict[str, float]:
    """Job -> finite value of an aggregated answer (series without the label are dropped)."""
    out: dict[str, float] = {}
    for series in answer:
        job = str(series.get("metric", {}).get(label, ""))
        try:
            value = float(series["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        if job and np.isfinite(value):
            out[job] = value
    return out


class AppThroughputSource:
    """The inner source's snapshot with each job's application figures joined to its GPUs."""

    def __init__(
        self,
        source: TelemetrySource,
        query: InstantQuery,
        specs: Sequence[AppQuerySpec],
        quantile: float = 0.9,
    ) -> None:
        self.source = source
        self.query = query
        self.specs = tuple(specs)
        self.quantile = quantile

    def observe(self, now_s: float) -> Snapshot:
        snapshot = self.source.observe(now_s)
        if snapshot.n_gpus == 0:
            return snapshot
        errors: list[str] = []
        figures = [self._read(spec, now_s, errors) for spec in self.specs]
        return join_figures(snapshot, self.specs, figures, errors)

    def _read(self, spec: AppQuerySpec, now_s: float, errors: list[str]) -> JobFigures:
        def ask(expr: str, scale: float) -> dict[str, float]:
            try:
                answer = self.query.query(expr, now_s)
            except OodaError as exc:
                errors.append(f"throughput ({spec.kind}): {exc}")
                return {}
            return {job: value * scale for job, value in _by_job(answer, spec.job_label).items()}

        def latency(histogram: str) -> dict[str, float]:  # "": the server has none
            if not histogram:
                return {}
            return ask(spec.quantile_query(histogram, self.quantile), spec.latency_to_s)

        rate, ttft, tpot = ask(spec.rate_query(), 1.0), latency(spec.ttft), latency(spec.tpot)
        jobs = np.array(sorted(set(rate) | set(ttft) | set(tpot)), dtype=np.str_)
        return JobFigures(
            jobs=jobs,
            rate_per_s=np.array([rate.get(j, np.nan) for j in jobs.tolist()], dtype=np.float64),
            ttft_s=np.array([ttft.get(j, np.nan) for j in jobs.tolist()], dtype=np.float64),
            tpot_s=np.array([tpot.get(j, np.nan) for j in jobs.tolist()], dtype=np.float64),
        )


def _lookup(keys: StrArray, table: StrArray, values: FloatArray) -> FloatArray:
    """Per key, its value in the sorted `table` (NaN where absent): columnar, O(k log t)."""
    if table.size == 0:
        return np.full(keys.shape, np.nan)
    at = np.clip(np.searchsorted(table, keys), 0, table.size - 1)
    return np.where(table[at] == keys, values[at], np.nan)


def join_figures(
    snapshot: Snapshot,
    specs: Sequence[AppQuerySpec],
    figures: Sequence[JobFigures],
    errors: Sequence[str] = (),
) -> Snapshot:
    """The snapshot with each GPU's share of its job's rate, its job's latencies and which
    throughput is in use (the first source with a rate for the job; `sm_clock` otherwise)."""
    n = snapshot.n_gpus
    jobs, inverse, per_job = np.unique(snapshot.job, return_inverse=True, return_counts=True)
    rate = np.full(jobs.shape, np.nan)
    ttft = np.full(jobs.shape, np.nan)
    tpot = np.full(jobs.shape, np.nan)
    kind = np.full(jobs.shape, str(ThroughputKind.SM_CLOCK), dtype=np.dtype("U16"))
    unit = np.full(jobs.shape, "", dtype=np.dtype("U16"))
    for spec, fig in zip(specs, figures, strict=True):
        read = _lookup(jobs, fig.jobs, fig.rate_per_s)
        found = np.isnan(rate) & np.isfinite(read)
        rate = np.where(found, read, rate)
        ttft = np.where(found, _lookup(jobs, fig.jobs, fig.ttft_s), ttft)
        tpot = np.where(found, _lookup(jobs, fig.jobs, fig.tpot_s), tpot)
        kind[found] = str(spec.kind)
        unit[found] = spec.unit
    no_job = jobs == ""
    kind[no_job], unit[no_job] = "", ""
    rate[no_job] = ttft[no_job] = tpot[no_job] = np.nan
    # The job's rate is shared by its GPUs (of this snapshot: all a job's GPUs are its rows).
    share = rate / per_job
    fresh = snapshot.fresh
    values = {
        Metric.APP_RATE_PER_S: np.where(fresh, share[inverse], np.nan),
        Metric.TTFT_P90_S: np.where(fresh, ttft[inverse], np.nan),
        Metric.TPOT_P90_S: np.where(fresh, tpot[inverse], np.nan),
    }
    labels = {
        THROUGHPUT_KIND_LABEL: np.asarray(kind[inverse], dtype=np.str_),
        THROUGHPUT_UNIT_LABEL: np.asarray(unit[inverse], dtype=np.str_),
    }
    assert all(v.shape == (n,) for v in values.values())
    return replace(
        snapshot,
        values={**snapshot.values, **values},
        valid={**snapshot.valid, **{m: np.isfinite(v) for m, v in values.items()}},
        labels={**snapshot.labels, **labels},
        errors=(*snapshot.errors, *errors),
    )

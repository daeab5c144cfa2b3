"""Prometheus (dcgm-exporter's series) as a source kind: `[source] kind = "prometheus"`, its
section `[source.prometheus]`. The loop reads only the fields its policies and orient read
(agent.core.reads), each as often as they need it; a recording reads every field."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator

from agent.adapters.table import BuildContext, SourceKind
from agent.core.dcgm import (
    DCGM_FIELDS,
    LABEL_GPU,
    LABEL_HOST,
    LABEL_HOST_NEW,
    LABEL_JOB,
    LABEL_MODEL,
    LABEL_UUID,
)
from agent.core.reads import Reads
from agent.core.settings import STRICT_SECTION
from agent.core.snapshot import Metric
from agent.core.urls import check_http_url
from agent.observe.prometheus import PrometheusSettings, PrometheusSource
from agent.observe.promql import check_label_name, check_metric_name


class _Section(BaseModel):
    model_config = STRICT_SECTION


def _dcgm_metric_names() -> dict[Metric, str]:
    return {f.metric: f.name for f in DCGM_FIELDS}


class PrometheusConfig(_Section):
    url: str = Field("http://127.0.0.1:9090", description="Prometheus base URL.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        check_http_url(value, "must be a URL")
        return value

    timeout_s: float = Field(10.0, gt=0, description="Per-query timeout (s).")
    retries: int = Field(2, ge=0, le=10, description="Retries per query on connection errors.")
    scrape_interval_s: float = Field(15.0, gt=0, description="The exporters' scrape interval (s).")
    staleness_s: float | None = Field(
        None,
        gt=0,
        description="A GPU whose newest sample is older is stale (s; default 3 scrapes).",
    )
    inventory_window_s: float = Field(
        600.0, gt=0, description="GPUs seen within this window are known (s)."
    )
    static_refresh_s: float = Field(
        300.0,
        ge=0,
        description="The inventory, the cap range and the health counters are read in full "
        "this often (s); in between the inventory is remembered and only non-zero health "
        "counters are read.",
    )
    parallel_queries: int = Field(
        2, ge=1, le=16, description="Queries in flight at once (Prometheus runs each on one core)."
    )
    metrics: dict[Annotated[Metric, Field(strict=False)], str] = Field(  # names -> Metric
        default_factory=_dcgm_metric_names,
        description="Field -> Prometheus metric name, for relabelled setups (dcgm-exporter's "
        "names and units by default; '' leaves a field out). Only the names given change. "
        "The loop reads only the fields its policies and orient read (not energy_j, for one); "
        "recording and replay read every field.",
    )
    host_labels: list[str] = Field(
        default_factory=lambda: [LABEL_HOST, LABEL_HOST_NEW],
        min_length=1,
        description="Labels naming a GPU's node, the first non-empty one wins.",
    )
    gpu_label: str = Field(LABEL_GPU, description="Label with the GPU's index on its node.")
    uuid_label: str = Field(LABEL_UUID, description="Label with the GPU's UUID.")
    model_label: str = Field(LABEL_MODEL, description="Label with the GPU's model name.")
    job_label: str = Field(LABEL_JOB, description="Label with the Slurm job on the GPU.")
    match: dict[str, str] = Field(
        default_factory=dict,
        description='Exact label matchers added to every selector, e.g. {cluster = "lab"}.',
    )

    @field_validator("metrics", mode="before")
    @classmethod
    def _merge_metric_names(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {**{str(k): v for k, v in _dcgm_metric_names().items()}, **value}
        return value

    @field_validator("metrics")
    @classmethod
    def _metric_names(cls, value: dict[Metric, str]) -> dict[Metric, str]:
        if not value.get(Metric.POWER_W):
            raise ValueError("power_w needs a metric name: it is the inventory's heartbeat")
        for name in value.values():
            if name:
                check_metric_name(name)
        return value

    @field_validator("host_labels", "match")
    @classmethod
    def _label_names(cls, value: list[str] | dict[str, str]) -> list[str] | dict[str, str]:
        for name in value:
            check_label_name(name)
        return value

    @field_validator("gpu_label", "uuid_label", "model_label", "job_label")
    @classmethod
    def _label_name(cls, value: str) -> str:
        return check_label_name(value)


def prometheus_settings(
    section: PrometheusConfig,
    *,
    budget_query: str | None = None,
    group_label: str | None = None,
    leave_out: Collection[Metric] = (),
    fallbacks: Mapping[Metric, Metric] | None = None,
    slow_fields: Mapping[Metric, float] | None = None,
) -> PrometheusSettings:
    """The Prometheus source a section describes, less the fields in `leave_out`, with
    `fallbacks` read only where needed and `slow_fields` only every so often."""
    p = section
    return PrometheusSettings(
        url=p.url,
        timeout_s=p.timeout_s,
        retries=p.retries,
        scrape_interval_s=p.scrape_interval_s,
        staleness_s=p.staleness_s,
        inventory_window_s=p.inventory_window_s,
        static_refresh_s=p.static_refresh_s,
        parallel_queries=p.parallel_queries,
        metrics={m: ("" if m in leave_out else name) for m, name in p.metrics.items()},
        host_labels=tuple(p.host_labels),
        gpu_label=p.gpu_label,
        uuid_label=p.uuid_label,
        model_label=p.model_label,
        job_label=p.job_label,
        match=dict(p.match),
        budget_query=budget_query,
        # The per-group budgets' label, read with each GPU's identity.
        extra_labels=(group_label,) if group_label else (),
        fallbacks=dict(fallbacks or {}),
        slow_fields=dict(slow_fields or {}),
    )


def read_plan(
    reads: Reads | None,
) -> tuple[frozenset[Metric], dict[Metric, Metric], dict[Metric, float]]:
    """What the loop's readers ask of the source: the fields left out (read by none), those
    read only in place of another, and those read only every so often (None: every field every
    cycle, as a recording)."""
    if reads is None:
        return frozenset(), {}, {}
    read = reads.metrics()
    unread = frozenset(m for m in Metric if m not in read and m is not Metric.POWER_W)
    return unread, dict(reads.stand_ins), reads.slow()


def _build(section: PrometheusConfig, ctx: BuildContext) -> PrometheusSource:
    leave_out, fallbacks, slow = read_plan(ctx.reads)
    source = PrometheusSource(
        prometheus_settings(
            section,
            budget_query=ctx.budget_query,
            group_label=ctx.group_label,
            leave_out=leave_out,
            fallbacks=fallbacks,
            slow_fields=slow,
        )
    )
    ctx.closers.append(source.close)
    return source


def _where(section: Any, _nodes: Sequence[str]) -> str:
    return str(section.url)


PROMETHEUS_SOURCE = SourceKind(
    name="prometheus",
    description="dcgm-exporter's series from Prometheus ([source.prometheus]).",
    build=_build,
    Settings=PrometheusConfig,
    labels=None,  # relabelled series carry a rack's or row's name
    called="a Prometheus",
    fills_limits=True,  # dcgm-exporter exports no power limits by default
    describe=_where,
)

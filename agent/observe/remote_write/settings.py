"""The `[source.remote_write]` section: where the receiver listens, how it is secured, its bounds,
and how series name GPUs (the same names and labels as the Prometheus source's)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator, model_validator

from agent.core.dcgm import (
    DCGM_FIELDS,
    LABEL_GPU,
    LABEL_HOST,
    LABEL_HOST_NEW,
    LABEL_JOB,
    LABEL_MODEL,
    LABEL_UUID,
)
from agent.core.settings import STRICT_SECTION, file_field
from agent.core.snapshot import Metric
from agent.core.urls import is_loopback
from agent.observe.promql import check_label_name, check_metric_name

WRITE_PATH = "/api/v1/write"  # where Prometheus's own receiver takes remote write
MIB = 1 << 20


def _dcgm_metric_names() -> dict[Metric, str]:
    return {f.metric: f.name for f in DCGM_FIELDS}


def parse_listen(text: str) -> tuple[str, int]:
    """`127.0.0.1:9201`, `[::1]:9201`, `0.0.0.0:9201` -> (host, port); ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdecimal() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected ADDR:PORT, e.g. 127.0.0.1:9201 (got {text!r})")
    return host.removeprefix("[").removesuffix("]"), int(port)


class RemoteWriteConfig(BaseModel):
    """Prometheus remote write (1.0) received by the agent: every sample as it is scraped, the
    newest of each series kept in memory. Point a Prometheus's (or vmagent's, or an
    OpenTelemetry collector's) `remote_write` url at http(s)://LISTEN/api/v1/write."""

    model_config = STRICT_SECTION

    listen: str = Field(
        "127.0.0.1:9201",
        description="ADDR:PORT the receiver listens on (loopback by default; any other address "
        "needs tls_cert, tls_key and token_file).",
    )
    tls_cert: Path | None = Field(
        None,
        strict=False,
        description="TLS certificate (PEM).",
        json_schema_extra=file_field("file"),
    )
    tls_key: Path | None = Field(
        None,
        strict=False,
        description="TLS private key (PEM).",
        json_schema_extra=file_field("secret"),
    )
    token_file: Path | None = Field(
        None,
        strict=False,
        json_schema_extra=file_field("secret"),
        description="Bearer tokens the senders must present, one a line (re-read when the file "
        "changes); none: no token asked (loopback only).",
    )
    max_body_bytes: int = Field(
        16 * MIB,
        ge=1024,
        description="Largest request body accepted (bytes, compressed); larger: HTTP 413.",
    )
    max_decoded_bytes: int = Field(
        128 * MIB,
        ge=1024,
        description="Largest body once uncompressed (bytes, checked before uncompressing); "
        "larger: HTTP 413.",
    )
    max_series: int = Field(
        2_500_000,
        ge=1,
        description="Series kept at most (each about 150 bytes); a request's new series past it "
        "are refused (HTTP 400, the known ones are kept). Series not sampled within the "
        "inventory window are forgotten.",
    )
    scrape_interval_s: float = Field(15.0, gt=0, description="The exporters' scrape interval (s).")
    staleness_s: float | None = Field(
        None,
        gt=0,
        description="A GPU whose newest sample is older is stale (s; default 3 scrapes).",
    )
    lookback_s: float = Field(
        300.0,
        gt=0,
        description="A series whose newest sample is older is gone, as in PromQL (s; the "
        "sender's --query.lookback-delta, 5 minutes by default).",
    )
    inventory_window_s: float = Field(
        600.0, gt=0, description="GPUs sampled within this window are known (s)."
    )
    startup_wait_s: float | None = Field(
        None,
        ge=0,
        description="The first cycle waits this long at most for the first samples (s; "
        "default one scrape interval and 5 s).",
    )
    metrics: dict[Annotated[Metric, Field(strict=False)], str] = Field(  # names -> Metric
        default_factory=_dcgm_metric_names,
        description="Field -> metric name, for relabelled setups (dcgm-exporter's names and "
        "units by default; '' leaves a field out). Only the names given change.",
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
        description='Only series with these exact labels are read, e.g. {cluster = "lab"}.',
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

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

    @model_validator(mode="after")
    def _secured_off_loopback(self) -> RemoteWriteConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        host, _port = parse_listen(self.listen)
        if not is_loopback(host):
            missing = [
                name
                for name in ("tls_cert", "tls_key", "token_file")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(
                    f"listen {self.listen}: a non-loopback address needs "
                    f"{', '.join(missing)} (samples and tokens would cross the network in "
                    "clear, from anyone)"
                )
        return self

    @property
    def staleness_limit_s(self) -> float:
        return self.staleness_s if self.staleness_s is not None else 3.0 * self.scrape_interval_s

    @property
    def first_wait_s(self) -> float:
        if self.startup_wait_s is not None:
            return self.startup_wait_s
        return self.scrape_interval_s + 5.0

"""Settings: the site coordinator's file (site.toml) and an agent's `[site]` section.

Every error names its key path and the problem, as the agent's own config does.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.core.errors import ConfigError
from agent.core.settings import STRICT_SECTION, STRICT_SETTINGS, error_lines
from agent.core.toml_file import read_toml
from agent.site.store import EtcdEndpoint, EtcdStore
from agent.site.tree import LimitTree, TreeError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_PREFIX = re.compile(r"(/[A-Za-z0-9._-]+)+")
_HTTP_URL = re.compile(r"https?://[^\s/]+(/\S*)?")
DEFAULT_SIMPLE_LEVELS = (1.0, 0.9, 0.75, 0.5)  # OpenADR SIMPLE level 0 (normal) .. 3 (most shed)


def _plain_name(value: str, what: str = "name") -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(
            f"{what}: letters, digits, '.', '_', '-', starting with a letter or digit, at most 63"
        )
    return value


def _listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdecimal() or int(port) > 65535:
        raise ValueError("expected ADDR:PORT such as 127.0.0.1:9470")
    return value


def _http_url(value: str) -> str:
    if not _HTTP_URL.fullmatch(value):
        raise ValueError("an http(s) URL")
    return value


HttpUrlText = Annotated[str, AfterValidator(_http_url)]


def split_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class EtcdSettings(BaseModel):
    model_config = STRICT_SETTINGS

    endpoints: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:2379"],
        min_length=1,
        description="etcd client URLs (each member's; the first that answers is used).",
    )
    prefix: str = Field("/ooda", description="Key prefix for every site's keys.")
    timeout_s: float = Field(2.0, gt=0, le=30, description="Per-request timeout (s).")
    ca_file: Path | None = Field(None, strict=False, description="CA bundle for https endpoints.")
    cert_file: Path | None = Field(None, strict=False, description="Client certificate (TLS).")
    key_file: Path | None = Field(None, strict=False, description="Client key (TLS).")

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        for url in value:
            EtcdEndpoint.parse(url)
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not _PREFIX.fullmatch(value):
            raise ValueError("a key path such as /ooda (no trailing '/')")
        return value


def default_replica() -> str:
    """A replica's name when its settings give none: the host's short name and the process id."""
    return f"{socket.gethostname().split('.')[0]}-{os.getpid()}"


def site_prefix(etcd: EtcdSettings, site: str) -> str:
    return f"{etcd.prefix}/sites/{site}"


def open_store(etcd: EtcdSettings) -> EtcdStore:
    """The etcd client these settings describe (TLS when its files are given)."""

    def text(path: Path | None) -> str | None:
        return None if path is None else str(path)

    return EtcdStore(
        list(etcd.endpoints),
        etcd.timeout_s,
        ca_file=text(etcd.ca_file),
        cert_file=text(etcd.cert_file),
        key_file=text(etcd.key_file),
    )


class SiteLinkSettings(BaseModel):
    """An agent's `[site]` section: the site it belongs to, its safe share, its replicas."""

    model_config = STRICT_SETTINGS

    name: str = Field(..., description="The site's name (the coordinator's [site].name).")
    safe_share_w: float = Field(
        ...,
        gt=0,
        description="The budget (W) this cluster falls back to when its grant lapses (and plans "
        "under before its first grant); the coordinator's clusters.NAME.safe_share_w.",
    )
    etcd: EtcdSettings = Field(default_factory=EtcdSettings)
    replica: str | None = Field(
        None, description="This replica's name (default: the host name and process id)."
    )
    leader_ttl_s: int | None = Field(
        None,
        ge=2,
        le=3600,
        description="The leader's lease (s, default: the cycle interval, at least 2): a standby "
        "takes over within this plus one interval.",
    )
    peer_listen: str | None = Field(
        None,
        description="ADDR:PORT where the other replicas ask this one for its word during an "
        "etcd outage (failsafe mode); with several replicas, each needs one.",
    )
    peer_url: str | None = Field(
        None, description="How the other replicas reach peer_listen (default http://ADDR:PORT)."
    )
    peer_token_file: Path | None = Field(
        None, strict=False, description="Bearer tokens for the failsafe endpoint (one a line)."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _plain_name(value)

    @field_validator("replica")
    @classmethod
    def _replica(cls, value: str | None) -> str | None:
        return None if value is None else _plain_name(value, "replica")

    @field_validator("peer_listen")
    @classmethod
    def _peer_listen(cls, value: str | None) -> str | None:
        return None if value is None else _listen(value)

    @model_validator(mode="after")
    def _peer_token(self) -> SiteLinkSettings:
        if self.peer_listen is not None and self.peer_token_file is None:
            raise ValueError("peer_listen: needs peer_token_file (the endpoint is authenticated)")
        return self


class SiteSection(BaseModel):
    model_config = STRICT_SETTINGS

    name: str = Field(..., description="The site's name (its agents' [site].name).")
    limit_w: float = Field(..., gt=0, description="The site's limit (W): the utility feed's.")
    interval_s: float = Field(15.0, gt=0, le=3600, description="Seconds between rounds.")
    grant_lease_s: float | None = Field(
        None,
        gt=0,
        description="How long a grant holds without renewal (s; default 4 rounds).",
    )
    clock_skew_s: float = Field(
        2.0, ge=0, le=600, description="The most the hosts' clocks may differ (s)."
    )
    lead_s: float | None = Field(
        None,
        ge=0,
        description="Grants follow the limit this far ahead (s; default two rounds): a ramp "
        "down is in the grants before it is in the limit.",
    )
    leader_ttl_s: int | None = Field(
        None,
        ge=2,
        le=3600,
        description="The coordinator's leader lease (s; default two rounds): a standby "
        "coordinator takes over within it (the grants' leases cover the gap).",
    )
    listen: str | None = Field(
        None,
        description="ADDR:PORT for GET /v1/status and the demand-response webhook "
        "(POST /v1/demand-response); none: no HTTP.",
    )
    token_file: Path | None = Field(
        None, strict=False, description="Bearer tokens for the webhook (one a line)."
    )
    replica: str | None = Field(None, description="This coordinator's name (default: host-pid).")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _plain_name(value)

    @field_validator("listen")
    @classmethod
    def _listen_addr(cls, value: str | None) -> str | None:
        return None if value is None else _listen(value)


class FeedSection(BaseModel):
    model_config = STRICT_SETTINGS

    limit_w: float = Field(..., gt=0, description="This feed's or PDU's limit (W).")
    parent: str | None = Field(None, description="The feed above it (none: the site).")


class ClusterSection(BaseModel):
    model_config = STRICT_SETTINGS

    safe_share_w: float = Field(
        ..., gt=0, description="What the cluster falls back to when its grant lapses (W)."
    )
    feed: str | None = Field(None, description="The feed or PDU it hangs from (none: the site).")
    limit_w: float | None = Field(None, gt=0, description="The cluster's own limit (W).")
    weight: float = Field(1.0, gt=0, description="What its throughput is worth against others'.")


class PromqlSignal(BaseModel):
    model_config = STRICT_SETTINGS

    url: HttpUrlText = Field(..., description="Prometheus (or a PromQL-compatible store) base URL.")
    query: str = Field(..., min_length=1, description="PromQL giving the site's target (W).")
    timeout_s: float = Field(5.0, gt=0, le=60)


class OpenAdrSettings(BaseModel):
    """An OpenADR 2.0b VEN for the site (agent.site.openadr; the `openadr` extra)."""

    model_config = STRICT_SETTINGS

    vtn_url: HttpUrlText = Field(
        ..., description="The VTN's URL, e.g. https://vtn/OpenADR2/Simple/2.0b."
    )
    ven_name: str = Field(..., min_length=1, description="This VEN's name at the VTN.")
    cert: Path | None = Field(None, strict=False, description="PEM certificate (signing, TLS).")
    key: Path | None = Field(None, strict=False, description="PEM private key.")
    vtn_fingerprint: str | None = Field(None, description="The VTN certificate's fingerprint.")
    simple_levels: list[float] = Field(
        default_factory=lambda: list(DEFAULT_SIMPLE_LEVELS),
        min_length=4,
        max_length=4,
        description="SIMPLE levels 0..3 as shares of the site's limit.",
    )

    @field_validator("simple_levels")
    @classmethod
    def _levels(cls, value: list[float]) -> list[float]:
        if any(not 0 < v <= 1 for v in value):
            raise ValueError("each level is a share of the limit in (0, 1]")
        return value

    @model_validator(mode="after")
    def _pair(self) -> OpenAdrSettings:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key: both or neither")
        return self


class DemandResponseSection(BaseModel):
    model_config = STRICT_SETTINGS

    ramp_w_per_s: float = Field(
        ..., gt=0, description="How fast the site's limit may move toward a target (W/s)."
    )
    schedule_file: Path | None = Field(
        None,
        strict=False,
        description="TOML with [[event]] id, start, duration_s, target_w (a relative path is "
        "beside the site's file).",
    )
    promql: PromqlSignal | None = None
    openadr: OpenAdrSettings | None = Field(
        None, description="An OpenADR 2.0b VEN for the site (needs the `openadr` extra)."
    )


class SiteConfig(BaseModel):
    model_config = STRICT_SECTION

    site: SiteSection
    etcd: EtcdSettings = Field(default_factory=EtcdSettings)
    feeds: dict[str, FeedSection] = Field(default_factory=dict)
    clusters: dict[str, ClusterSection] = Field(..., min_length=1)
    demand_response: DemandResponseSection | None = None

    @field_validator("feeds", "clusters")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            _plain_name(name)
        return value

    @model_validator(mode="after")
    def _webhook_token(self) -> SiteConfig:
        if self.site.listen is not None and self.site.token_file is None:
            raise ValueError("site.listen: needs site.token_file (the webhook is authenticated)")
        return self

    def tree(self) -> LimitTree:
        return LimitTree.build(
            self.site.name,
            self.site.limit_w,
            {n: (f.limit_w, f.parent) for n, f in self.feeds.items()},
            {n: (c.limit_w, c.feed) for n, c in self.clusters.items()},
        )

    @property
    def grant_lease_s(self) -> float:
        return self.site.grant_lease_s or 4 * self.site.interval_s

    @property
    def lead_s(self) -> float:
        return 2 * self.site.interval_s if self.site.lead_s is None else self.site.lead_s

    @property
    def leader_ttl_s(self) -> int:
        return self.site.leader_ttl_s or max(2, round(2 * self.site.interval_s))


def parse_site_config(data: Mapping[str, Any], source: str = "site config") -> SiteConfig:
    try:
        config = SiteConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError.listing(source, error_lines(exc)) from None
    try:
        tree = config.tree()
    except TreeError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    # When every grant lapses, every cluster falls back to its safe share: those must fit.
    over = tree.over({n: c.safe_share_w for n, c in config.clusters.items()})
    if over:
        node, by = next(iter(over.items()))
        raise ConfigError(
            f"{source}: clusters.*.safe_share_w: the safe shares under {node!r} exceed its limit "
            f"by {by:.0f} W (when grants lapse, every cluster falls back to its safe share)"
        )
    return config


def load_site_config(path: Path) -> SiteConfig:
    data = read_toml(path, "site config", error=ConfigError)
    config = parse_site_config(data, f"site config {path}")
    dr = config.demand_response
    if dr is not None and dr.schedule_file is not None and not dr.schedule_file.is_absolute():
        # A relative schedule is beside the site's file, wherever the coordinator starts.
        dr = dr.model_copy(update={"schedule_file": path.parent / dr.schedule_file})
        config = config.model_copy(update={"demand_response": dr})
    return config

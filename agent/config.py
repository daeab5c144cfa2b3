"""Configuration: one TOML file, validated into typed models.

Every error names the key path and the problem, e.g.
`cluster.budget_w: must be greater than 0 (got -5)`. Policy settings are validated by each
policy's own settings model, found in the policy registry.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from agent.act.audit import DEFAULT_KEEP, DEFAULT_MAX_BYTES
from agent.act.guard import GuardSettings
from agent.act.node_client import NodeClientSettings
from agent.act.notify import NotifySettings
from agent.act.rollout import RolloutSettings
from agent.act.slurm import SlurmSettings
from agent.core.dcgm import (
    DCGM_FIELDS,
    LABEL_GPU,
    LABEL_HOST,
    LABEL_HOST_NEW,
    LABEL_JOB,
    LABEL_MODEL,
    LABEL_UUID,
)
from agent.core.errors import BadInputError, ConfigError
from agent.core.gpu_models import BUILTIN_MODELS
from agent.core.settings import STRICT_SECTION
from agent.core.snapshot import Metric
from agent.core.urls import check_http_url
from agent.observe.promql import check_label_name, check_metric_name
from agent.observe.remote_write.settings import RemoteWriteConfig
from agent.orient.groups import expand_nodes
from agent.orient.settings import OrientSettings
from agent.sim.faults import parse_fault, parse_seconds
from agent.sim.twin import TWIN_LABELS
from agent.site.settings import SiteLinkSettings
from policies.base import PolicySettings
from policies.registry import PolicyRegistry, default_registry


class _Section(BaseModel):
    model_config = STRICT_SECTION  # no unknown keys, strict types, no infinity or NaN


class GroupConfig(_Section):
    nodes: str | list[str] = Field(
        ...,
        description="Member nodes: a Slurm hostlist ('node[1-8]') or a list of hostlists/globs.",
    )
    budget_w: float = Field(..., gt=0, description="This group's own power budget (W).")

    @field_validator("nodes")
    @classmethod
    def _valid_hostlist(cls, value: str | list[str]) -> str | list[str]:
        try:
            expand_nodes(value)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return value


# A cluster's name is a path component (/var/lib/ooda/NAME, its lock and state files): one
# plain name, so that "/", ".." or "a/../../etc" cannot move the state elsewhere.
_CLUSTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class ClusterConfig(_Section):
    name: str = Field(
        "default",
        description="Cluster name (one agent per cluster): letters, digits, '.', '_', '-', "
        "starting with a letter or digit, at most 63 characters.",
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _CLUSTER_NAME.fullmatch(value):
            raise ValueError(
                "must be a plain name (letters, digits, '.', '_', '-', starting with a letter or "
                "digit, at most 63 characters): it names the state directory"
            )
        return value

    budget_w: float | None = Field(
        None, gt=0, description="Static power budget (W) covering GPU power plus node overhead."
    )
    budget_query: str | None = Field(
        None,
        min_length=1,
        description="PromQL giving the budget (W), e.g. a demand-response signal.",
    )
    node_overhead_w: float = Field(
        0.0, ge=0, description="Non-GPU power per node counted against the budget (W)."
    )
    groups: dict[str, GroupConfig] = Field(
        default_factory=dict, description="Racks or rows with budgets of their own, by node lists."
    )
    group_label: str | None = Field(
        None,
        description="A label of the GPUs' power series naming each one's rack or row (added by "
        "relabelling), instead of node lists; read with each GPU's identity. A GPU without it "
        "is in no such group, and each cycle says how many.",
    )
    label_budgets_w: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="Budget (W) per value of group_label."
    )
    job_priority: dict[str, int] = Field(
        default_factory=dict,
        description="Job id glob -> priority class (higher is more important), e.g. {'10*' = 2}.",
    )

    @field_validator("group_label")
    @classmethod
    def _group_label_name(cls, value: str | None) -> str | None:
        return None if value is None else check_label_name(value)


class DemandResponse(_Section):
    start_s: float = Field(..., ge=0, description="When the budget drops (twin seconds).")
    duration_s: float = Field(..., gt=0, description="How long the drop lasts (s).")
    budget_w: float = Field(..., gt=0, description="The budget during the drop (W).")


class TwinConfig(_Section):
    nodes: int = Field(8, ge=1, le=20000, description="Nodes in the twin.")
    gpus_per_node: int = Field(8, ge=1, le=16, description="GPUs per node.")
    model: str = Field("H100", description="GPU model (H100 or A100).")
    seed: int = Field(0, description="Random seed: the same seed gives the same run.")
    occupancy: float = Field(0.85, ge=0, le=1, description="Target share of busy GPUs.")
    budget_w: float | None = Field(
        None, gt=0, description="The facility budget (W); none: no budget."
    )
    demand_response: DemandResponse | None = None
    speed: float = Field(
        0.0,
        ge=0,
        description="0: virtual clock, as fast as possible; 1: real time; X: X times real time.",
    )
    faults: list[str] = Field(
        default_factory=list, description="Faults, e.g. 'xid=79:node2/gpu1@60'."
    )
    node_overhead_w: float = Field(0.0, ge=0, description="Non-GPU power per node (W).")

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in BUILTIN_MODELS:
            raise ValueError(
                f"unknown GPU model {value!r} (known: {', '.join(sorted(BUILTIN_MODELS))})"
            )
        return value

    @field_validator("faults")
    @classmethod
    def _valid_faults(cls, value: list[str]) -> list[str]:
        for spec in value:
            try:
                parse_fault(spec)
            except BadInputError as exc:
                raise ValueError(str(exc)) from None
        return value


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
        "The loop does not read energy_j (no policy uses it); recording and replay do.",
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


class NvmlSourceConfig(_Section):
    node: str | None = Field(
        None,
        min_length=1,
        description="This node's name, as Slurm and the node daemons know it (default: the host "
        "name up to its first dot).",
    )


class SourceConfig(_Section):
    kind: Literal["twin", "prometheus", "nvml", "remote_write"] = Field(
        "twin",
        description="Where telemetry comes from (nvml: this node's GPUs, read directly; for one "
        "GPU node; remote_write: samples pushed by a Prometheus, vmagent or OpenTelemetry "
        "collector).",
    )
    prometheus: PrometheusConfig = Field(default_factory=PrometheusConfig)
    nvml: NvmlSourceConfig = Field(default_factory=NvmlSourceConfig)
    remote_write: RemoteWriteConfig = Field(default_factory=RemoteWriteConfig)


class ActuatorsConfig(_Section):
    caps: Literal["twin", "node", "none"] = Field(
        "twin", description="Who applies power caps (node: the node daemons, see [actuators.node])."
    )
    placement: Literal["twin", "slurm", "none"] = Field(
        "twin",
        description="Who drains and steers nodes. With slurm and the twin as source, the twin's "
        "jobs follow Slurm's.",
    )
    lease_s: float = Field(120.0, gt=0, description="Cap lease length (s), renewed every cycle.")
    node: NodeClientSettings | None = Field(
        None, description="How to reach the node daemons (needed when caps = 'node')."
    )
    slurm: SlurmSettings = Field(
        default_factory=SlurmSettings, description="The Slurm placement actuator."
    )
    notify: NotifySettings = Field(
        default_factory=NotifySettings, description="Where Notify intents go."
    )

    @model_validator(mode="after")
    def _node_section(self) -> ActuatorsConfig:
        if self.caps == "node" and self.node is None:
            raise ValueError("caps = 'node' needs an [actuators.node] section")
        return self


# The scheduler counts in whole seconds and datetimes: an interval or grace past a day is a
# mistake, and inf or a huge one overflows it (the daemon would die at start or on reload).
MAX_INTERVAL_S = 86_400.0
# The longest stop grace; deploy/systemd/ooda-agent.service's TimeoutStopSec leaves room above it
# for on_exit and the state save (tests/test_deploy.py checks).
MAX_STOP_GRACE_S = 60.0


class DaemonConfig(_Section):
    interval_s: float = Field(
        15.0,
        gt=0,
        le=MAX_INTERVAL_S,
        description="Seconds between cycles (at most a day).",
    )
    state_dir: Path | None = Field(
        None,
        strict=False,
        description="The daemon's state directory (persisted state, `ooda guard reset` "
        "requests); default /var/lib/ooda/CLUSTER_NAME.",
    )
    state_save_interval_s: float = Field(
        30.0,
        gt=0,
        description="Save the state at least this often (s); also after every cycle that acted.",
    )
    on_exit: Literal["renew", "release"] = Field(
        "renew",
        description="On stop, live caps are renewed once more (a restart finds them in force) or "
        "released back to each GPU's default limit.",
    )
    stop_grace_s: float = Field(
        3.0,
        ge=0,
        le=MAX_STOP_GRACE_S,
        description="On SIGTERM, how long a running cycle may take to finish before it is "
        "abandoned (s).",
    )
    misfire_grace_s: float | None = Field(
        None,
        gt=0,
        le=MAX_INTERVAL_S,
        description="A cycle that cannot start within this of its time is skipped and reported "
        "(s, at most a day; default: one interval).",
    )
    ready_max_age_s: float | None = Field(
        None,
        gt=0,
        description="/readyz fails when no cycle succeeded within this (s; default: 3 intervals, "
        "at least 10 s).",
    )
    per_gpu_metrics_max: int = Field(
        1000,
        ge=0,
        description="Per-GPU recommendation series on /metrics: at most this many, the largest "
        "recommended reductions first (aggregates are always there).",
    )


class AuditConfig(_Section):
    path: Path | None = Field(
        None,
        strict=False,
        description="Durable JSON-lines audit log (none: no audit log is kept); a relative path "
        "is under daemon.state_dir.",
    )
    max_bytes: int = Field(
        DEFAULT_MAX_BYTES,
        ge=4096,
        description="Rotate the audit log when it would grow past this (bytes).",
    )
    keep: int = Field(
        DEFAULT_KEEP, ge=0, le=10_000, description="Rotated audit files kept (PATH.1 ... PATH.N)."
    )


class Config(_Section):
    dry_run: bool = Field(
        True, description="Advise only: record what would be done, change nothing."
    )
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    source: SourceConfig = Field(default_factory=SourceConfig)
    twin: TwinConfig = Field(default_factory=TwinConfig)
    policies: dict[str, dict[str, Any]] | None = Field(
        None,
        description="Policies to run, in order, each with its settings (default: every built-in).",
    )
    actuators: ActuatorsConfig = Field(default_factory=ActuatorsConfig)
    guard: GuardSettings = Field(default_factory=GuardSettings)
    orient: OrientSettings = Field(default_factory=OrientSettings)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    rollout: RolloutSettings = Field(
        default_factory=RolloutSettings,
        description="Going live in stages: advisory kinds, the scope, freeze windows.",
    )
    site: SiteLinkSettings | None = Field(
        None,
        description="The site this cluster belongs to: its budget is the site coordinator's "
        "grant (etcd), and its replicas elect a leader (see docs/site.md).",
    )
    policy_sets: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Named sets of policies for `ooda replay --compare`, e.g. "
        "{efficient = ['power_budget', 'energy_efficiency']} (a '+'-joined string works too).",
    )

    @field_validator("policy_sets", mode="before")
    @classmethod
    def _split_sets(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {
                k: [p.strip() for p in v.split("+") if p.strip()] if isinstance(v, str) else v
                for k, v in value.items()
            }
        return value

    # Filled by `load_config`/`parse_config` from the registry (not part of the file).
    policy_settings: dict[str, PolicySettings] = Field(default_factory=dict, exclude=True)

    @model_validator(mode="after")
    def _budget_source(self) -> Config:
        if self.cluster.budget_w is not None and self.cluster.budget_query is not None:
            raise ValueError("cluster: give budget_w or budget_query, not both")
        if self.cluster.budget_query is not None and self.source.kind == "remote_write":
            raise ValueError(
                "cluster.budget_query: PromQL needs a Prometheus to evaluate it, and a "
                "remote_write source has none; give cluster.budget_w"
            )
        return self

    @model_validator(mode="after")
    def _site_budget(self) -> Config:
        # Under a site the budget is the grant (cluster.budget_w stays as a local limit: the
        # lower one holds); a budget from Prometheus would be a second, competing source.
        if self.site is not None and self.cluster.budget_query is not None:
            raise ValueError(
                "cluster.budget_query: a cluster in a [site] gets its budget from the site "
                "coordinator (cluster.budget_w may stay, as a local limit)"
            )
        return self

    @model_validator(mode="after")
    def _demand_response_needs_a_budget(self) -> Config:
        # Checked with the file, not when the twin is built: `ooda config check` must refuse
        # what `ooda run` and `ooda once` would.
        if self.twin.demand_response is not None and self.twin.budget_w is None:
            raise ValueError("twin.demand_response: needs twin.budget_w (the normal budget)")
        return self

    @model_validator(mode="after")
    def _group_label_source(self) -> Config:
        # The Prometheus source reads the group label with each GPU's identity; the twin's GPUs
        # carry only their job's priority, so another label would silently hold no budget.
        cluster = self.cluster
        if cluster.label_budgets_w and cluster.group_label is None:
            raise ValueError("cluster.label_budgets_w: needs cluster.group_label (their label)")
        label = cluster.group_label
        # NVML's GPUs carry no labels either; Slurm's job priority is the one both get.
        labelled = ("prometheus", "remote_write")  # sources whose GPUs carry their series' labels
        if self.source.kind not in labelled and label is not None and label not in TWIN_LABELS:
            whose = "the twin's" if self.source.kind == "twin" else "NVML's"
            raise ValueError(
                f"cluster.group_label: {whose} GPUs carry no {label!r} label (only "
                f"{', '.join(TWIN_LABELS)}), so these budgets would never hold; give the groups "
                "as node lists in [cluster.groups]"
            )
        return self

    @model_validator(mode="after")
    def _actuators_for_real_sources(self) -> Config:
        # The twin's actuators act on an in-process twin, which a Prometheus or NVML source
        # cannot see: with those the default is to advise only, and asking for them is an error.
        if self.source.kind == "twin":
            return self
        given = self.actuators.model_fields_set if "actuators" in self.model_fields_set else set()
        source = {
            "prometheus": "a Prometheus",
            "nvml": "an NVML",
            "remote_write": "a remote-write",
        }[self.source.kind]
        for name in ("caps", "placement"):
            if getattr(self.actuators, name) != "twin":
                continue
            if name in given:
                raise ValueError(
                    f"actuators.{name}: 'twin' acts on an in-process twin, which {source} "
                    "source does not observe; use 'none' (advise only)"
                )
            setattr(self.actuators, name, "none")
        return self


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _path(loc: tuple[int | str, ...]) -> str:
    """A TOML key path; a key that is not bare is quoted (a newline in a key stays on one line)."""
    return ".".join(
        str(part) if _BARE_KEY.fullmatch(str(part)) else json.dumps(str(part)) for part in loc
    )


def _message(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    value = err.get("input")
    if kind not in ("model_type", "dict_type") and not isinstance(value, dict):
        msg += f" (got {value!r})"
    return msg


def _errors(exc: ValidationError, prefix: tuple[str, ...] = ()) -> list[str]:
    return [
        f"{_path(prefix + tuple(e['loc']))}: {_message(e)}" if prefix or e["loc"] else _message(e)
        for e in exc.errors()
    ]


def parse_config(
    data: Mapping[str, Any], registry: PolicyRegistry | None = None, source: str = "config"
) -> Config:
    """Validate a parsed TOML document. Raises ConfigError listing every problem by key path."""
    problems: list[str] = []
    try:
        config = Config.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + "; ".join(_errors(exc))) from None
    registry = registry or default_registry()
    wanted = (
        config.policies if config.policies is not None else {name: {} for name in registry.names()}
    )
    settings: dict[str, PolicySettings] = {}
    for name, raw in wanted.items():
        if name not in registry:
            problems.append(
                f"{_path(('policies', name))}: unknown policy "
                f"(known: {', '.join(registry.names())})"
            )
            continue
        try:
            settings[name] = registry.get(name).Settings.model_validate(dict(raw))
        except ValidationError as exc:
            problems.extend(_errors(exc, ("policies", name)))
    for set_name, members in config.policy_sets.items():
        if not members:
            problems.append(f"{_path(('policy_sets', set_name))}: names no policy")
        for name in members:
            if name not in registry:
                problems.append(
                    f"{_path(('policy_sets', set_name))}: unknown policy {name!r} "
                    f"(known: {', '.join(registry.names())})"
                )
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    config.policy_settings = settings
    return config


def load_config(path: Path, registry: PolicyRegistry | None = None) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read ({exc.strerror or exc})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: not valid TOML: {exc}") from None
    return parse_config(data, registry, source=f"config {path}")


def default_config(registry: PolicyRegistry | None = None) -> Config:
    return parse_config({}, registry, source="built-in defaults")


def force_dry_run(config: Config) -> Config:
    """`--dry-run`: advise only, whatever the file says. A policy's own `dry_run = false`
    overrides the global flag, so every policy's is forced too (`ooda run` and `ooda once`)."""
    settings = {
        name: s.model_copy(update={"dry_run": True}) for name, s in config.policy_settings.items()
    }
    return config.model_copy(update={"dry_run": True, "policy_settings": settings})


def state_dir(config: Config) -> Path:
    """Where the daemon keeps its state: `daemon.state_dir`, else /var/lib/ooda/CLUSTER."""
    if config.daemon.state_dir is not None:
        return config.daemon.state_dir
    return Path("/var/lib/ooda") / config.cluster.name


def audit_path(config: Config, state: Path | None = None) -> Path | None:
    """The audit log every command reads and writes: `audit.path`, a relative one under the
    state directory (`state`, else `state_dir(config)`), where the daemon can write under
    systemd. None: no audit log is kept."""
    path = config.audit.path
    if path is None or path.is_absolute():
        return path
    return (state or state_dir(config)) / path


def seconds(value: str | float) -> float:
    """`2h`, `90s`, `15m`, 42 -> seconds (for CLI options)."""
    return float(value) if isinstance(value, int | float) else parse_seconds(value)

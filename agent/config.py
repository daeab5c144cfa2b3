"""Configuration: one TOML file, validated into typed models.

Every error names the key path and the problem, e.g.
`cluster.budget_w: must be greater than 0 (got -5)`. Policy settings are validated by each
policy's own settings model, found in the policy registry; each source's and actuator's section by
its kind's own model, found in the adapter table (agent.adapters), which also says which kinds
there are.

A file is read within bounds: at most MAX_CONFIG_BYTES, UTF-8, nested at most MAX_DEPTH levels,
and no string (key or value) with a NUL byte (no path, name or label has one; a path with one
would pass here and fail when opened).
"""

from __future__ import annotations

import os
import re
import stat
import weakref
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, cast

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from agent.act.audit import DEFAULT_KEEP, DEFAULT_MAX_BYTES
from agent.act.guard import GuardSettings
from agent.act.rollout import RolloutSettings
from agent.adapters import NONE, Adapters, default_adapters
from agent.adapters.site import SiteLinkSettings, site_budget_problem
from agent.adapters.twin import TwinConfig
from agent.core.errors import ConfigError
from agent.core.settings import FILE_KIND, STRICT_SECTION, error_lines, key_path
from agent.core.toml_file import read_toml
from agent.meter.settings import MeterSettings
from agent.observe.app_throughput import ThroughputSettings
from agent.observe.promql import check_label_name
from agent.orient.groups import expand_nodes
from agent.orient.settings import OrientSettings
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


class SourceConfig(_Section):
    """`[source]`: the kind, and each kind's own section (`[source.KIND]`, validated by the kind's
    model from the adapter table: agent.adapters)."""

    adapters: ClassVar[Adapters | None] = None

    kind: str = Field(
        "twin",
        description="Where telemetry comes from: a source kind of the adapter table (twin, "
        "prometheus, nvml: this node's GPUs, read directly; remote_write: samples pushed by a "
        "Prometheus, vmagent or OpenTelemetry collector; trace: a recorded trace; or an "
        "installed plug-in's).",
    )

    @model_validator(mode="after")
    def _needed_section(self) -> SourceConfig:
        kind = _table(self).sources.get(self.kind)
        if kind is not None and kind.Settings is not None and getattr(self, kind.name) is None:
            raise ValueError(f"kind = {self.kind!r} needs a [source.{self.kind}] section")
        return self


class ActuatorsConfig(_Section):
    """`[actuators]`: who applies caps and who places work, and each kind's own section
    (`[actuators.KIND]`, validated by the kind's model from the adapter table)."""

    adapters: ClassVar[Adapters | None] = None

    caps: str = Field(
        "twin", description="Who applies power caps (node: the node daemons, see [actuators.node])."
    )
    placement: str = Field(
        "twin",
        description="Who drains and steers nodes. With slurm and the twin as source, the twin's "
        "jobs follow Slurm's.",
    )
    lease_s: float = Field(120.0, gt=0, description="Cap lease length (s), renewed every cycle.")

    @model_validator(mode="after")
    def _needed_sections(self) -> ActuatorsConfig:
        table = _table(self)
        for role in ("caps", "placement"):
            name = getattr(self, role)
            kind = table.actuators[role].get(name)
            if kind is not None and kind.needs_section and getattr(self, name, None) is None:
                raise ValueError(f"{role} = {name!r} needs an [actuators.{name}] section")
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
        "is under daemon.state_dir (and may not leave it with '..').",
    )

    @field_validator("path")
    @classmethod
    def _inside_state_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute() and ".." in value.parts:
            raise ValueError(
                "a relative path stays inside daemon.state_dir: no '..' (give an absolute path "
                "to keep the log elsewhere)"
            )
        return value

    max_bytes: int = Field(
        DEFAULT_MAX_BYTES,
        ge=4096,
        description="Rotate the audit log when it would grow past this (bytes).",
    )
    keep: int = Field(
        DEFAULT_KEEP, ge=0, le=10_000, description="Rotated audit files kept (PATH.1 ... PATH.N)."
    )


class Config(_Section):
    # The adapter table this model validates against (`config_model` sets it).
    adapters: ClassVar[Adapters | None] = None

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
    meter: MeterSettings = Field(
        default_factory=MeterSettings,
        description="Energy, cost and carbon per job, user and account, in a ledger.",
    )
    throughput: ThroughputSettings = Field(
        default_factory=ThroughputSettings,
        description="Each job's own throughput: inference servers' and training jobs' metrics "
        "in Prometheus, mapped to jobs by a label (none: the SM-clock proxy).",
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
    def _real_sources_advise(self) -> Config:
        # The twin's actuators act on an in-process twin, which a Prometheus or NVML source
        # cannot see: with those the default is to advise only (asking for them is an error:
        # `_twin_actuators_need_the_twin`).
        table = _table(self)
        source = table.sources.get(self.source.kind)
        if source is None or source.observes_twin:
            return self
        given = self.actuators.model_fields_set if "actuators" in self.model_fields_set else set()
        for role in ("caps", "placement"):
            kind = table.actuators[role].get(getattr(self.actuators, role))
            if kind is not None and kind.acts_on_twin and role not in given:
                setattr(self.actuators, role, NONE)
        return self


# -- rules across sections -----------------------------------------------------------------------
# Each reads a valid config and the file as written, and names the sections it reads: when one
# of them is in error the rule is not applied (its own errors are reported instead), so every
# other rule still is, and a file's every problem is reported at once.

CrossRule = Callable[[Config, Mapping[str, Any]], Iterator[str]]
_CROSS_RULES: list[tuple[frozenset[str], CrossRule]] = []


def _cross_rule(*sections: str) -> Callable[[CrossRule], CrossRule]:
    def register(rule: CrossRule) -> CrossRule:
        _CROSS_RULES.append((frozenset(sections), rule))
        return rule

    return register


@_cross_rule("cluster")
def _one_budget(config: Config, _data: Mapping[str, Any]) -> Iterator[str]:
    if config.cluster.budget_w is not None and config.cluster.budget_query is not None:
        yield "cluster: give budget_w or budget_query, not both"


@_cross_rule("site", "cluster")
def _site_budget(config: Config, _data: Mapping[str, Any]) -> Iterator[str]:
    # Under a site the budget is the grant (cluster.budget_w stays as a local limit: the lower
    # one holds); a budget from Prometheus would be a second, competing source.
    problem = site_budget_problem(config.site, config.cluster.budget_query)
    if problem is not None:
        yield problem


@_cross_rule("cluster", "source")
def _budget_query_needs_prometheus(config: Config, _data: Mapping[str, Any]) -> Iterator[str]:
    kind = _table(config).sources.get(config.source.kind)
    if config.cluster.budget_query is not None and kind is not None and kind.no_budget_query:
        yield f"cluster.budget_query: {kind.no_budget_query}"


@_cross_rule("twin")
def _demand_response_needs_a_budget(config: Config, _data: Mapping[str, Any]) -> Iterator[str]:
    # Checked with the file, not when the twin is built: `ooda config check` must refuse
    # what `ooda run` and `ooda once` would.
    if config.twin.demand_response is not None and config.twin.budget_w is None:
        yield "twin.demand_response: needs twin.budget_w (the normal budget)"


@_cross_rule("cluster")
def _label_budgets_need_the_label(config: Config, _data: Mapping[str, Any]) -> Iterator[str]:
    if config.cluster.label_budgets_w and config.cluster.group_label is None:
        yield "cluster.label_budgets_w: needs cluster.group_label (their label)"


@_cross_rule("cluster", "source")
def _group_label_carried(config: Config, _data: Mapping[str, Any]) -> Iterator[str]:
    # The Prometheus source reads the group label with each GPU's identity; the twin's GPUs
    # carry only their job's priority, so another label would silently hold no budget.
    label = config.cluster.group_label
    kind = _table(config).sources.get(config.source.kind)
    if kind is None or kind.labels is None or label is None or label in kind.labels:
        return
    carried = ", ".join(kind.labels) or "none"
    yield (
        f"cluster.group_label: {kind.whose or kind.name} GPUs carry no {label!r} label (only "
        f"{carried}), so these budgets would never hold; give the groups as node lists in "
        "[cluster.groups]"
    )


@_cross_rule("throughput", "source")
def _throughput_needs_prometheus(config: Config, _data: Mapping[str, Any]) -> Iterator[str]:
    t = config.throughput
    if t.sources and t.prometheus_url is None and config.source.kind != "prometheus":
        yield "throughput.sources: needs throughput.prometheus_url (the source is not Prometheus)"


@_cross_rule("source", "actuators")
def _twin_actuators_need_the_twin(config: Config, data: Mapping[str, Any]) -> Iterator[str]:
    table = _table(config)
    source = table.sources.get(config.source.kind)
    written = data.get("actuators")
    if source is None or source.observes_twin or not isinstance(written, Mapping):
        return
    for role in ("caps", "placement"):
        kind = table.actuators[role].get(str(written.get(role)))
        if role in written and kind is not None and kind.acts_on_twin:
            yield (
                f"actuators.{role}: {kind.name!r} acts on an in-process twin, which "
                f"{source.called or repr(source.name)} source does not observe; use 'none' "
                "(advise only)"
            )


def _table(model: BaseModel) -> Adapters:
    """The adapter table a config model was built from (agent.adapters)."""
    table = getattr(type(model), "adapters", None)
    return table if isinstance(table, Adapters) else _default_table()


@cache
def _default_table() -> Adapters:
    return default_adapters()


_MODELS: weakref.WeakKeyDictionary[Adapters, tuple[int, type[Config]]] = weakref.WeakKeyDictionary()


def config_model(adapters: Adapters) -> type[Config]:
    """The Config model of this adapter table: `[source] kind` one of its source kinds, each
    with its own section; `[actuators] caps` and `placement` one of its kinds for the role (or
    'none'), each with its own section. Built once per table (and again if it grew)."""
    cached = _MODELS.get(adapters)
    if cached is not None and cached[0] == adapters.version:
        return cached[1]
    source_model = create_model(
        "SourceConfig",
        __base__=SourceConfig,
        kind=(_choice(list(adapters.sources)), SourceConfig.model_fields["kind"]),
        **{
            kind.name: _section_field(kind.Settings, kind.description)
            for kind in adapters.sources.values()
            if kind.Settings is not None
        },
    )
    fields: dict[str, Any] = {
        role: (
            _choice([*adapters.actuators[role], NONE]),
            ActuatorsConfig.model_fields[role],
        )
        for role in ("caps", "placement")
    }
    for kind in adapters.sections():
        assert kind.Settings is not None
        fields[kind.name] = _section_field(kind.Settings, kind.description, kind.needs_section)
    actuators_model = create_model("ActuatorsConfig", __base__=ActuatorsConfig, **fields)
    model = create_model(
        "Config",
        __base__=Config,
        source=(source_model, Field(default_factory=source_model)),
        actuators=(actuators_model, Field(default_factory=actuators_model)),
    )
    for cls in (source_model, actuators_model, model):
        cls.adapters = adapters
    _MODELS[adapters] = (adapters.version, model)
    return cast("type[Config]", model)


def _choice(names: list[str]) -> Any:
    """A field that takes one of these names (pydantic says which, when it is not)."""
    return Literal.__getitem__(tuple(names))


def _section_field(settings: type[BaseModel], description: str, needed: bool = False) -> Any:
    """A kind's section: its defaults when not given, unless it must be given (or has no
    defaults), then None until it is."""
    try:
        settings()
    except ValidationError:
        needed = True
    if needed:
        return (settings | None, Field(None, description=description))
    return (settings, Field(default_factory=settings, description=description))


MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 32  # the deepest real configuration is 4 levels (policies.NAME.setting.list)


def _check_document(data: Mapping[str, Any], source: str) -> None:
    """ConfigError naming the key path of the first value nested deeper than MAX_DEPTH, or of a
    string (key or value) with a NUL byte. Iterative: a deep document cannot exhaust the stack."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), data)]
    while stack:
        where, value = stack.pop()
        if len(where) > MAX_DEPTH:
            raise ConfigError.listing(
                source, [f"{key_path(where[:MAX_DEPTH])}: nested deeper than {MAX_DEPTH} levels"]
            )
        if isinstance(value, str) and "\x00" in value:
            raise ConfigError.listing(source, [f"{key_path(where)}: contains a NUL byte"])
        if isinstance(value, Mapping):
            for key, inner in value.items():
                if isinstance(key, str) and "\x00" in key:
                    raise ConfigError.listing(
                        source, [f"{key_path((*where, key))}: a key with a NUL byte"]
                    )
                stack.append(((*where, key), inner))
        elif isinstance(value, list | tuple):
            stack.extend(((*where, k), inner) for k, inner in enumerate(value))


def parse_config(
    data: Mapping[str, Any],
    registry: PolicyRegistry | None = None,
    source: str = "config",
    adapters: Adapters | None = None,
) -> Config:
    """Validate a parsed TOML document against the policy registry and the adapter table
    (default: the built-ins and installed plug-ins). Raises ConfigError listing every problem
    of the document at once by key path: the sections', the rules' across sections (those whose
    sections are valid), the policies' and the policy sets'. A document nested too deep or with a
    NUL byte is refused first, naming where."""
    _check_document(data, source)
    model = config_model(adapters or _default_table())
    problems: list[str] = []
    config, failed = _validated(model, data, problems)
    for sections, rule in _CROSS_RULES:
        if not sections & failed:
            problems.extend(rule(config, data))
    registry = registry or default_registry()
    settings = _policy_settings(data, registry, problems)
    problems += _policy_set_problems(data, registry)
    if problems:
        raise ConfigError.listing(source, problems)
    config.policy_settings = settings
    return config


def _validated(
    model: type[Config], data: Mapping[str, Any], problems: list[str]
) -> tuple[Config, frozenset[str]]:
    """The config, and the top-level keys in error (their problems added to `problems`): the
    document without those, so the rules across the other sections can still be applied."""
    try:
        return model.model_validate(dict(data)), frozenset()
    except ValidationError as exc:
        problems.extend(error_lines(exc))
        failed = frozenset(str(e["loc"][0]) if e["loc"] else "*" for e in exc.errors())
    rest = {k: v for k, v in data.items() if k not in failed}
    try:
        return model.model_validate(rest), failed
    except ValidationError:  # not a table at all: no rule can be applied
        return model.model_validate({}), failed | {"*"} | set(data)


def _policy_settings(
    data: Mapping[str, Any], registry: PolicyRegistry, problems: list[str]
) -> dict[str, PolicySettings]:
    """Each policy's settings, validated by its own model (every policy when none is named);
    read from the document itself, so they are checked with the rest (a `policies` that is not
    a table of tables is the sections' error)."""
    written = data.get("policies")
    wanted = {name: {} for name in registry.names()} if written is None else written
    settings: dict[str, PolicySettings] = {}
    if not isinstance(wanted, Mapping):
        return settings
    for name, raw in wanted.items():
        if name not in registry:
            problems.append(
                f"{key_path(('policies', name))}: unknown policy "
                f"(known: {', '.join(registry.names())})"
            )
            continue
        if not isinstance(raw, Mapping):
            continue
        try:
            settings[name] = registry.get(name).Settings.model_validate(dict(raw))
        except ValidationError as exc:
            problems.extend(error_lines(exc, ("policies", name)))
    return settings


def _policy_set_problems(data: Mapping[str, Any], registry: PolicyRegistry) -> list[str]:
    problems: list[str] = []
    sets = data.get("policy_sets")
    if not isinstance(sets, Mapping):
        return problems
    for set_name, members in Config._split_sets(sets).items():
        if not isinstance(members, list):
            continue
        if not members:
            problems.append(f"{key_path(('policy_sets', set_name))}: names no policy")
        for name in members:
            if isinstance(name, str) and name not in registry:
                problems.append(
                    f"{key_path(('policy_sets', set_name))}: unknown policy {name!r} "
                    f"(known: {', '.join(registry.names())})"
                )
    return problems


def load_config(
    path: Path,
    registry: PolicyRegistry | None = None,
    adapters: Adapters | None = None,
    *,
    needs_source: bool = True,
    check_files: bool = True,
) -> Config:
    """The configuration file at `path`, validated; also its `[source]` (a file that does not
    say where telemetry comes from is refused: the built-in twin only when it names it) and the
    files it names (they exist, are readable and, for secrets, not writable by others).
    `needs_source=False`: the command gives the source itself (`ooda replay`'s trace, `ooda
    demo`'s twin) or builds no agent (`ooda audit tail`); `check_files=False`: it opens none of
    the files the config names (its source and actuators are its own, or it builds none)."""
    data = read_toml(path, "config", max_bytes=MAX_CONFIG_BYTES, error=ConfigError)
    where = f"config {path}"
    adapters = adapters or _default_table()
    missing = _source_missing(data, adapters) if needs_source else []
    try:
        config = parse_config(data, registry, source=where, adapters=adapters)
    except ConfigError as exc:
        raise ConfigError.listing(where, [*missing, *exc.problems]) from None
    problems = missing + (file_problems(config) if check_files else [])
    if problems:
        raise ConfigError.listing(where, problems)
    return config


def _source_missing(data: Mapping[str, Any], adapters: Adapters) -> list[str]:
    """A file must say where its telemetry comes from: an empty one, or one without
    `[source] kind`, would otherwise run the agent against the built-in twin unasked."""
    section = data.get("source")
    if isinstance(section, Mapping) and "kind" in section:
        return []
    real = [f'"{name}"' for name in adapters.sources if name != "twin"]
    kinds = f'{", ".join(real)}; "twin" for the built-in twin' if real else '"twin"'
    if not data:
        return [f"the file is empty: say where telemetry comes from with [source] kind ({kinds})"]
    return [f"source.kind: required key is missing: where telemetry comes from ({kinds})"]


_FILE_KIND_SAYS = {"file": "a file", "secret": "a file", "directory": "a directory"}


def file_problems(config: Config) -> list[str]:
    """Each file the configuration names (a path field marked `file_field`) that is missing,
    unreadable, of the wrong kind, or a secret others may write, by key path."""
    return [
        f"{key_path(loc)}: {problem}"
        for loc, kind, path in _named_files(config, ())
        if (problem := _file_problem(path, kind))
    ]


def _named_files(
    model: BaseModel, loc: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], str, Path]]:
    for name, info in type(model).model_fields.items():
        value = getattr(model, name, None)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        kind = extra.get(FILE_KIND)
        if isinstance(kind, str) and isinstance(value, Path):
            yield (*loc, name), kind, value
        elif isinstance(value, BaseModel):
            yield from _named_files(value, (*loc, name))


def _file_problem(path: Path, kind: str) -> str | None:
    try:
        st = path.stat()
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    is_dir = stat.S_ISDIR(st.st_mode)
    if is_dir != (kind == "directory"):
        return f"{path}: not {_FILE_KIND_SAYS[kind]}"
    if not os.access(path, os.R_OK | (os.X_OK if is_dir else 0)):
        return f"{path}: not readable by this user"
    if kind == "secret" and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"{path}: a secret its group or others may write (mode {st.st_mode & 0o777:o}; "
            f"chmod go-w {path})"
        )
    return None


def config_warnings(config: Config, registry: PolicyRegistry | None = None) -> list[str]:
    """What a valid configuration will not do that its reader may expect: no budget at all."""
    cluster = config.cluster
    if cluster.budget_w is not None or cluster.budget_query is not None:
        return []
    kind = _table(config).sources.get(config.source.kind)
    own = None
    if kind is not None and kind.own_budget is not None:
        own = kind.own_budget(getattr(config.source, kind.name, None), config)
    if own:
        return []
    registry = registry or default_registry()
    running = [name for name, s in config.policy_settings.items() if s.enabled]
    holders = [name for name in running if getattr(registry.get(name), "holds_budget", False)]
    others = [name for name in running if name not in holders]
    unless = ""
    if own is None and kind is not None and kind.own_budget is not None:
        unless = f" (unless {kind.called or kind.name} brings one)"
    groups = ": only its groups' budgets hold" if cluster.groups or cluster.label_budgets_w else ""
    holding = (
        f"{_and(holders)} will cap nothing for the fleet's budget"
        if holders
        else "no policy that holds a budget runs"
    )
    acting = f"; {_and(others)} still act" if others else ""
    return [
        f"no budget: neither cluster.budget_w nor cluster.budget_query is set{unless}{groups}, so "
        f"{holding} and nothing keeps the fleet's power under a limit{acting}"
    ]


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def default_config(
    registry: PolicyRegistry | None = None, adapters: Adapters | None = None
) -> Config:
    return parse_config({}, registry, source="built-in defaults", adapters=adapters)


def with_prometheus(config: Config | None, url: str, where: str) -> Config:
    """`config` (None: the built-in defaults) reading its telemetry from the Prometheus at `url`
    (its metric names, matchers and budget query kept), validated again; `where` names it in
    errors (`--prometheus`, the file)."""
    data = (
        {} if config is None else config.model_dump(exclude={"policy_settings"}, exclude_unset=True)
    )
    source = data.setdefault("source", {})
    source["kind"] = "prometheus"
    source.setdefault("prometheus", {})["url"] = url
    return parse_config(data, source=where)


def adapters_of(config: Config) -> Adapters:
    """The adapter table `config` was validated against (it builds what the config names)."""
    return _table(config)


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
    if ".." in path.parts:  # refused by the config's validation; a built Config is checked too
        raise ConfigError(f"audit.path: {path} would leave the state directory")
    return (state or state_dir(config)) / path


def ledger_path(config: Config, state: Path | None = None) -> Path:
    """The meter's ledger: `meter.ledger`, a relative one under the state directory, by default
    `<state_dir>/<cluster>.ledger.sqlite`."""
    base = state or state_dir(config)
    path = config.meter.ledger
    if path is None:
        return base / f"{config.cluster.name}.ledger.sqlite"
    return path if path.is_absolute() else base / path

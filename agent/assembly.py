"""The one place the agent is assembled: a validated Config in, a running agent out.

Every command, replay, the policy test API and every benchmark build here, so they all run the
same loop: `ooda run` and `ooda once` (the config's source and actuators), `ooda demo` and the
twin runs (`twin_config`: a Config of the twin's options, so groups, job priorities, the rollout
and orient's settings come along), `ooda replay` (the trace as the source, the counterfactual's
recorders as the actuators, every intent advice) and the benches.

What differs between uses is passed in, never rebuilt: the source, the actuators (or only their
recorders), the audit sink, the clock, the twin, the policy registry, the budget, whether every
intent is advice (`advisory`, with its reason), and a link to the site that already runs.

In a site (the config's `[site]`), the cluster's own agent (`ooda run`, `ooda once`) gets its
budget from the site coordinator and its leadership from etcd through one link
(agent.adapters.site), opened here; a demo, a replay, a test or a bench joins no site unless it
hands in a link of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from agent.act.audit import AuditLog
from agent.act.authority import Authority
from agent.act.executor import Actuators, Executor
from agent.act.gate import Gate
from agent.act.guard import RESET_FILE, GuardSettings
from agent.act.ledger import Ledger
from agent.act.rollout import Rollout
from agent.adapters import ActuatorKind, BuildContext, Role
from agent.adapters.prometheus import PrometheusConfig
from agent.adapters.prometheus import prometheus_settings as _prometheus_settings
from agent.adapters.site import link_settings, open_site_link
from agent.adapters.twin import twin_factory
from agent.config import Config, adapters_of, audit_path, default_config, ledger_path, state_dir
from agent.core.clock import Clock, SystemClock
from agent.core.errors import ConfigError
from agent.core.protocols import (
    CapActuator,
    JobAccounting,
    Notifier,
    PlacementActuator,
    TelemetrySource,
)
from agent.core.reads import Reads
from agent.core.snapshot import Metric
from agent.loop import CycleReport, Loop
from agent.meter import ledger as energy_ledger
from agent.meter.booking import Booking, EnergySource
from agent.meter.meter import Meter
from agent.meter.pricing import Signal
from agent.meter.settings import CarbonSettings, TariffSettings
from agent.observe.app_throughput import AppThroughputSource
from agent.observe.prometheus import PrometheusSettings, PrometheusSource
from agent.observe.signal import PromQLSignal
from agent.orient.groups import GroupSpec, expand_nodes
from agent.orient.orienter import Orienter
from agent.orient.reads import ORIENT_READS
from agent.sim.accounts import TwinAccounts
from agent.sim.adapters import TwinCapActuator, TwinClock, TwinPlacement, TwinSource
from agent.sim.twin import Twin
from agent.site.link import LinkSettings, SiteLink
from agent.site.settings import SiteLinkSettings
from policies.base import Policy, PolicySettings
from policies.registry import PolicyRegistry, default_registry


def prometheus_settings(config: Config) -> PrometheusSettings:
    """The Prometheus source a config describes, every field read every cycle (a recording;
    the loop reads only what its readers need: `loop_reads`)."""
    section = getattr(config.source, "prometheus", None)
    if not isinstance(section, PrometheusConfig):
        raise ConfigError("source.prometheus: no Prometheus source kind in the adapter table")
    return _prometheus_settings(
        section, budget_query=config.cluster.budget_query, group_label=config.cluster.group_label
    )


def loop_reads(policies: Sequence[Policy], config: Config | None = None) -> Reads:
    """What the loop reads of the telemetry: what orient's models, these policies and the meter
    (where `config` enables it) read, each field as fresh as its most demanding reader needs it
    (agent.core.reads)."""
    meter = meter_reads(config) if config is not None else Reads()
    return Reads.union([ORIENT_READS, meter, *(getattr(p, "reads", Reads()) for p in policies)])


def meter_reads(config: Config) -> Reads:
    """The meter books from the energy counter every cycle (unless told to integrate power,
    which the loop reads anyway)."""
    m = config.meter
    if m.enabled and m.energy is not EnergySource.POWER:
        return Reads.every_cycle(Metric.ENERGY_J)
    return Reads()


def wants_scheduler_shares(config: Config) -> bool:
    """power_budget weighs accounts by Slurm's fairshare when it runs, is told to, and the
    config gives it no shares of its own."""
    settings = config.policy_settings.get("power_budget")
    return bool(
        settings is not None
        and settings.enabled
        and getattr(settings, "scheduler_shares", False)
        and not getattr(settings, "account_shares", None)
    )


def orienter_for(config: Config) -> Orienter:
    cluster = config.cluster
    return Orienter(
        node_overhead_w=cluster.node_overhead_w,
        groups=tuple(
            GroupSpec(name, g.budget_w, tuple(expand_nodes(g.nodes)))
            for name, g in cluster.groups.items()
        ),
        group_label=cluster.group_label,
        label_budgets_w=dict(cluster.label_budgets_w),
        job_priority=dict(cluster.job_priority),
        settings=config.orient,
    )


def build_policies(
    names_and_settings: Mapping[str, PolicySettings], registry: PolicyRegistry
) -> list[Policy]:
    policies: list[Policy] = []
    for name, settings in names_and_settings.items():
        if settings.enabled:
            policies.append(registry.get(name)(settings))
    return policies


def rollout_for(config: Config, clock: Clock | None) -> Rollout:
    """The staged rollout a config describes (node lists expanded)."""
    nodes = config.rollout.nodes
    return Rollout(config.rollout, expand_nodes(nodes) if nodes is not None else None, clock)


def authority_for(
    config: Config,
    policies: Sequence[Policy],
    clock: Clock | None,
    advisory: str | None = None,
) -> Authority:
    """Live or advice, per intent: the agent's dry_run, each policy's own, the rollout's stages
    and freeze windows (`advisory`: every intent is advice, for this reason)."""
    return Authority(
        config.dry_run,
        {p.name: p.settings.dry_run for p in policies},
        rollout_for(config, clock),
        always=advisory,
    )


def build_actuators(
    config: Config, clock: Clock | None = None
) -> tuple[CapActuator | None, PlacementActuator | None, list[Callable[[], Any]]]:
    """The live cap and placement actuators a config names, without a loop (for `ooda
    rollback`), and what closes them. A twin actuator acts on a fresh twin of the config."""
    ctx = _context(config, clock, None, None)
    placement: PlacementActuator | None = _actuator(config, "placement", ctx, PlacementActuator)
    caps: CapActuator | None = _actuator(config, "caps", ctx, CapActuator)
    return caps, placement, ctx.closers


def _context(
    config: Config, clock: Clock | None, twin: Twin | None, reads: Reads | None
) -> BuildContext:
    return BuildContext(
        cluster=config.cluster.name,
        clock=clock,
        budget_query=config.cluster.budget_query,
        group_label=config.cluster.group_label,
        reads=reads,
        twin_factory=twin_factory(config.twin),
        twin=twin,
        account_shares=wants_scheduler_shares(config),
    )


def _actuator(config: Config, role: Role, ctx: BuildContext, protocol: Any) -> Any:
    """The actuator the config names for `role`, built by its kind (None: 'none')."""
    kind = adapters_of(config).actuator(role, getattr(config.actuators, role, "none"))
    return _built(kind, config.actuators, ctx, protocol) if kind is not None else None


def _built(kind: ActuatorKind, sections: BaseModel, ctx: BuildContext, protocol: Any) -> Any:
    """What `kind` builds from its section, checked to be a `protocol` (a runtime-checkable
    edge protocol: a plug-in's mistake is named, not found in a later cycle)."""
    built = kind.build(getattr(sections, kind.name, None), ctx)
    if not isinstance(built, protocol):
        raise ConfigError(
            f"actuators.{kind.role}: kind {kind.name!r} ({kind.origin}) built "
            f"{type(built).__name__}, not a {protocol.__name__}"
        )
    return built


@dataclass
class Agent:
    """The assembled agent: its loop and what the commands around it need to reach."""

    config: Config
    loop: Loop
    audit: AuditLog
    actuators: Actuators
    twin: Twin | None = None
    closers: list[Callable[[], Any]] = field(default_factory=list)
    # The link to the site coordinator (etcd), in a site: the loop's budget and election.
    site: SiteLink | None = None
    owns_site: bool = False  # close() stops the link (False: its owner, e.g. a reload's, does)
    meter: Meter | None = None  # set by the daemon (`build_meter`), which knows the timeline

    @property
    def ledger(self) -> Ledger:
        return self.loop.ledger

    def cycle(self) -> CycleReport:
        return self.loop.cycle()

    def hand_site_to(self, other: Agent) -> None:
        """`other` (built with this agent's link: a reload) takes the link over: it stops it
        from now on, and the link plans under `other`'s own budget and rise delay."""
        site = self.site
        if site is None or other.site is not site or not self.owns_site:
            return
        self.owns_site, other.owns_site = False, True
        if other.config.site is not None:
            site.retune(_link_settings(other.config, other.config.site))

    def close(self) -> None:
        for close in reversed(self.closers):
            close()
        if self.site is not None and self.owns_site:
            self.site.stop()
        if self.meter is not None:
            self.meter.close()
        self.audit.close()


def hosts_twin(config: Config) -> bool:
    """Whether the config's source or actuators are the in-process twin."""
    table = adapters_of(config)
    source = table.sources.get(config.source.kind)
    acting = (
        table.actuators[role].get(getattr(config.actuators, role)) for role in ("caps", "placement")
    )
    return bool(source is not None and source.observes_twin) or any(
        kind is not None and kind.acts_on_twin for kind in acting
    )


def assemble(
    config: Config,
    *,
    registry: PolicyRegistry | None = None,
    clock: Clock | None = None,
    audit: AuditLog | None = None,
    source: TelemetrySource | None = None,
    actuators: Actuators | None = None,
    twin: Twin | None = None,
    budget_w: float | None = None,
    advisory: str | None = None,
    standalone: bool = False,
    wall: Clock | None = None,
    site: SiteLink | None = None,
) -> Agent:
    """The agent `config` describes, wired into one Loop.

    The source and actuators are built by the kinds the config names (agent.adapters);
    `source` and `actuators` replace them (replay's trace and recorders; `actuators` given are
    complete, the notifier too). `twin` reuses a twin that already runs (a daemon's reload
    keeps its cluster; the demo and the twin runs build their own); `budget_w` overrides the
    configured budget; `advisory` makes every intent advice, for that reason (replay).
    `standalone`: not the cluster's own agent (a demo, a replay, a test, a bench): it consumes
    no `ooda guard reset` request meant for the daemon, unless the config names a state
    directory of its own, and joins no site. `wall`: the wall clock a source's own time follows
    (a trace's; a daemon's test drives it). `site`: a link to the site that already runs (a
    reload keeps its leadership; a bench's on an in-memory store), else the cluster's own agent
    in a `[site]` opens one (none with a `budget_w` override: that budget is the one)."""
    registry = registry or default_registry()
    audit = audit or AuditLog(
        path=audit_path(config), max_bytes=config.audit.max_bytes, keep=config.audit.keep
    )
    policies = build_policies(config.policy_settings, registry)
    ctx = _context(config, clock, twin, loop_reads(policies, config))
    ctx.wall = wall
    named = actuators is None  # the config's actuators (else the caller's, complete)
    if actuators is None:
        source, actuators = _edges(config, source, ctx)
    elif source is None:
        raise ConfigError("assemble: actuators given without a source")
    clock = clock or _clock_of(config, ctx, source)
    if named:
        ctx.clock = clock
        actuators.notifier = _notifier(config, ctx)
    authority = authority_for(config, policies, clock, advisory)
    ledger = Ledger(config.guard)
    watch_reset = not standalone or config.daemon.state_dir is not None
    owns_site = site is None and config.site is not None and not standalone and budget_w is None
    if owns_site:
        site = _site_link(config, ctx)
    loop = Loop(
        source=source,
        orienter=orienter_for(config),
        policies=policies,
        ledger=ledger,
        gate=Gate(
            ledger,
            authority,
            reset_file=state_dir(config) / RESET_FILE if watch_reset else None,
        ),
        executor=Executor(actuators, authority, ledger, config.actuators.lease_s),
        authority=authority,
        audit=audit,
        clock=clock,
        budget_w=site or (budget_w if budget_w is not None else config.cluster.budget_w),
        placement=actuators.node_states_reader(),
        interval_s=config.daemon.interval_s,
        election=site,
    )
    return Agent(
        config=config,
        loop=loop,
        audit=audit,
        actuators=actuators,
        twin=ctx.twin,
        closers=ctx.closers,
        site=site,
        owns_site=owns_site,
    )


def kept_site(agent: Agent, config: Config) -> SiteLink | None:
    """`agent`'s running link when `config` (a reload's) describes the same one: the same
    [site] and election, so its session and leadership carry over (only the cluster's own
    budget and the rise delay may change: `Agent.hand_site_to` applies them). None: a link of
    its own (or none)."""
    site = agent.site
    if site is None or config.site is None or config.site != agent.config.site:
        return None
    return site if site.serves(_link_settings(config, config.site)) else None


def _link_settings(config: Config, section: SiteLinkSettings) -> LinkSettings:
    return link_settings(
        section,
        cluster=config.cluster.name,
        interval_s=config.daemon.interval_s,
        local_budget_w=config.cluster.budget_w,
    )


def _site_link(config: Config, ctx: BuildContext) -> SiteLink:
    """The cluster's link to its site, opened last: what was built before it is closed when it
    cannot be opened (a port for the failsafe endpoint)."""
    assert config.site is not None  # the caller asked
    try:
        return open_site_link(
            config.site,
            cluster=config.cluster.name,
            interval_s=config.daemon.interval_s,
            local_budget_w=config.cluster.budget_w,
        )
    except BaseException:
        for close in reversed(ctx.closers):
            close()
        raise


def _clock_of(config: Config, ctx: BuildContext, source: TelemetrySource) -> Clock:
    """The clock the source's time runs on: the present in Unix time (Prometheus, NVML), or
    its own (the twin's, a trace's)."""
    kind = adapters_of(config).source(config.source.kind)
    if kind.clock is None:
        return SystemClock()
    own = ctx.source if ctx.source is not None else source
    return kind.clock(own, ctx, getattr(config.source, kind.name, None))


def reads_the_present(config: Config) -> bool:
    """Whether the config's source reads the present, in Unix time (else a time of its own)."""
    return adapters_of(config).source(config.source.kind).clock is None


def _edges(
    config: Config, source: TelemetrySource | None, ctx: BuildContext
) -> tuple[TelemetrySource, Actuators]:
    """The source and actuators the config names (`source` overrides its source): the placement
    first (a twin may mirror its jobs), then the source, then the caps; then the source joined
    with what the actuators know (the scheduler's jobs, the nodes' limits). The notifier comes
    after, on the agent's clock."""
    table = adapters_of(config)
    actuators = Actuators()
    placement_kind = table.actuator("placement", config.actuators.placement)
    if placement_kind is not None:
        actuators.placement = _built(placement_kind, config.actuators, ctx, PlacementActuator)
        ctx.placement = actuators.placement
    kind = table.source(config.source.kind)
    ctx.source_kind = kind
    if source is None:
        source = kind.build(getattr(config.source, kind.name, None), ctx)
    ctx.source = source
    caps_kind = table.actuator("caps", config.actuators.caps)
    if caps_kind is not None:
        actuators.caps = ctx.caps = _built(caps_kind, config.actuators, ctx, CapActuator)
    for joined, actuator in ((placement_kind, actuators.placement), (caps_kind, actuators.caps)):
        if joined is not None and joined.wrap_source is not None:
            section = getattr(config.actuators, joined.name, None)
            source = joined.wrap_source(source, actuator, section, ctx)
    return _with_app_throughput(config, source, ctx), actuators


def _with_app_throughput(
    config: Config, source: TelemetrySource, ctx: BuildContext
) -> TelemetrySource:
    """The source joined with the jobs' own throughput, where `[throughput]` names sources
    (after the scheduler's join: it maps series to the jobs the snapshot names)."""
    t = config.throughput
    if not t.sources:
        return source
    url = t.prometheus_url
    if url is None:
        url = prometheus_settings(config).url
    query = PrometheusSource(PrometheusSettings(url=url, timeout_s=t.timeout_s))
    ctx.closers.append(query.close)
    specs = [s.spec() for s in t.sources]
    return AppThroughputSource(source, query, specs, quantile=t.quantile)


def _notifier(config: Config, ctx: BuildContext) -> Notifier | None:
    """The notifier [actuators.notify] names (None: none), on the agent's clock."""
    kind = adapters_of(config).notifier()
    if kind is None:
        return None
    built = kind.build(getattr(config.actuators, kind.name, None), ctx)
    if built is not None and not isinstance(built, Notifier):
        raise ConfigError(f"actuators.notify: kind {kind.name!r} built no Notifier")
    return built


# Every built-in policy but the opt-in curve exploration, safety first: what `ooda demo` and
# the twin's normal day run.
BUILTIN_POLICIES = (
    "power_budget",
    "thermal_guard",
    "health_drain",
    "energy_efficiency",
    "idle_powerdown",
    "placement",
)


# -- the agent on an in-process twin (the demo, twin runs, the replay test API, the benches) ------


def twin_config(
    policies: Sequence[str],
    *,
    registry: PolicyRegistry,
    settings: Mapping[str, PolicySettings] | None = None,
    guard: GuardSettings | None = None,
    dry_run: bool = False,
    interval_s: float = 15.0,
    node_overhead_w: float | None = None,
    base: Config | None = None,
) -> Config:
    """The Config of an agent on an in-process twin: `base` (default: the built-in defaults,
    so its groups, job priorities, rollout, orient and guard settings come along) with the twin
    as its source and actuators, `policies` in this order (each with its settings from
    `settings`, else `base`'s, else its defaults), the control interval, dry-run and the twin's
    node overhead (unless `base` sets one)."""
    cfg = base or default_config(registry)
    overhead = cfg.cluster.node_overhead_w
    if node_overhead_w is not None and "node_overhead_w" not in cfg.cluster.model_fields_set:
        overhead = node_overhead_w
    new = cfg.model_copy(
        update={
            "dry_run": dry_run,
            "source": cfg.source.model_copy(update={"kind": "twin"}),
            "actuators": cfg.actuators.model_copy(update={"caps": "twin", "placement": "twin"}),
            "daemon": cfg.daemon.model_copy(update={"interval_s": interval_s}),
            "cluster": cfg.cluster.model_copy(update={"node_overhead_w": overhead}),
            "guard": guard if guard is not None else cfg.guard,
        }
    )
    given = settings or {}
    new.policy_settings = {
        name: given.get(name) or cfg.policy_settings.get(name) or registry.get(name).Settings()
        for name in policies
    }
    return new


def twin_agent(
    twin: Twin,
    policies: Sequence[str],
    *,
    registry: PolicyRegistry,
    settings: Mapping[str, PolicySettings] | None = None,
    guard: GuardSettings | None = None,
    dry_run: bool = False,
    interval_s: float = 15.0,
    audit: AuditLog | None = None,
    source: TelemetrySource | None = None,
    base: Config | None = None,
    site: SiteLink | None = None,
) -> Agent:
    """The agent wired to `twin`: its telemetry (or `source`, e.g. its exporters), its caps
    and its scheduler, on its clock; under `site`'s budget and election when given (a bench's
    link on an in-memory store)."""
    config = twin_config(
        policies,
        registry=registry,
        settings=settings,
        guard=guard,
        dry_run=dry_run,
        interval_s=interval_s,
        node_overhead_w=twin.spec.node_overhead_w,
        base=base,
    )
    actuators = Actuators(caps=TwinCapActuator(twin), placement=TwinPlacement(twin))
    return assemble(
        config,
        registry=registry,
        audit=audit or AuditLog(),
        source=source or TwinSource(twin),
        actuators=actuators,
        twin=twin,
        clock=TwinClock(twin),
        standalone=True,
        site=site,
    )


def drive(
    agent: Agent, duration_s: float, progress: Callable[[float], None] | None = None
) -> list[CycleReport]:
    """Run the agent's twin to `duration_s`, a cycle every control interval (a cycle first);
    `progress` is told the twin seconds run at each cycle."""
    twin = agent.twin
    if twin is None:
        raise ValueError("drive: the agent runs on no twin")
    interval_s = agent.loop.interval_s
    reports: list[CycleReport] = []
    next_cycle = 0.0
    while twin.t_s < duration_s - 1e-9:
        if twin.t_s >= next_cycle - 1e-9:
            if progress is not None and reports:
                progress(interval_s)
            reports.append(agent.loop.cycle())
            next_cycle += interval_s
        twin.step(min(twin.spec.step_s, next_cycle - twin.t_s, duration_s - twin.t_s))
    if progress is not None:
        progress(max(0.0, duration_s - (next_cycle - interval_s)))
    return reports


# -- the meter (agent/meter): its ledger, accounting, price and carbon --------------------------


def signal_for(config: Config, settings: TariffSettings | CarbonSettings, what: str) -> Signal:
    """The price or carbon signal of a `[meter.*]` section; a PromQL one queries the
    configured Prometheus (`source.prometheus.url`, or the default's)."""
    signal = settings.signal()
    if signal is not None:
        return signal
    assert settings.query is not None  # the section's validator insists
    section = getattr(config.source, "prometheus", None)
    url = section.url if isinstance(section, PrometheusConfig) else PrometheusConfig().url
    source = PrometheusSource(PrometheusSettings(url=url))
    return PromQLSignal(source, settings.query, f"meter.{what}.query")


def open_ledger(config: Config, timeline: str, state: Path | None = None) -> energy_ledger.Ledger:
    """The configured ledger for this timeline. A twin's ledger from another run (another
    timeline, its times meaning nothing here) is moved aside, named after its timeline."""
    path = ledger_path(config, state)
    bucket_s = config.meter.bucket_s
    try:
        return energy_ledger.Ledger(path, timeline=timeline, bucket_s=bucket_s)
    except energy_ledger.LedgerError as exc:
        if "timeline" not in str(exc) or timeline == "unix":
            raise ConfigError(f"meter.ledger: {exc}") from None
        old = energy_ledger.Ledger(path, read_only=True)
        aside = path.with_name(f"{path.stem}.{old.timeline}{path.suffix}")
        old.close()
        for suffix in ("", "-wal", "-shm"):
            moved = Path(f"{path}{suffix}")
            if moved.exists():
                moved.rename(Path(f"{aside}{suffix}"))
        return energy_ledger.Ledger(path, timeline=timeline, bucket_s=bucket_s)


def job_accounting(agent: Agent) -> JobAccounting | None:
    """Who runs the jobs: the placement actuator where it keeps accounting (Slurm), else the
    twin's own owners."""
    placement: object = agent.actuators.placement
    if isinstance(placement, JobAccounting):
        return placement
    if agent.twin is not None:
        return TwinAccounts(agent.twin)
    return None


def build_meter(
    agent: Agent,
    timeline: str,
    on_booked: Callable[[Booking, energy_ledger.Prices, Mapping[str, str]], None] | None = None,
    state: Path | None = None,
) -> Meter | None:
    """The meter the agent's config asks for (None: `meter.enabled` is false), on its ledger:
    the daemon calls `meter.book` once per cycle."""
    config = agent.config
    m = config.meter
    if not m.enabled:
        return None
    return Meter(
        open_ledger(config, timeline, state),
        source=m.energy,
        node_overhead_w=config.cluster.node_overhead_w,
        max_gap_s=m.max_gap_s,
        accounting=job_accounting(agent),
        price=signal_for(config, m.tariff, "tariff"),
        carbon=signal_for(config, m.carbon, "carbon"),
        retention_s=None if m.retention_days is None else m.retention_days * 86_400.0,
        on_booked=on_booked,
    )

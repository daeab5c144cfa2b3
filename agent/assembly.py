"""The one place the agent is assembled: a validated Config in, a running agent out.

Every command, replay, the policy test API and every benchmark build here, so they all run the
same loop: `ooda run` and `ooda once` (the config's source and actuators), `ooda demo` and the
twin runs (`twin_config`: a Config of the twin's options, so groups, job priorities, the rollout
and orient's settings come along), `ooda replay` (the trace as the source, the counterfactual's
recorders as the actuators, every intent advice) and the benches.

What differs between uses is passed in, never rebuilt: the source, the actuators (or only their
recorders), the audit sink, the clock, the twin, the policy registry, the budget, and whether
every intent is advice (`advisory`, with its reason).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from agent.act.audit import AuditLog
from agent.act.authority import Authority
from agent.act.executor import Actuators, Executor
from agent.act.gate import Gate
from agent.act.guard import RESET_FILE, GuardSettings
from agent.act.ledger import Ledger
from agent.act.node_client import NodeCapActuator
from agent.act.notify import build_notifier
from agent.act.rollout import Rollout
from agent.act.slurm import SlurmPlacement, SlurmSettings
from agent.config import Config, TwinConfig, audit_path, default_config, state_dir
from agent.core.clock import Clock, SystemClock
from agent.core.errors import ConfigError, GpuError
from agent.core.gpu_models import BUILTIN_MODELS
from agent.core.protocols import CapActuator, PlacementActuator, TelemetrySource
from agent.core.snapshot import Metric
from agent.loop import CycleReport, Loop
from agent.node.auth import TokenStore
from agent.node.nvml import NvmlBackend
from agent.observe.job_labels import JobLabelledSource
from agent.observe.limits import LimitsFilledSource
from agent.observe.nvml import NvmlSource
from agent.observe.prometheus import PrometheusSettings, PrometheusSource
from agent.observe.remote_write import RemoteWriteSource
from agent.orient.groups import GroupSpec, expand_nodes
from agent.orient.orienter import Orienter
from agent.sim.adapters import TwinCapActuator, TwinClock, TwinPlacement, TwinSource
from agent.sim.faults import parse_fault
from agent.sim.job_mirror import JobMirror, MirroredTwinSource
from agent.sim.twin import BudgetSchedule, Twin, TwinSpec
from policies.base import Policy, PolicySettings
from policies.registry import PolicyRegistry, default_registry


def twin_spec(cfg: TwinConfig) -> TwinSpec:
    """The twin a config describes."""
    budget: BudgetSchedule | None = None
    if cfg.budget_w is not None:  # a demand response without it is refused by the config
        budget = BudgetSchedule.constant(cfg.budget_w)
        if cfg.demand_response is not None:
            dr = cfg.demand_response
            budget = BudgetSchedule.demand_response(
                cfg.budget_w, dr.budget_w, dr.start_s, dr.duration_s
            )
    return TwinSpec(
        nodes=cfg.nodes,
        gpus_per_node=cfg.gpus_per_node,
        model=BUILTIN_MODELS[cfg.model],
        seed=cfg.seed,
        occupancy=cfg.occupancy,
        node_overhead_w=cfg.node_overhead_w,
        budget=budget,
        faults=tuple(parse_fault(f) for f in cfg.faults),
    )


# Fields the loop reads from telemetry but no orient model or policy uses: the energy counter
# (the recorders and replay read it). Each field costs Prometheus a selection of every GPU's
# series a cycle, about 0.8 s of its CPU at 100,000 GPUs.
LOOP_UNUSED = frozenset({Metric.ENERGY_J})
# ... and fields it reads only in place of another: the enforced limit is the cap in force only
# where a GPU does not export its power management limit (orient's `cap_bounds`).
LOOP_FALLBACKS = {Metric.ENFORCED_LIMIT_W: Metric.POWER_LIMIT_W}
# ... and fields read this often (s), each a selection of every GPU's series saved in the
# cycles between: memory utilization tells a job's workload class once (agent.orient.curvefit),
# so a minute's delay costs nothing; the ECC and row-remap counters each come with an XID, read
# every cycle (48: a double-bit error; 63, 64: a row remap recorded, failed), so they back it up
# (the XID gauge holds only the last XID) and keep their last reading in between.
LOOP_SLOW_FIELDS = {
    Metric.MEM_UTIL_PCT: 60.0,
    Metric.ECC_DBE_TOTAL: 60.0,
    Metric.REMAPPED_ROWS_UNCORRECTABLE: 60.0,
    Metric.ROW_REMAP_FAILURE: 60.0,
}


def prometheus_settings(
    config: Config,
    leave_out: Collection[Metric] = (),
    fallbacks: Mapping[Metric, Metric] | None = None,
    slow_fields: Mapping[Metric, float] | None = None,
) -> PrometheusSettings:
    """The Prometheus source a config describes (the budget query comes from `cluster`), less
    the fields in `leave_out`, with `fallbacks` read only where needed and `slow_fields` only
    every so often."""
    p = config.source.prometheus
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
        budget_query=config.cluster.budget_query,
        # The per-group budgets' label, read with each GPU's identity.
        extra_labels=(config.cluster.group_label,) if config.cluster.group_label else (),
        fallbacks=dict(fallbacks or {}),
        slow_fields=dict(slow_fields or {}),
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
    closers: list[Callable[[], Any]] = []
    caps: CapActuator | None = None
    placement: PlacementActuator | None = None
    twin: Twin | None = None
    if "twin" in (config.actuators.caps, config.actuators.placement):
        twin = Twin(twin_spec(config.twin))
    if config.actuators.caps == "twin":
        assert twin is not None
        caps = TwinCapActuator(twin)
    elif config.actuators.caps == "node":
        assert config.actuators.node is not None  # the config validator insists
        node_caps = NodeCapActuator(config.actuators.node, clock=clock)
        caps = node_caps
        closers.append(node_caps.close)
    if config.actuators.placement == "twin":
        assert twin is not None
        placement = TwinPlacement(twin)
    elif config.actuators.placement == "slurm":
        placement = slurm_placement(config.actuators.slurm)
    return caps, placement, closers


def nvml_source(config: Config, closers: list[Callable[[], Any]]) -> NvmlSource:
    """This node's GPUs through NVML; what closes it goes into `closers`."""
    try:
        backend = NvmlBackend()
    except GpuError as exc:
        # systemd sets INVOCATION_ID for its services: the agent's unit hides the devices.
        hint = (
            " (the agent's systemd unit hides the NVIDIA devices: add its drop-in "
            "ooda-agent.service.d/nvml.conf)"
            if os.environ.get("INVOCATION_ID")
            else ""
        )
        raise ConfigError(f"source.kind = 'nvml': {exc}{hint}") from exc
    closers.append(backend.close)
    return NvmlSource(backend, config.source.nvml.node or socket.gethostname().split(".")[0])


def remote_write_source(config: Config, closers: list[Callable[[], Any]]) -> RemoteWriteSource:
    """The remote-write receiver, listening; what stops it goes into `closers`."""
    rw = config.source.remote_write
    tokens = TokenStore(rw.token_file) if rw.token_file is not None else None
    source = RemoteWriteSource(
        rw,
        extra_labels=(config.cluster.group_label,) if config.cluster.group_label else (),
        tokens=tokens,
    )
    closers.append(source.close)
    return source


def configured_source(
    config: Config,
    twin: Twin | None,
    slurm: SlurmPlacement | None,
    closers: list[Callable[[], Any]],
) -> TelemetrySource:
    """The telemetry source `[source] kind` names; what closes it goes into `closers`."""
    kind = config.source.kind
    if kind == "twin":
        assert twin is not None
        source: TelemetrySource = TwinSource(twin)
        if slurm is not None:
            source = MirroredTwinSource(source, JobMirror(twin, slurm))
        return source
    if kind == "prometheus":
        prometheus = PrometheusSource(
            prometheus_settings(config, LOOP_UNUSED, LOOP_FALLBACKS, LOOP_SLOW_FIELDS)
        )
        closers.append(prometheus.close)
        return prometheus
    if kind == "remote_write":
        return remote_write_source(config, closers)
    return nvml_source(config, closers)


def slurm_placement(settings: SlurmSettings) -> SlurmPlacement:
    """The Slurm actuator, after checking that what the config names exists."""
    if settings.slurm_conf is not None and not settings.slurm_conf.is_file():
        raise ConfigError(f"actuators.slurm.slurm_conf: no such file {settings.slurm_conf}")
    if settings.bin_dir is not None:
        missing = [
            tool
            for tool in ("scontrol", "sinfo", "squeue")
            if not (settings.bin_dir / tool).exists()
        ]
        if missing:
            raise ConfigError(
                f"actuators.slurm.bin_dir: {', '.join(missing)} not found in {settings.bin_dir}"
            )
    return SlurmPlacement(settings)


@dataclass
class Agent:
    """The assembled agent: its loop and what the commands around it need to reach."""

    config: Config
    loop: Loop
    audit: AuditLog
    actuators: Actuators
    twin: Twin | None = None
    closers: list[Callable[[], Any]] = field(default_factory=list)

    @property
    def ledger(self) -> Ledger:
        return self.loop.ledger

    def cycle(self) -> CycleReport:
        return self.loop.cycle()

    def close(self) -> None:
        for close in reversed(self.closers):
            close()
        self.audit.close()


def hosts_twin(config: Config) -> bool:
    """Whether the config's source or actuators are the in-process twin."""
    return config.source.kind == "twin" or "twin" in (
        config.actuators.caps,
        config.actuators.placement,
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
) -> Agent:
    """The agent `config` describes, wired into one Loop.

    `source` and `actuators` replace what the config names (replay's trace and recorders);
    `twin` reuses a twin that already runs (a daemon's reload keeps its cluster; the demo and
    the twin runs build their own); `budget_w` overrides the configured budget; `advisory`
    makes every intent advice, for that reason (replay). `standalone`: not the cluster's own
    agent (a demo, a replay, a test, a bench): it consumes no `ooda guard reset` request meant
    for the daemon, unless the config names a state directory of its own."""
    registry = registry or default_registry()
    audit = audit or AuditLog(
        path=audit_path(config), max_bytes=config.audit.max_bytes, keep=config.audit.keep
    )
    policies = build_policies(config.policy_settings, registry)
    closers: list[Callable[[], Any]] = []
    named = actuators is None  # the config's actuators (else the caller's, complete)
    if actuators is None:
        source, actuators, twin = _edges(config, source, twin, clock, closers)
    elif source is None:
        raise ConfigError("assemble: actuators given without a source")
    if clock is None and config.source.kind != "twin":
        clock = SystemClock()  # Prometheus and NVML read the present, in Unix time
    if clock is None:
        if twin is None:
            raise ConfigError("a clock is needed when no twin is configured")
        clock = TwinClock(twin)
    notifier = None
    if named:
        notifier = build_notifier(config.actuators.notify, config.cluster.name, clock)
    if notifier is not None:
        actuators.notifier = notifier
        closers.append(notifier.close)
    authority = authority_for(config, policies, clock, advisory)
    ledger = Ledger(config.guard)
    watch_reset = not standalone or config.daemon.state_dir is not None
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
        budget_w=budget_w if budget_w is not None else config.cluster.budget_w,
        placement=actuators.node_states_reader(),
        interval_s=config.daemon.interval_s,
    )
    return Agent(
        config=config, loop=loop, audit=audit, actuators=actuators, twin=twin, closers=closers
    )


def _edges(
    config: Config,
    source: TelemetrySource | None,
    twin: Twin | None,
    clock: Clock | None,
    closers: list[Callable[[], Any]],
) -> tuple[TelemetrySource, Actuators, Twin | None]:
    """The source and actuators the config names (`source` overrides its source), and the twin
    they share, if any."""
    actuators = Actuators()
    slurm = (
        slurm_placement(config.actuators.slurm) if config.actuators.placement == "slurm" else None
    )
    # The twin standing in for the GPUs of a real Slurm cluster: its jobs are Slurm's.
    mirror_slurm = slurm is not None and source is None and config.source.kind == "twin"
    if hosts_twin(config):
        if twin is None:
            spec = twin_spec(config.twin)
            if mirror_slurm:
                spec = replace(spec, occupancy=0.0, initial_jobs=False)
            twin = Twin(spec)
    else:
        twin = None
    if source is None:
        source = configured_source(config, twin, slurm, closers)
    if slurm is not None and not mirror_slurm:  # GPUs labelled with Slurm's jobs and priorities
        source = JobLabelledSource(source, slurm, config.actuators.slurm.default_priority)
    if config.actuators.caps == "twin":
        assert twin is not None
        actuators.caps = TwinCapActuator(twin)
    if config.actuators.caps == "node":
        assert config.actuators.node is not None  # the config validator insists
        node_caps = NodeCapActuator(config.actuators.node, clock=clock)
        actuators.caps = node_caps
        closers.append(node_caps.close)
        if config.source.kind in ("prometheus", "remote_write"):  # limits exporters lack: nodes
            source = LimitsFilledSource(source, node_caps)
    if config.actuators.placement == "twin":
        assert twin is not None
        actuators.placement = TwinPlacement(twin)
    elif slurm is not None:
        actuators.placement = slurm
    return source, actuators, twin


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
) -> Agent:
    """The agent wired to `twin`: its telemetry (or `source`, e.g. its exporters), its caps
    and its scheduler, on its clock."""
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
    )


def drive(agent: Agent, duration_s: float) -> list[CycleReport]:
    """Run the agent's twin to `duration_s`, a cycle every control interval (a cycle first)."""
    twin = agent.twin
    if twin is None:
        raise ValueError("drive: the agent runs on no twin")
    interval_s = agent.loop.interval_s
    reports: list[CycleReport] = []
    next_cycle = 0.0
    while twin.t_s < duration_s - 1e-9:
        if twin.t_s >= next_cycle - 1e-9:
            reports.append(agent.loop.cycle())
            next_cycle += interval_s
        twin.step(min(twin.spec.step_s, next_cycle - twin.t_s, duration_s - twin.t_s))
    return reports

"""Assembling a running agent from a Config: source, orienter, policies, guard, actuators, audit.

`ooda once`, `ooda run` and replay all build through here, so they run the same loop.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from agent.act.audit import AuditLog
from agent.act.executor import Actuators, Executor
from agent.act.guard import RESET_FILE, Guard
from agent.act.node_client import NodeCapActuator
from agent.act.notify import build_notifier
from agent.act.rollout import Rollout, dry_run_reasons
from agent.act.slurm import SlurmPlacement, SlurmSettings
from agent.config import Config, TwinConfig, audit_path, state_dir
from agent.core.clock import Clock, MonotonicClock, SystemClock
from agent.core.errors import ConfigError, GpuError
from agent.core.gpu_models import BUILTIN_MODELS
from agent.core.intents import Intent
from agent.core.protocols import CapActuator, PlacementActuator, TelemetrySource
from agent.core.snapshot import Metric
from agent.loop import Loop
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
from agent.site.http import HttpPinger
from agent.site.link import LinkSettings, SiteLink
from agent.site.settings import site_prefix, split_listen
from agent.site.store import EtcdStore
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
    names_and_settings: dict[str, PolicySettings], registry: PolicyRegistry
) -> list[Policy]:
    policies: list[Policy] = []
    for name, settings in names_and_settings.items():
        if settings.enabled:
            policies.append(registry.get(name)(settings))
    return policies


def dry_run_predicate(
    global_dry_run: bool, policies: Sequence[Policy], rollout: Rollout | None = None
) -> Callable[[Intent], bool]:
    """Per intent: advise only? A policy's own `dry_run` setting overrides the global one; the
    rollout (advisory actuator kinds, freeze windows) can only make more of it advisory."""
    why = dry_run_reason(global_dry_run, policies, rollout)

    def is_dry(intent: Intent) -> bool:
        return why(intent) is not None

    return is_dry


def dry_run_reason(
    global_dry_run: bool, policies: Sequence[Policy], rollout: Rollout | None = None
) -> Callable[[Intent], str | None]:
    """Per intent: why it is only recorded (None: it is applied)."""
    own = {p.name: p.settings.dry_run for p in policies}
    return dry_run_reasons(global_dry_run, own, rollout)


def rollout_for(config: Config, clock: Clock | None) -> Rollout:
    """The staged rollout a config describes (node lists expanded)."""
    nodes = config.rollout.nodes
    return Rollout(config.rollout, expand_nodes(nodes) if nodes is not None else None, clock)


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


RISE_SKEW_S = 2.0  # the hosts' clocks may differ this much: a rise after a lapse waits it out


def site_link(config: Config) -> SiteLink | None:
    """The agent's link to its site (etcd), started: one round done, its thread running."""
    s = config.site
    if s is None:
        return None
    store = EtcdStore(
        list(s.etcd.endpoints),
        s.etcd.timeout_s,
        ca_file=None if s.etcd.ca_file is None else str(s.etcd.ca_file),
        cert_file=None if s.etcd.cert_file is None else str(s.etcd.cert_file),
        key_file=None if s.etcd.key_file is None else str(s.etcd.key_file),
    )
    peer_url = s.peer_url or (f"http://{s.peer_listen}" if s.peer_listen else None)
    settings = LinkSettings(
        site_prefix=site_prefix(s.etcd, s.name),
        cluster=config.cluster.name,
        replica=s.replica or f"{socket.gethostname().split('.')[0]}-{os.getpid()}",
        safe_share_w=s.safe_share_w,
        leader_ttl_s=s.leader_ttl_s or max(2, round(config.daemon.interval_s)),
        local_budget_w=config.cluster.budget_w,
        peer_url=peer_url,
        rise_delay_s=config.daemon.interval_s + RISE_SKEW_S,
    )
    pinger = HttpPinger(s.peer_token_file) if s.peer_token_file is not None else None
    link = SiteLink(store, settings, wall=SystemClock(), mono=MonotonicClock(), pinger=pinger)
    try:
        if s.peer_listen is not None:
            assert s.peer_token_file is not None  # the settings insist
            host, port = split_listen(s.peer_listen)
            server = link.serve_peers(host, port, TokenStore(s.peer_token_file))
            if s.peer_url is None:  # the port it got (port 0: any free one)
                link.elector.peer_url = server.url
        return link.start()
    except OSError as exc:
        link.stop(resign=False)
        raise ConfigError(f"site.peer_listen: cannot listen ({exc.strerror or exc})") from None
    except BaseException:
        link.stop(resign=False)
        raise


def _budget_source(
    config: Config, budget_w: float | None, site: SiteLink | None
) -> tuple[float | SiteLink | None, SiteLink | None]:
    """The loop's budget: `budget_w` if given, else in a site its link (the grant, its lease,
    the safe share; cluster.budget_w a local limit), else cluster.budget_w; and the link."""
    if budget_w is not None:
        return budget_w, None
    if config.site is None:
        return config.cluster.budget_w, None
    link = site or site_link(config)
    return link, link


@dataclass
class Runtime:
    config: Config
    loop: Loop
    audit: AuditLog
    actuators: Actuators
    twin: Twin | None = None
    closers: list[Callable[[], Any]] = field(default_factory=list)
    site: SiteLink | None = None  # the link to the site coordinator (etcd), when in a site
    owns_site: bool = True  # False once handed to the runtime a reload built

    def close(self) -> None:
        for close in reversed(self.closers):
            close()
        if self.site is not None and self.owns_site:
            self.site.stop()
        self.audit.close()


def build_runtime(
    config: Config,
    *,
    clock: Clock | None = None,
    registry: PolicyRegistry | None = None,
    audit: AuditLog | None = None,
    source: TelemetrySource | None = None,
    budget_w: float | None = None,
    twin: Twin | None = None,
    site: SiteLink | None = None,
) -> Runtime:
    """Everything the config names, wired into one Loop. `source` and `budget_w` override it;
    `twin` reuses a twin that already runs (a daemon's reload or restart keeps its cluster);
    `site` a link to the site that already runs (a reload keeps its leadership)."""
    registry = registry or default_registry()
    audit = audit or AuditLog(
        path=audit_path(config), max_bytes=config.audit.max_bytes, keep=config.audit.keep
    )
    policies = build_policies(config.policy_settings, registry)
    actuators = Actuators()
    closers: list[Callable[[], Any]] = []
    slurm = (
        slurm_placement(config.actuators.slurm) if config.actuators.placement == "slurm" else None
    )
    # The twin standing in for the GPUs of a real Slurm cluster: its jobs are Slurm's.
    mirror_slurm = slurm is not None and source is None and config.source.kind == "twin"
    if config.source.kind == "twin" or "twin" in (
        config.actuators.caps,
        config.actuators.placement,
    ):
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
    if clock is None and config.source.kind != "twin":
        clock = SystemClock()  # Prometheus and NVML read the present, in Unix time
    if clock is None:
        if twin is None:
            raise ConfigError("a clock is needed when no twin is configured")
        clock = TwinClock(twin)
    notifier = build_notifier(config.actuators.notify, config.cluster.name, clock)
    if notifier is not None:
        actuators.notifier = notifier
        closers.append(notifier.close)
    budget, site = _budget_source(config, budget_w, site)
    rollout = rollout_for(config, clock)
    is_dry = dry_run_predicate(config.dry_run, policies, rollout)
    loop = Loop(
        source=source,
        orienter=orienter_for(config),
        policies=policies,
        guard=Guard(
            config.guard,
            rollout=rollout,
            reset_file=state_dir(config) / RESET_FILE,
            is_dry=is_dry,
        ),
        executor=Executor(
            actuators,
            is_dry,
            config.actuators.lease_s,
            why_dry=dry_run_reason(config.dry_run, policies, rollout),
        ),
        audit=audit,
        clock=clock,
        budget_w=budget,
        placement=actuators.node_states_reader(),
        dry_run_caps=config.dry_run,
        interval_s=config.daemon.interval_s,
        gate=site,
    )
    return Runtime(
        config=config,
        loop=loop,
        audit=audit,
        actuators=actuators,
        twin=twin,
        closers=closers,
        site=site,
    )


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

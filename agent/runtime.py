"""Assembling a running agent from a Config: source, orienter, policies, guard, actuators, audit.

`ooda once`, `ooda run` and replay all build through here, so they run the same loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.act.audit import AuditLog
from agent.act.executor import Actuators, Executor
from agent.act.guard import Guard
from agent.act.node_client import NodeCapActuator
from agent.config import Config, TwinConfig
from agent.core.clock import Clock, SystemClock
from agent.core.errors import ConfigError
from agent.core.gpu_models import BUILTIN_MODELS
from agent.core.intents import Intent
from agent.core.protocols import TelemetrySource
from agent.loop import Loop
from agent.observe.prometheus import PrometheusSettings, PrometheusSource
from agent.orient.groups import GroupSpec, expand_nodes
from agent.orient.orienter import Orienter
from agent.sim.adapters import TwinCapActuator, TwinClock, TwinPlacement, TwinSource
from agent.sim.faults import parse_fault
from agent.sim.twin import BudgetSchedule, Twin, TwinSpec
from policies.base import Policy, PolicySettings
from policies.registry import PolicyRegistry, default_registry


def twin_spec(cfg: TwinConfig) -> TwinSpec:
    """The twin a config describes."""
    budget: BudgetSchedule | None = None
    if cfg.budget_w is not None:
        budget = BudgetSchedule.constant(cfg.budget_w)
        if cfg.demand_response is not None:
            dr = cfg.demand_response
            budget = BudgetSchedule.demand_response(
                cfg.budget_w, dr.budget_w, dr.start_s, dr.duration_s
            )
    elif cfg.demand_response is not None:
        raise ConfigError("twin.demand_response: needs twin.budget_w (the normal budget)")
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


def prometheus_settings(config: Config) -> PrometheusSettings:
    """The Prometheus source a config describes (the budget query comes from `cluster`)."""
    p = config.source.prometheus
    return PrometheusSettings(
        url=p.url,
        timeout_s=p.timeout_s,
        retries=p.retries,
        scrape_interval_s=p.scrape_interval_s,
        staleness_s=p.staleness_s,
        inventory_window_s=p.inventory_window_s,
        metrics=dict(p.metrics),
        host_labels=tuple(p.host_labels),
        gpu_label=p.gpu_label,
        uuid_label=p.uuid_label,
        model_label=p.model_label,
        job_label=p.job_label,
        match=dict(p.match),
        budget_query=config.cluster.budget_query,
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
    )


def build_policies(
    names_and_settings: dict[str, PolicySettings], registry: PolicyRegistry
) -> list[Policy]:
    policies: list[Policy] = []
    for name, settings in names_and_settings.items():
        if settings.enabled:
            policies.append(registry.get(name)(settings))
    return policies


def dry_run_predicate(global_dry_run: bool, policies: Sequence[Policy]) -> Callable[[Intent], bool]:
    """Per intent: advise only? A policy's own `dry_run` setting overrides the global one."""
    own = {p.name: p.settings.dry_run for p in policies}

    def is_dry(intent: Intent) -> bool:
        value = own.get(intent.policy)
        return global_dry_run if value is None else bool(value)

    return is_dry


@dataclass
class Runtime:
    config: Config
    loop: Loop
    audit: AuditLog
    actuators: Actuators
    twin: Twin | None = None
    closers: list[Callable[[], Any]] = field(default_factory=list)

    def close(self) -> None:
        for close in reversed(self.closers):
            close()
        self.audit.close()


def build_runtime(
    config: Config,
    *,
    clock: Clock | None = None,
    registry: PolicyRegistry | None = None,
    audit: AuditLog | None = None,
    source: TelemetrySource | None = None,
    budget_w: float | None = None,
) -> Runtime:
    """Everything the config names, wired into one Loop. `source` and `budget_w` override it."""
    registry = registry or default_registry()
    audit = audit or AuditLog(path=config.audit.path)
    policies = build_policies(config.policy_settings, registry)
    twin: Twin | None = None
    actuators = Actuators()
    if config.source.kind == "twin" or "twin" in (
        config.actuators.caps,
        config.actuators.placement,
    ):
        twin = Twin(twin_spec(config.twin))
    closers: list[Callable[[], Any]] = []
    if source is None:
        if config.source.kind == "twin":
            assert twin is not None
            source = TwinSource(twin)
        elif config.source.kind == "prometheus":
            prometheus = PrometheusSource(prometheus_settings(config))
            closers.append(prometheus.close)
            source = prometheus
        else:
            raise ConfigError(f"source.kind: {config.source.kind!r} is not available yet")
    if config.actuators.caps == "twin":
        assert twin is not None
        actuators.caps = TwinCapActuator(twin)
    if config.actuators.caps == "node":
        assert config.actuators.node is not None  # the config validator insists
        node_caps = NodeCapActuator(config.actuators.node, clock=clock)
        actuators.caps = node_caps
        closers.append(node_caps.close)
    if config.actuators.placement == "twin":
        assert twin is not None
        actuators.placement = TwinPlacement(twin)
    if clock is None and config.source.kind == "prometheus":
        clock = SystemClock()  # Prometheus answers in Unix time, whatever acts
    if clock is None:
        if twin is None:
            raise ConfigError("a clock is needed when no twin is configured")
        clock = TwinClock(twin)
    budget = budget_w if budget_w is not None else config.cluster.budget_w
    loop = Loop(
        source=source,
        orienter=orienter_for(config),
        policies=policies,
        guard=Guard(config.guard),
        executor=Executor(
            actuators, dry_run_predicate(config.dry_run, policies), config.actuators.lease_s
        ),
        audit=audit,
        clock=clock,
        budget_w=budget,
        placement=actuators.placement,
        dry_run_caps=config.dry_run,
        interval_s=config.daemon.interval_s,
    )
    return Runtime(
        config=config, loop=loop, audit=audit, actuators=actuators, twin=twin, closers=closers
    )

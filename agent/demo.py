"""`ooda demo`: the twin and the agent together on the virtual clock, against an uncapped run and
the oracle from the same seed, and the KPIs an operator asks about."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.act.audit import AuditLog
from agent.act.executor import Actuators, Executor
from agent.act.guard import Guard, GuardSettings
from agent.core.gpu_models import BUILTIN_MODELS
from agent.core.intents import Outcome
from agent.loop import CycleReport, Loop
from agent.orient.orienter import Orienter
from agent.runtime import build_policies, dry_run_predicate
from agent.sim.adapters import TwinCapActuator, TwinClock, TwinPlacement, TwinSource
from agent.sim.faults import FaultSpec
from agent.sim.oracle import Oracle
from agent.sim.twin import BudgetSchedule, Twin, TwinSpec
from policies.base import PolicySettings
from policies.registry import PolicyRegistry, builtin_registry


@dataclass(frozen=True)
class DemoOptions:
    seed: int = 7
    duration_s: float = 7200.0
    interval_s: float = 15.0
    nodes: int = 8
    gpus_per_node: int = 8
    model: str = "H100"
    dry_run: bool = False
    normal_budget_frac: float = 0.92  # of the expected uncapped demand
    drop_budget_frac: float = 0.65
    faults: tuple[FaultSpec, ...] = ()
    audit_path: Path | None = None
    policies: tuple[str, ...] = (  # every built-in policy, safety first
        "power_budget",
        "thermal_guard",
        "health_drain",
        "energy_efficiency",
        "idle_powerdown",
        "placement",
    )


def uncapped_demand_w(spec: TwinSpec, duration_s: float) -> float:
    """The mean fleet draw of this twin (this seed) with no control: what a budget is sized on."""
    probe = Twin(spec)
    probe.run_until(duration_s)
    _t, fleet_w, _b, _w = probe.step_log()
    return float(fleet_w.mean()) if fleet_w.size else spec.expected_demand_w()


def demo_spec(opts: DemoOptions) -> TwinSpec:
    """The demo's twin: a budget a little under what this seed's cluster draws uncapped, and a
    demand-response drop mid-run. The budget follows the seed's realized demand (one uncapped
    pass first), so every seed shows a budget that really binds."""
    base = TwinSpec(
        nodes=opts.nodes,
        gpus_per_node=opts.gpus_per_node,
        model=BUILTIN_MODELS[opts.model],
        seed=opts.seed,
        faults=opts.faults,
    )
    demand = uncapped_demand_w(base, opts.duration_s)
    budget = BudgetSchedule.demand_response(
        normal_w=round(opts.normal_budget_frac * demand, -1),
        drop_w=round(opts.drop_budget_frac * demand, -1),
        start_s=round(0.4 * opts.duration_s),
        duration_s=round(0.3 * opts.duration_s),
    )
    return TwinSpec(**{**base.__dict__, "budget": budget})


@dataclass
class RunKpis:
    violation_s: float
    work_gpu_s: float
    energy_kwh: float


def run_kpis(twin: Twin, interval_s: float) -> RunKpis:
    """Seconds above budget (not counting the first control interval after each budget change,
    when no controller could have reacted), work done and energy."""
    t, fleet, budget, work = twin.step_log()
    dt = np.diff(np.append(t, twin.t_s))
    over = np.isfinite(budget) & (fleet > budget)
    grace = np.zeros(t.shape, dtype=bool)
    if twin.spec.budget is not None:
        for change in twin.spec.budget.change_times():
            grace |= (t >= change) & (t < change + interval_s)
    return RunKpis(
        violation_s=float(dt[over & ~grace].sum()),
        work_gpu_s=float(work.sum()),
        energy_kwh=twin.energy_total_j / 3.6e6,
    )


def build_agent(
    twin: Twin,
    dry_run: bool,
    audit: AuditLog,
    registry: PolicyRegistry,
    policy_names: tuple[str, ...],
    settings: dict[str, PolicySettings] | None = None,
    guard: GuardSettings | None = None,
    interval_s: float = 15.0,
) -> tuple[Loop, Actuators]:
    """The agent wired to the twin: its telemetry, its caps and its scheduler."""
    actuators = Actuators(caps=TwinCapActuator(twin), placement=TwinPlacement(twin))
    chosen = {
        name: (settings or {}).get(name) or registry.get(name).Settings() for name in policy_names
    }
    policies = build_policies(chosen, registry)
    loop = Loop(
        source=TwinSource(twin),
        orienter=Orienter(node_overhead_w=twin.spec.node_overhead_w),
        policies=policies,
        guard=Guard(guard),
        executor=Executor(actuators, dry_run_predicate(dry_run, policies)),
        audit=audit,
        clock=TwinClock(twin),
        placement=actuators.node_states_reader(),
        dry_run_caps=dry_run,
        interval_s=interval_s,
    )
    return loop, actuators


def drive(twin: Twin, loop: Loop, duration_s: float, interval_s: float) -> list[CycleReport]:
    reports: list[CycleReport] = []
    next_cycle = 0.0
    while twin.t_s < duration_s - 1e-9:
        if twin.t_s >= next_cycle - 1e-9:
            reports.append(loop.cycle())
            next_cycle += interval_s
        twin.step(min(twin.spec.step_s, next_cycle - twin.t_s, duration_s - twin.t_s))
    return reports


def run_demo(opts: DemoOptions, registry: PolicyRegistry | None = None) -> dict[str, Any]:
    registry = registry or builtin_registry()
    spec = demo_spec(opts)
    started = time.perf_counter()

    uncapped = Twin(spec)
    uncapped.run_until(opts.duration_s)
    oracle_twin = Twin(spec)
    oracle_twin.run_until(opts.duration_s, control=Oracle())

    audit = AuditLog(path=opts.audit_path)
    twin = Twin(spec)
    loop, _ = build_agent(
        twin, opts.dry_run, audit, registry, opts.policies, interval_s=opts.interval_s
    )
    try:
        reports = drive(twin, loop, opts.duration_s, opts.interval_s)
    finally:
        audit.close()

    agent_k = run_kpis(twin, opts.interval_s)
    uncapped_k = run_kpis(uncapped, opts.interval_s)
    oracle_k = run_kpis(oracle_twin, opts.interval_s)

    applied: Counter[str] = Counter()
    recommendations: list[dict[str, Any]] = []
    for report in reports:
        for action in report.actions:
            if action.outcome is Outcome.APPLIED:  # counted per target (GPU, node or job)
                applied[str(action.intent.kind)] += len(getattr(action.intent, "targets", [None]))
            elif action.outcome is Outcome.RECORDED:
                for rec in action.intent.to_records():
                    rec.pop("evidence", None)
                    recommendations.append({"time_s": report.time_s, **rec})
    first = reports[0] if reports else None
    first_cycle = []
    if first is not None:
        for action in first.actions:
            for rec in action.intent.to_records():
                rec.pop("evidence", None)
                first_cycle.append(rec)
    budget = spec.budget
    assert budget is not None
    kinds = [
        "set_power_cap",
        "release_power_cap",
        "drain_node",
        "resume_node",
        "set_node_weight",
        "set_node_features",
        "requeue_job",
        "notify",
    ]
    return {
        "seed": opts.seed,
        "duration_s": opts.duration_s,
        "interval_s": opts.interval_s,
        "gpus": spec.n_gpus,
        "nodes": spec.nodes,
        "model": spec.model.name,
        "dry_run": opts.dry_run,
        "budget_w": {
            "normal": budget.steps[0][1],
            "drop": budget.steps[1][1],
            "drop_start_s": budget.steps[1][0],
            "drop_end_s": budget.steps[2][0],
        },
        "budget_violation_s": agent_k.violation_s,
        "throughput_vs_uncapped": _ratio(agent_k.work_gpu_s, uncapped_k.work_gpu_s),
        "throughput_vs_oracle": _ratio(agent_k.work_gpu_s, oracle_k.work_gpu_s),
        "energy_kwh": round(agent_k.energy_kwh, 3),
        "actions": {k: applied.get(k, 0) for k in kinds},
        "recommendations": recommendations,
        "first_cycle": first_cycle,
        "cycles": len(reports),
        "twin_caps_changed": int((twin.cap_w != twin.default_w).sum()),
        "uncapped": {
            "budget_violation_s": uncapped_k.violation_s,
            "energy_kwh": round(uncapped_k.energy_kwh, 3),
        },
        "oracle": {
            "budget_violation_s": oracle_k.violation_s,
            "energy_kwh": round(oracle_k.energy_kwh, 3),
            "throughput_vs_uncapped": _ratio(oracle_k.work_gpu_s, uncapped_k.work_gpu_s),
        },
        "audit_log": str(opts.audit_path) if opts.audit_path else None,
        "wall_s": round(time.perf_counter() - started, 2),
    }


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b > 0 and math.isfinite(a) else float("nan")

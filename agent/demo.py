"""`ooda demo`: the twin and the agent together on the virtual clock, against an uncapped run and
the oracle from the same seed, and the KPIs an operator asks about."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.act.audit import AuditLog
from agent.assembly import BUILTIN_POLICIES, drive, twin_agent
from agent.config import Config
from agent.core.gpu_models import BUILTIN_MODELS
from agent.core.intents import Outcome
from agent.sim.faults import FaultSpec
from agent.sim.kpis import RunKpis, run_kpis, uncapped_demand_w
from agent.sim.oracle import AGENT_MARGIN_FRAC, Oracle
from agent.sim.scenario import load_scenario, with_curves
from agent.sim.twin import BudgetSchedule, Twin, TwinSpec
from policies.registry import PolicyRegistry, builtin_registry, default_registry


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
    # The agent's configuration (groups, job priorities, rollout, orient, guard and the
    # policies' settings); its source and actuators are the twin. None: the defaults.
    config: Config | None = None
    policies: tuple[str, ...] = BUILTIN_POLICIES  # every built-in policy, safety first
    # "Your cluster": a scenario file (its twin, job mix, workloads, budget) and measured curves.
    scenario: Path | None = None
    curves: Path | None = None


# What `run_demo` tells of its progress: the part running now and the twin seconds it ran.
DemoProgress = Callable[[str, float], None]
DEMO_RUNS = 4  # the budget's sizing run, uncapped, the oracle, the agent: each `duration_s`


def _told(progress: DemoProgress | None, stage: str) -> Callable[[float], None] | None:
    return None if progress is None else lambda seconds: progress(stage, seconds)


def demo_spec(opts: DemoOptions, progress: DemoProgress | None = None) -> TwinSpec:
    """The demo's twin: a budget a little under what this seed's cluster draws uncapped, and a
    demand-response drop mid-run. The budget follows the seed's realized demand (one uncapped
    pass first), so every seed shows a budget that really binds. A scenario's own budget, when
    it has one, is kept."""
    base = TwinSpec(
        nodes=opts.nodes,
        gpus_per_node=opts.gpus_per_node,
        model=BUILTIN_MODELS[opts.model],
        seed=opts.seed,
        faults=opts.faults,
    )
    if opts.scenario is not None:
        base = load_scenario(opts.scenario, base)
    if opts.curves is not None:
        base = replace(base, **with_curves(base, opts.curves))
    if base.budget is not None:
        return base
    demand = uncapped_demand_w(base, opts.duration_s, _told(progress, "sizing the budget"))
    budget = BudgetSchedule.demand_response(
        normal_w=round(opts.normal_budget_frac * demand, -1),
        drop_w=round(opts.drop_budget_frac * demand, -1),
        start_s=round(0.4 * opts.duration_s),
        duration_s=round(0.3 * opts.duration_s),
    )
    return replace(base, budget=budget)


def demo_oracle(opts: DemoOptions) -> Oracle:
    """The oracle held to the budget as the agent is: its power_budget's margin (the
    configuration's, else the default); unweighted, as the throughput it is compared on."""
    settings = None if opts.config is None else opts.config.policy_settings.get("power_budget")
    return Oracle(margin_frac=float(getattr(settings, "margin_frac", AGENT_MARGIN_FRAC)))


def run_demo(
    opts: DemoOptions,
    registry: PolicyRegistry | None = None,
    progress: DemoProgress | None = None,
) -> dict[str, Any]:
    """The demo's four runs of the same seed (`progress`: told each one's twin seconds, in all
    DEMO_RUNS x duration_s) and what an operator asks of them."""
    registry = registry or (builtin_registry() if opts.config is None else default_registry())
    started = time.perf_counter()
    spec = demo_spec(opts, progress)

    uncapped = Twin(spec)
    uncapped.run_until(opts.duration_s, progress=_told(progress, "uncapped"))
    oracle_twin = Twin(spec)
    oracle_twin.run_until(
        opts.duration_s, control=demo_oracle(opts), progress=_told(progress, "the oracle")
    )

    twin = Twin(spec)
    agent = twin_agent(
        twin,
        opts.policies,
        registry=registry,
        dry_run=opts.dry_run,
        interval_s=opts.interval_s,
        audit=AuditLog(path=opts.audit_path),
        base=opts.config,
    )
    try:
        reports = drive(agent, opts.duration_s, _told(progress, "the agent"))
    finally:
        agent.close()

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
        "budget_w": _budget_summary(budget),
        "scenario": str(opts.scenario) if opts.scenario else None,
        "job_mix": spec.job_mix or None,
        "workloads": [name for name, _ in spec.mix],
        "budget_violation_s": agent_k.violation_s,
        "throughput_vs_uncapped": _ratio(agent_k.work_gpu_s, uncapped_k.work_gpu_s),
        "throughput_vs_oracle": _ratio(agent_k.work_gpu_s, oracle_k.work_gpu_s),
        "energy_kwh": round(agent_k.energy_kwh, 3),
        "tokens_per_joule": _tpj(agent_k),
        "actions": {k: applied.get(k, 0) for k in kinds},
        "recommendations": recommendations,
        "first_cycle": first_cycle,
        "cycles": len(reports),
        "twin_caps_changed": int((twin.cap_w != twin.default_w).sum()),
        "uncapped": {
            "budget_violation_s": uncapped_k.violation_s,
            "energy_kwh": round(uncapped_k.energy_kwh, 3),
            "tokens_per_joule": _tpj(uncapped_k),
        },
        "oracle": {
            "budget_violation_s": oracle_k.violation_s,
            "energy_kwh": round(oracle_k.energy_kwh, 3),
            "tokens_per_joule": _tpj(oracle_k),
            "throughput_vs_uncapped": _ratio(oracle_k.work_gpu_s, uncapped_k.work_gpu_s),
        },
        "audit_log": str(opts.audit_path) if opts.audit_path else None,
        "wall_s": round(time.perf_counter() - started, 2),
    }


def _budget_summary(budget: BudgetSchedule) -> dict[str, Any]:
    """The budget as the summary shows it: a demand-response drop, or its steps."""
    steps = budget.steps
    if len(steps) == 3 and steps[2][1] == steps[0][1] and steps[1][1] < steps[0][1]:
        return {
            "normal": steps[0][1],
            "drop": steps[1][1],
            "drop_start_s": steps[1][0],
            "drop_end_s": steps[2][0],
        }
    return {"normal": steps[0][1], "steps": [list(step) for step in steps]}


def _tpj(kpis: RunKpis) -> float | None:
    """The twin's inference services' tokens per joule; None (unknown) where it runs none."""
    value = kpis.tokens_per_joule
    return None if value is None else round(value, 4)


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b > 0 and math.isfinite(a) else float("nan")

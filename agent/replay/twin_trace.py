"""Recording a trace from the twin: what Prometheus would have stored had it scraped the twin's
exporters at every step, plus the scenario (ground truth: seed, budget, faults) in the metadata.

The twin runs alone (nothing changes its caps), or with the agent live in the loop: policies
acting on the twin every interval, as `ooda demo` runs them. The second gives a trace recorded
under a policy (cap changes to learn curves from), and, run again with another policy from the
same seed, the truth a replay's counterfactual is checked against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.act.audit import AuditLog
from agent.act.guard import GuardSettings
from agent.assembly import Agent, twin_agent
from agent.core.dcgm import DcgmField
from agent.core.snapshot import Snapshot
from agent.loop import CycleReport
from agent.observe.trace import TraceSummary, TraceWriter
from agent.sim.exporter import Counters, dcgm_snapshot, served_fields
from agent.sim.kpis import RunKpis, run_kpis
from agent.sim.twin import Twin, TwinSpec
from policies.base import PolicySettings
from policies.registry import PolicyRegistry, builtin_registry


def scenario_of(spec: TwinSpec) -> dict[str, Any]:
    """The twin's settings, faults and phases, JSON-ready (the trace's ground truth)."""
    out: dict[str, Any] = {
        "nodes": spec.nodes,
        "gpus_per_node": spec.gpus_per_node,
        "model": spec.model.name,
        "model_name": spec.model.model_name,
        "seed": spec.seed,
        "occupancy": spec.occupancy,
        "node_overhead_w": spec.node_overhead_w,
        "budget_steps": None if spec.budget is None else [list(s) for s in spec.budget.steps],
        "faults": [
            {
                "spec": str(f),
                "kind": str(f.kind),
                "target": f.target,
                "start_s": f.start_s,
                "duration_s": f.duration_s,
                "param": None if math.isnan(f.param) else f.param,
            }
            for f in spec.faults
        ],
    }
    if spec.phases.any:
        out["phases"] = spec.phases.as_dict()
    return out


@dataclass
class TwinRun:
    """A twin run: the twin at its end (its step log holds the truth), the agent's cycles (when
    policies ran live), the trace written (when recording) and the run's KPIs."""

    twin: Twin
    kpis: RunKpis
    reports: list[CycleReport] = field(default_factory=list)
    summary: TraceSummary | None = None


class ExporterView:
    """The twin through its exporters, as a TelemetrySource."""

    def __init__(self, twin: Twin, fields: Sequence[DcgmField]) -> None:
        self.twin = twin
        self.fields = tuple(fields)

    def observe(self, now_s: float) -> Snapshot:
        return dcgm_snapshot(self.twin, self.fields)


def run_twin(
    spec: TwinSpec,
    *,
    duration_s: float,
    step_s: float = 15.0,
    policies: Sequence[str] = (),
    settings: Mapping[str, PolicySettings] | None = None,
    guard: GuardSettings | None = None,
    interval_s: float = 15.0,
    record_to: Path | None = None,
    counters: Counters = "all",
    registry: PolicyRegistry | None = None,
    progress: Callable[[float], None] | None = None,
) -> TwinRun:
    """Run the twin for `duration_s` at a physics step of `step_s`, with `policies` live (every
    `interval_s`, acting on the twin's caps and scheduler), recording every step to `record_to`
    (`progress`: told the twin seconds run, step by step).

    A step is recorded before the agent's cycle at that time, as a scrape that lands just before
    the agent reads: the draw shown is the one the caps set in earlier cycles produced."""
    if step_s <= 0 or duration_s <= 0:
        raise ValueError("duration and step must be positive")
    if interval_s <= 0:
        raise ValueError("the control interval must be positive")
    spec = replace(spec, step_s=step_s)
    twin = Twin(spec)
    registry = registry or builtin_registry()
    fields = served_fields(counters)
    agent: Agent | None = None
    if policies:
        # The agent sees the twin as it would a cluster: through its exporters (the view the
        # trace records), not the twin's own arrays.
        agent = twin_agent(
            twin,
            policies,
            registry=registry,
            settings=settings,
            guard=guard,
            interval_s=interval_s,
            audit=AuditLog(),
            source=ExporterView(twin, fields),
        )
    writer = None
    if record_to is not None:
        scenario = scenario_of(spec)
        scenario["policies"] = list(policies)
        scenario["interval_s"] = interval_s
        writer = TraceWriter(
            record_to,
            time_base="twin",
            step_s=step_s,
            source={"kind": "twin", "counters": counters},
            metrics=[f.metric for f in fields],
            labels=tuple(twin.labels()),
            scenario=scenario,
        )
    reports: list[CycleReport] = []
    next_cycle = 0.0
    try:
        while twin.t_s < duration_s - 1e-9:
            if writer is not None:
                writer.append(dcgm_snapshot(twin, fields))
            if agent is not None and twin.t_s >= next_cycle - 1e-9:
                reports.append(agent.cycle())
                next_cycle += interval_s
            dt = min(step_s, duration_s - twin.t_s)
            twin.step(dt)
            if progress is not None:
                progress(dt)
        summary = writer.close() if writer is not None else None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return TwinRun(twin=twin, kpis=run_kpis(twin, interval_s), reports=reports, summary=summary)


def record_twin(
    spec: TwinSpec,
    path: Path,
    *,
    duration_s: float,
    step_s: float = 15.0,
    counters: Counters = "all",
    policies: Sequence[str] = (),
    settings: Mapping[str, PolicySettings] | None = None,
    guard: GuardSettings | None = None,
    interval_s: float = 15.0,
    progress: Callable[[float], None] | None = None,
) -> TraceSummary:
    """Record the twin (with `policies` live in the loop, if any) into a trace at `path`."""
    run = run_twin(
        spec,
        duration_s=duration_s,
        step_s=step_s,
        policies=policies,
        settings=settings,
        guard=guard,
        interval_s=interval_s,
        record_to=path,
        counters=counters,
        progress=progress,
    )
    assert run.summary is not None
    return run.summary

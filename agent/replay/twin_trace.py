"""Recording a trace from the twin: what Prometheus would have stored had it scraped the twin's
exporters at every step, plus the scenario (ground truth: seed, budget, faults) in the metadata."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.observe.trace import TraceSummary, TraceWriter
from agent.sim.exporter import Counters, dcgm_snapshot, served_fields
from agent.sim.twin import Twin, TwinSpec


def scenario_of(spec: TwinSpec) -> dict[str, Any]:
    """The twin's settings and faults, JSON-ready (the trace's ground truth)."""
    return {
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


def record_twin(
    spec: TwinSpec,
    path: Path,
    *,
    duration_s: float,
    step_s: float = 15.0,
    counters: Counters = "all",
) -> TraceSummary:
    """Run the twin for `duration_s` at a physics step of `step_s` and record every step."""
    if step_s <= 0 or duration_s <= 0:
        raise ValueError("duration and step must be positive")
    spec = replace(spec, step_s=step_s)
    twin = Twin(spec)
    fields = served_fields(counters)
    with TraceWriter(
        path,
        time_base="twin",
        step_s=step_s,
        source={"kind": "twin", "counters": counters},
        metrics=[f.metric for f in fields],
        labels=("priority",),
        scenario=scenario_of(spec),
    ) as writer:
        while twin.t_s < duration_s - 1e-9:
            writer.append(dcgm_snapshot(twin, fields))
            twin.step()
        return writer.close()

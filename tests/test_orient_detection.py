"""Detection quality on the twin, as the acceptance states it (a small run; bench/orient.py runs
more): every fault kind with precision and recall >= 0.9 and a median delay <= 2 cycles, while
the agent's power_budget policy moves caps all along."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from agent.act.audit import AuditLog
from agent.assembly import twin_agent
from agent.demo import DemoOptions, demo_spec
from agent.sim.faults import FaultKind, FaultSpec
from agent.sim.groundtruth import Recorder, random_faults, score
from agent.sim.twin import Twin
from policies.registry import builtin_registry

DURATION_S = 5400.0


@pytest.fixture(scope="module")
def run() -> tuple[Recorder, tuple[FaultSpec, ...]]:
    opts = DemoOptions(seed=11, duration_s=DURATION_S)
    spec = demo_spec(opts)
    faults = random_faults(
        np.random.default_rng(11),
        list(FaultKind),
        3,
        spec.nodes,
        spec.gpus_per_node,
        start_s=(1200.0, DURATION_S - 900.0),
        duration_s=600.0,
    )
    twin = Twin(replace(spec, faults=faults))
    loop = twin_agent(
        twin, ("power_budget",), registry=builtin_registry(), audit=AuditLog(path=None)
    ).loop
    rec = Recorder()
    next_cycle = 0.0
    while twin.t_s < DURATION_S - 1e-9:
        if twin.t_s >= next_cycle - 1e-9:
            rec.record(loop.cycle().situation, twin)
            next_cycle += opts.interval_s
        twin.step(min(twin.spec.step_s, next_cycle - twin.t_s))
    return rec, faults


@pytest.mark.parametrize("kind", list(FaultKind))
def test_each_fault_kind_is_detected(
    run: tuple[Recorder, tuple[FaultSpec, ...]], kind: FaultKind
) -> None:
    rec, faults = run
    result = score(rec, faults, kind, gpus_per_node=8)
    assert result.faults >= 2, result  # the run does exercise this kind
    assert result.precision >= 0.9, result
    assert result.recall >= 0.9, result
    assert result.median_delay_cycles <= 2, result


def test_the_scoring_counts_false_alarms() -> None:
    """The scorer itself: an alarm where no fault is, is a false episode; a miss is a miss."""
    rec = Recorder()
    times = [15.0 * k for k in range(10)]
    fault = FaultSpec(FaultKind.SPIKE, 1, 0, 30.0, 60.0, float("nan"))
    for t in times:
        kind = np.full(2, "", dtype="U16")
        if 45 <= t <= 60:
            kind[0] = "power"  # the fault, seen one cycle late
        if t == 120:
            kind[1] = "power"  # nothing there
        rec.times_s.append(t)
        rec.kind.append(kind)
        rec.xid_code.append(np.zeros(2, dtype=np.int64))
        rec.ecc.append(np.zeros(2, dtype=bool))
        rec.working.append(np.ones(2, dtype=bool))
    result = score(rec, [fault], FaultKind.SPIKE, gpus_per_node=2)
    assert result.precision == 0.5 and result.recall == 1.0
    assert result.median_delay_cycles == 2.0

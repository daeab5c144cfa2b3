"""One assembly: one config and one trace give the same decisions through `ooda run` (the daemon,
driven on a virtual clock over the trace), through `ooda replay` (its engine) and through the
policy test API. The config carries what the three once assembled differently: the rollout's
scope, the guard's and orient's settings, job priorities."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.core.clock import FakeClock
from agent.core.intents import Outcome
from agent.replay.engine import decision_records, replay_trace
from agent.replay.testing import record, replay
from agent.sim.faults import parse_fault
from agent.sim.twin import TwinSpec
from tests.daemon_helpers import START_UNIX, drive, in_process, write

pytestmark = pytest.mark.slow

STEP_S = 15.0
DURATION_S = 900.0


def _config(tmp_path: Path, trace: Path) -> Path:
    return write(
        tmp_path / "agent.toml",
        f"""
dry_run = true
[cluster]
name = "same"
job_priority = {{"10*" = 2}}
[source]
kind = "trace"
[source.trace]
path = "{trace}"
[actuators]
placement = "trace"
[policies.health_drain]
resume_hold_s = 120
[orient]
slow_models_every_cycles = 8
[orient.forecast]
enabled = false
[rollout]
nodes = "node[1-3]"
[guard]
node_cooldown_s = 120
[daemon]
interval_s = {STEP_S:g}
""",
    )


def _run(config: Path, state: Path, steps: int) -> tuple[list[dict[str, Any]], set[str]]:
    """The daemon over the trace: a cycle at its first step, then one every interval."""
    wall = FakeClock(START_UNIX)
    daemon = in_process(config, state, wall=wall)
    try:
        first = daemon.run_cycle()
        assert first is not None
        reports = [first, *drive(daemon, wall, steps - 1)]
    finally:
        daemon.shutdown()
    decisions = [
        record
        for report in reports
        for action in report.actions
        if action.outcome in (Outcome.APPLIED, Outcome.RECORDED)
        for record in decision_records(action, report.time_s)
    ]
    refused = {r.reason for report in reports for r in report.refused}
    return decisions, refused


def test_one_config_and_one_trace_give_the_same_decisions_three_ways(tmp_path: Path) -> None:
    spec = TwinSpec(
        nodes=4,
        gpus_per_node=4,
        seed=2,
        occupancy=1.0,
        median_job_s=7200.0,  # no job ends within the trace
        faults=(
            # In scope: drained, its job requeued, resumed after a healthy hold.
            parse_fault("xid=79:node2/gpu1@120+240"),
            parse_fault("xid=79:node4/gpu0@300"),  # out of the rollout's scope: refused
        ),
    )
    trace = record(spec, tmp_path / "trace.parquet", duration_s=DURATION_S, step_s=STEP_S)
    config = _config(tmp_path, trace)
    steps = round(DURATION_S / STEP_S)

    ran, refused = _run(config, tmp_path / "state", steps)
    replayed = replay_trace(trace, config=load_config(config), keep_decisions=True).sets[0]
    tested = replay(trace, config=config)

    assert [(d["t_s"], d["kind"], d["target"]) for d in ran] == [
        (135, "drain_node", "node2"),
        (135, "requeue_job", "1001"),
        (495, "resume_node", "node2"),
    ]
    assert not [d for d in ran if d["target"] == "node4"]  # out of scope, in every path
    assert any(r.startswith("out of scope") for r in refused)
    assert any(r.startswith("out of scope") for r in replayed.refusals)
    assert replayed.decisions == ran
    assert tested.decisions == ran

"""The agent's memory does not grow cycle after cycle once warmed up (a daemon runs for months).

Measured with tracemalloc (what Python allocated and still holds), not RSS, so it does not depend
on the allocator or on the machine's load. The twin (the simulated world, not the agent) and
threadpoolctl's path cache (bounded, filled as libraries load) are left out of the count.
"""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

from agent.assembly import Agent, assemble
from agent.config import parse_config
from agent.core.clock import FakeClock

NODES = 16  # 128 GPUs: the recorders' leak was about 200 bytes a GPU moved a cycle
WARM_CYCLES = 12
MEASURED_CYCLES = 18
INTERVAL_S = 15.0
NOT_THE_AGENT = (
    tracemalloc.Filter(False, "*/agent/sim/*", all_frames=True),
    tracemalloc.Filter(False, "*/threadpoolctl.py", all_frames=True),
    tracemalloc.Filter(False, tracemalloc.__file__),
)


def _dry_run(tmp_path: Path, clock: FakeClock) -> Agent:
    """A dry run over the twin whose caps move every cycle: no cooldown, a 1 W dead band, and
    the budget swinging between 60% and 90% of the fleet's draw. The forecasters' training
    sets are made small so that they are full after the warm-up (they are bounded, but by
    20,000 rows a horizon by default: hundreds of cycles)."""
    config = parse_config(
        {
            "dry_run": True,
            "twin": {"nodes": NODES, "gpus_per_node": 8, "seed": 1, "occupancy": 1.0},
            "guard": {"cap_cooldown_s": 0, "cap_dead_band_w": 1},
            "orient": {"forecast": {"horizons_s": [60.0], "train_rows": 100, "nodes_per_cycle": 8}},
            "audit": {"path": str(tmp_path / "audit.jsonl"), "max_bytes": 1 << 20, "keep": 2},
            "daemon": {"state_dir": str(tmp_path / "state")},
        }
    )
    return assemble(config, clock=clock)


def _agent_bytes() -> int:
    snapshot = tracemalloc.take_snapshot().filter_traces(NOT_THE_AGENT)
    return sum(trace.size for trace in snapshot.traces)


def test_a_dry_run_does_not_grow_after_warm_up(tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    runtime = _dry_run(tmp_path, clock)
    twin, loop = runtime.twin, runtime.loop
    assert twin is not None
    tracemalloc.start(8)
    try:
        moved, fleet_w, warm_bytes = 0, 0.0, 0
        for k in range(WARM_CYCLES + MEASURED_CYCLES + 1):
            if k == WARM_CYCLES:
                gc.collect()
                warm_bytes = _agent_bytes()
            report = loop.cycle()
            fleet_w = fleet_w or report.situation.fleet_power_w
            loop.budget_w = (0.6 + 0.3 * (k % 2)) * fleet_w
            if k >= WARM_CYCLES:
                moved += sum(len(getattr(a.intent, "targets", ())) for a in report.actions)
            del report
            twin.run_until(twin.t_s + INTERVAL_S)
            clock.advance(INTERVAL_S)
        gc.collect()
        grown = _agent_bytes() - warm_bytes
    finally:
        tracemalloc.stop()
        runtime.close()
    assert moved >= 50 * MEASURED_CYCLES  # the caps did move every cycle
    # Bounded learners still settle (a buffer doubling once is ~40 kB); keeping a cycle's
    # moves for good grew it ~400 kB here.
    assert grown < 1000 * NODES * 8, f"grew {grown} bytes over {MEASURED_CYCLES} cycles"


def test_the_dry_run_recorders_hold_the_last_cycle_only(tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    runtime = _dry_run(tmp_path, clock)
    try:
        twin, loop = runtime.twin, runtime.loop
        assert twin is not None
        recorded = runtime.actuators.recorded_caps.calls
        fleet_w = 0.0
        for k in range(3):
            report = loop.cycle()
            fleet_w = fleet_w or report.situation.fleet_power_w
            loop.budget_w = (0.6 + 0.3 * (k % 2)) * fleet_w
            cap_actions = [a for a in report.actions if hasattr(a.intent, "targets")]
            # This cycle's calls, one per cap action: none of the cycles before.
            assert len(recorded) == len(cap_actions)
            twin.run_until(twin.t_s + INTERVAL_S)
            clock.advance(INTERVAL_S)
        assert recorded
    finally:
        runtime.close()

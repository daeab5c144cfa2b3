"""A state file the agent wrote before the guard was split (commit 771d867, one `Guard` saved
under `guard`) still loads: a restart after the upgrade keeps the caps it owns and their
cooldowns, the circuit breaker, the drain and weight history, the pending settlement and the
node client's leases. The file: tests/fixtures/state/ (make_state_771d867.py says how)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from agent.act.node_client import NodeCapActuator
from agent.core.intents import DrainNode, GpuTargets, SetPowerCap
from agent.orient.orienter import Orienter
from tests.conftest import make_snapshot
from tests.daemon_helpers import gone, in_process, write

FIXTURE = Path(__file__).parent / "fixtures" / "state" / "lab.state.json"


def test_a_state_file_from_before_the_split_loads_whole(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    shutil.copy(FIXTURE, state / "lab.state.json")
    token = write(tmp_path / "token", "t" * 32)
    config = write(
        tmp_path / "agent.toml",
        f"""
dry_run = false
[cluster]
name = "lab"
[source]
kind = "prometheus"
[source.prometheus]
url = "http://127.0.0.1:1"
[actuators]
caps = "node"
[actuators.node]
endpoint_template = "unix:///run/ooda/{{node}}.sock"
token_file = "{token}"
[guard]
breaker_max_nodes = 1
breaker_max_pct = 100
node_cooldown_s = 0
""",
    )
    saved = json.loads(FIXTURE.read_text())["parts"]
    daemon = in_process(config, state)
    try:
        assert daemon.restored and daemon.state_problems == []
        agent = daemon.runtime
        ledger = agent.ledger
        uuids = np.array([f"GPU-{i:04d}" for i in range(5)])
        # Caps: node1's four live and ours; node2/gpu0's only recorded (advice).
        assert ledger.capped_by_us(uuids, recorded=False).tolist() == [True] * 4 + [False]
        assert ledger.capped_by_us(uuids, recorded=True).tolist() == [True] * 5
        pos, _ = ledger.caps.lookup(uuids[:4])
        assert ledger.caps["for_job"][pos].tolist() == ["100"] * 4
        # Their cooldown: a raise 15 s after they were set is refused; so is any drain, the
        # breaker being open.
        snap = make_snapshot([400.0] * 12, limit_w=[400.0] * 4 + [700.0] * 8, time_s=1015.0)
        sit = Orienter().orient(snap, None)
        raise_cap = SetPowerCap(
            policy="power_budget",
            reason="r",
            targets=GpuTargets.from_rows(snap, [0]),
            watts=np.array([600.0]),
        )
        drain = DrainNode(policy="health_drain", reason="ooda: health", node="node3")
        review = agent.loop.gate.review([raise_cap, drain], sit, 1015.0)
        assert [i.kind for i in review.allowed] == ["notify"]  # the open breaker's alarm
        assert [r.reason.split(" ")[0:2] for r in review.refused] == [
            ["cooldown:", "changed"],
            ["circuit", "breaker"],
        ]
        assert ledger.breaker.open and ledger.breaker.trips == 1
        assert ledger.drains == [(1005.0, "node1")] and ledger.steers == [(1005.0, "node3")]
        assert ledger.pending.keys.tolist() == ["node3/gpu0"]
        assert agent.loop.to_dict() == {"last_cycle_s": 1015.0}
        # The leases the node client renews.
        caps = agent.actuators.caps
        assert isinstance(caps, NodeCapActuator)
        leased, watts = caps.leased()
        assert (
            leased.names() == [f"node1/gpu{i}" for i in range(4)] and watts.tolist() == [400.0] * 4
        )
        # Saved again, the state has the same shape: the upgrade changes nothing on disk.
        again = json.loads(json.dumps(daemon.collect_state(), allow_nan=True))
        assert again["guard"] == json.loads(json.dumps(saved["guard"], allow_nan=True))
        assert set(again) >= {"loop", "guard", "caps"}
    finally:
        gone(daemon)
        daemon.runtime.close()

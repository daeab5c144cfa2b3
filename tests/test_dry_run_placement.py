"""Dry-run placement sees its own advice: the recorder lays the drains it recorded over the real
node states, so a dry-run advises the resume that a live run does (it used to drain and never
resume, since the real node was never drained)."""

from __future__ import annotations

from pathlib import Path

from agent.act.audit import read_records
from agent.act.executor import Actuators, RecordingPlacement
from agent.assembly import assemble
from agent.config import parse_config
from tests.fakes import FakePlacement


def real_placement() -> FakePlacement:
    """The real placement system: node3 drained by an admin, node9 unknown."""
    return FakePlacement({"node1": "", "node2": "", "node3": "admin: fan"})


NAMES = ["node1", "node2", "node3", "node9"]


def test_recorded_drains_show_as_ours_until_resumed() -> None:
    real = real_placement()
    recorder = RecordingPlacement(real)
    before = recorder.node_states(NAMES)
    assert before.drained.tolist() == [False, False, True, False]

    for node in ("node1", "node3", "node9"):
        recorder.drain(node, "ooda: health: gpu1 xid:79")
    states = recorder.node_states(NAMES)
    assert states.drained.tolist() == [True, False, True, False]
    assert states.drained_by_us.tolist() == [True, False, False, False]  # node3 stays the admin's
    assert states.reason.tolist() == ["ooda: health: gpu1 xid:79", "", "admin: fan", ""]
    assert not states.known[3]  # an unknown node is not made known

    recorder.resume("node1")
    after = recorder.node_states(NAMES)
    assert after.drained.tolist() == [False, False, True, False]
    assert not after.drained_by_us.any()
    assert real.changes == []  # nothing reached the real system
    assert [c[:2] for c in recorder.calls] == [
        ("drain", "node1"),
        ("drain", "node3"),
        ("drain", "node9"),
        ("resume", "node1"),
    ]


def test_without_a_real_placement_nothing_is_known() -> None:
    recorder = RecordingPlacement()
    recorder.drain("node1", "ooda: x")
    assert not recorder.node_states(["node1"]).drained.any()


def actions(tmp_path: Path, dry_run: bool) -> list[tuple[str, str, float, str]]:
    audit = tmp_path / f"audit-{dry_run}.jsonl"
    config = parse_config(
        {
            "dry_run": dry_run,
            "twin": {
                "nodes": 2,
                "gpus_per_node": 2,
                "seed": 3,
                "occupancy": 0.0,
                "faults": ["xid=79:node2/gpu1@30+60"],
            },
            "policies": {"health_drain": {"resume_hold_s": 60}},
            "guard": {"node_cooldown_s": 0},
            "audit": {"path": str(audit)},
        }
    )
    runtime = assemble(config)
    twin = runtime.twin
    assert twin is not None
    while twin.t_s < 300:
        twin.run_until(twin.t_s + 15)
        runtime.loop.cycle()
    runtime.close()
    return [
        (r["kind"], r["target"], r["time_s"], r["outcome"])
        for r in read_records(audit)
        if r["event"] == "action"
    ]


def test_dry_run_advises_the_resume_a_live_run_does(tmp_path: Path) -> None:
    live = actions(tmp_path, dry_run=False)
    dry = actions(tmp_path, dry_run=True)
    assert [(k, t) for k, t, _, _ in live] == [("drain_node", "node2"), ("resume_node", "node2")]
    assert [x[:3] for x in dry] == [x[:3] for x in live]
    assert {x[3] for x in live} == {"applied"} and {x[3] for x in dry} == {"recorded"}


def test_the_recorder_reads_the_live_placement_whenever_it_is_set() -> None:
    """The runtime sets the live placement after building the actuators: the dry-run recorder
    follows it, and the loop reads node states through the recorder only when there is one."""
    actuators = Actuators()
    assert actuators.node_states_reader() is None
    real = real_placement()
    actuators.placement = real
    assert actuators.recorded_placement.real is real
    assert actuators.node_states_reader() is actuators.recorded_placement
    assert Actuators(placement=real).recorded_placement.real is real
    actuators.placement = None
    assert actuators.recorded_placement.real is None and actuators.node_states_reader() is None

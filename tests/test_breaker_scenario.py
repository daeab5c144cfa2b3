"""A twin run in which 3 of 4 nodes fail (XID 79) under health_drain: the circuit breaker trips at
the configured limit, no more nodes are drained, it says so every cycle, and only a person's
reset (`ooda guard reset`, consumed by the running loop) lets it drain again. In dry-run the same
run records the same drains and changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.act.audit import AuditLog, read_records
from agent.act.guard import RESET_FILE, GuardSettings
from agent.assembly import twin_agent
from agent.cli import main
from agent.config import parse_config
from agent.loop import CycleReport, Loop
from agent.sim.faults import parse_fault
from agent.sim.twin import Twin, TwinSpec
from policies.registry import builtin_registry
from tests.fakes import HealthFromXid
from tests.test_rollback import FATAL

INTERVAL_S = 15.0


def run(twin: Twin, loop: Loop, until_s: float) -> list[CycleReport]:
    reports = []
    while twin.t_s < until_s:
        reports.append(loop.cycle())
        twin.run_until(twin.t_s + INTERVAL_S)
    return reports


def scenario(tmp_path: Path, dry_run: bool) -> tuple[Twin, Loop, Path, Path]:
    spec = TwinSpec(
        nodes=4,
        gpus_per_node=4,
        seed=2,
        occupancy=1.0,
        median_job_s=7200.0,
        faults=tuple(parse_fault(f"xid=79:node{k}/gpu1@60") for k in (1, 2, 3)),
    )
    twin = Twin(spec)
    audit_path = tmp_path / "audit.jsonl"
    state = tmp_path / "state"
    # The agent's own state directory: `ooda guard reset` requests come along with the config.
    base = parse_config({"daemon": {"state_dir": str(state)}}, builtin_registry())
    loop = twin_agent(
        twin,
        ("health_drain",),
        registry=builtin_registry(),
        dry_run=dry_run,
        audit=AuditLog(audit_path),
        guard=GuardSettings(breaker_max_nodes=2, breaker_max_pct=100, node_cooldown_s=0),
        interval_s=INTERVAL_S,
        base=base,
    ).loop
    # Orient's health classes are not merged yet.
    loop.orienter = HealthFromXid(fatal=FATAL, remediation="drain the node", since_known=False)
    assert loop.gate.reset_file == state / RESET_FILE
    config = tmp_path / "agent.toml"
    config.write_text(f'[audit]\npath = "{audit_path}"\n[daemon]\nstate_dir = "{state}"\n')
    return twin, loop, audit_path, config


def drains(reports: list[CycleReport], outcome: str) -> list[str]:
    return [
        a.intent.target_name()
        for r in reports
        for a in r.actions
        if a.intent.kind == "drain_node" and a.outcome == outcome
    ]


def test_breaker_trips_holds_and_a_reset_lets_it_drain_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    twin, loop, audit_path, config = scenario(tmp_path, dry_run=False)
    reports = run(twin, loop, 600)
    assert sorted(drains(reports, "applied")) == ["node1", "node2"]
    assert int(twin.node_drained.sum()) == 2 and not twin.node_drained[2]
    tripped = [r for r in reports if any("breaker tripped" in x.reason for x in r.refused)]
    assert len(tripped) == 1
    after = reports[reports.index(tripped[0]) :]
    assert len(after) > 30
    # Every cycle from the trip on: loud, and node3's drain refused.
    assert all(any("circuit breaker OPEN" in e for e in r.errors) for r in after)
    assert all(
        any(x.intent.target_name() == "node3" and "circuit breaker" in x.reason for x in r.refused)
        for r in after
    )

    assert main(["guard", "status", "--config", str(config), "--json"]) == 0
    status = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status["breaker"]["open"] and not status["reset_pending"]
    assert "node3" in status["breaker"]["last_trip"]["reason"]

    # A person resets it; the running loop applies the request at its next cycle.
    assert main(["guard", "reset", "--config", str(config), "--note", "checked", "--json"]) == 0
    reset = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reset["requested"] and not reset["applied"]
    assert (tmp_path / "state" / RESET_FILE).exists()
    reports = run(twin, loop, twin.t_s + 60)
    assert drains(reports, "applied") == ["node3"]
    assert twin.node_drained[:3].all() and not twin.node_drained[3]
    assert not any("OPEN" in e for e in reports[-1].errors)
    assert not (tmp_path / "state" / RESET_FILE).exists()

    assert main(["guard", "status", "--config", str(config), "--json"]) == 0
    status = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not status["breaker"]["open"] and not status["reset_pending"]

    loop.audit.close()
    events = [r["event"] for r in read_records(audit_path)]
    assert events.count("guard_breaker_tripped") == 1
    assert events.index("guard_reset_requested") < events.index("guard_reset")
    reset_event = next(r for r in read_records(audit_path) if r["event"] == "guard_reset")
    assert reset_event["was_open"] and reset_event["note"] == "checked"


def test_dry_run_records_the_same_drains_and_changes_nothing(tmp_path: Path) -> None:
    twin, loop, _, _ = scenario(tmp_path, dry_run=True)
    reports = run(twin, loop, 600)
    assert sorted(drains(reports, "recorded")) == ["node1", "node2"]  # the same as live
    assert not twin.node_drained.any()  # nothing changed in the scheduler
    assert loop.ledger.breaker.open
    assert any("node3" in x.intent.target_name() for r in reports for x in r.refused)

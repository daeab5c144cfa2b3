"""`ooda rollback`: what the agent did, found in the audit log and the placement system, undone
and audited, without the agent: on the twin (caps and drains set by a live run), and through
real node daemons on the twin's GPUs from a separate `ooda rollback` process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.act.audit import AuditLog, read_records
from agent.act.node_client import NodeCapActuator, NodeClientSettings
from agent.act.rollback import our_caps, plan_rollback, run_rollback
from agent.assembly import assemble
from agent.config import parse_config
from agent.core.clock import FakeClock
from agent.core.intents import Outcome
from agent.node.server import NodeDaemon, NodeSettings
from agent.sim.adapters import TwinPlacement, TwinSource
from agent.sim.devices import TwinNodeBackend
from agent.sim.twin import Twin, TwinSpec
from policies.power_budget import PowerBudget, PowerBudgetSettings
from tests.fakes import FakePlacement, HealthFromXid, make_loop
from tests.node_helpers import write_token

REPO = Path(__file__).resolve().parent.parent
FATAL = (48, 74, 79, 95)


def test_rollback_on_the_twin(tmp_path: Path) -> None:
    audit_path = tmp_path / "audit.jsonl"
    config = parse_config(
        {
            "dry_run": False,
            "cluster": {"budget_w": 6500},
            "twin": {
                "nodes": 4,
                "gpus_per_node": 4,
                "seed": 1,
                "occupancy": 1.0,
                "faults": ["xid=79:node2/gpu1@30"],
            },
            "policies": {"power_budget": {}, "health_drain": {"requeue": False}},
            "guard": {"breaker_max_pct": 100},
            "audit": {"path": str(audit_path), "max_bytes": 16384, "keep": 50},
            "daemon": {"state_dir": str(tmp_path / "state")},
        }
    )
    runtime = assemble(config)
    runtime.loop.orienter = HealthFromXid(
        fatal=FATAL, remediation="drain the node", since_known=False
    )
    twin = runtime.twin
    placement = runtime.actuators.placement
    caps = runtime.actuators.caps
    assert twin is not None and isinstance(placement, TwinPlacement) and caps is not None
    placement.drain("node4", "admin: PSU swap")  # someone else's drain: never undone by us
    try:
        for _ in range(12):
            runtime.loop.cycle()
            twin.run_until(twin.t_s + 15)
    finally:
        runtime.close()  # the agent is gone; its audit log and the twin remain
    assert np.any(twin.cap_w < twin.default_w)
    states = placement.node_states(["node2", "node4"])
    assert states.drained_by_us.tolist() == [True, False] and states.drained.tolist() == [True] * 2

    records = list(read_records(audit_path))
    targets, watts = our_caps(records)
    capped_rows = np.flatnonzero(twin.cap_w < twin.default_w)
    assert sorted(targets.names()) == sorted(
        f"{twin.node_names[twin.node_of[r]]}/gpu{twin.gpu_idx[r]}" for r in capped_rows
    )
    assert np.all(np.isfinite(watts)) and all(targets.uuid)

    # Dry-run first: everything audited as recorded, nothing changed.
    audit = AuditLog(audit_path)
    plan = plan_rollback(records, placement)
    assert plan.drained == ["node2"] and len(plan.caps) == len(capped_rows)
    before = twin.cap_w.copy()
    actions = run_rollback(
        plan,
        caps=caps,
        placement=placement,
        audit=audit,
        dry_run=True,
        now_s=twin.t_s,
        run_id="dry",
    )
    assert {a.outcome for a in actions} == {Outcome.RECORDED}
    assert np.array_equal(twin.cap_w, before) and placement.node_states(["node2"]).drained[0]

    actions = run_rollback(
        plan,
        caps=caps,
        placement=placement,
        audit=audit,
        dry_run=False,
        now_s=twin.t_s,
        run_id="live",
    )
    audit.close()
    assert {a.outcome for a in actions} == {Outcome.APPLIED}
    assert np.array_equal(twin.cap_w, twin.default_w)  # every cap we set, released
    states = placement.node_states(["node2", "node4"])
    assert states.drained.tolist() == [False, True]  # ours resumed, the admin's left alone
    assert states.reason.tolist()[1] == "admin: PSU swap"

    # Audited, one decision and one action each; and a second rollback finds nothing to do.
    records = list(read_records(audit_path))
    mine = [
        r
        for r in records
        if r.get("policy") == "rollback" and "-live-" in str(r.get("decision_id", ""))
    ]
    kinds = sorted((r["event"], r["kind"]) for r in mine)
    assert kinds == [
        ("action", "release_power_cap"),
        ("action", "resume_node"),
        ("decision", "release_power_cap"),
        ("decision", "resume_node"),
    ]
    assert [r["event"] for r in records].count("rollback") == 2
    again = plan_rollback(records, placement)
    assert len(again.caps) == 0 and again.drained == []


@pytest.fixture
def daemons() -> Iterator[tuple[Twin, Path, list[NodeDaemon]]]:
    root = Path(tempfile.mkdtemp(prefix="ooda-rb-"))  # short: Unix socket paths are limited
    twin = Twin(TwinSpec(nodes=3, gpus_per_node=4, seed=4, occupancy=1.0))
    write_token(root / "token")
    lock = threading.RLock()
    started: list[NodeDaemon] = []
    try:
        for k in (1, 2, 3):
            settings = NodeSettings(
                token_file=root / "token",
                socket_path=root / f"node{k}.sock",
                fallback_cap_w=300.0,
                check_interval_s=0.05,
            )
            started.append(NodeDaemon(TwinNodeBackend(twin, k), settings, lock=lock).start())
        yield twin, root, started
    finally:
        for daemon in started:
            daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.integration
def test_rollback_cli_through_real_node_daemons(
    daemons: tuple[Twin, Path, list[NodeDaemon]], tmp_path: Path
) -> None:
    twin, root, _ = daemons
    audit_path = tmp_path / "audit.jsonl"
    node_settings: dict[str, Any] = {
        "endpoints": {f"node{k}": f"unix://{root}/node{k}.sock" for k in (1, 2, 3)},
        "token_file": str(root / "token"),
        "timeout_s": 2.0,
    }
    # The agent: live caps through the node daemons, then it dies (its process memory gone).
    actuator = NodeCapActuator(NodeClientSettings.model_validate(node_settings))
    audit = AuditLog(audit_path)
    loop = make_loop(
        TwinSource(twin),
        [PowerBudget(PowerBudgetSettings())],
        caps=actuator,
        audit=audit,
        clock=FakeClock(0.0),
        budget_w=0.55 * twin.spec.expected_demand_w(),
    )
    report = loop.cycle()
    actuator.close()
    audit.close()
    assert any(a.outcome is Outcome.APPLIED for a in report.actions)
    capped = twin.cap_w < twin.default_w
    assert capped.any()

    config = tmp_path / "agent.toml"
    endpoints = ", ".join(f'{n} = "{u}"' for n, u in node_settings["endpoints"].items())
    config.write_text(
        'dry_run = false\n[source]\nkind = "twin"\n'
        f'[audit]\npath = "{audit_path}"\n'
        '[actuators]\ncaps = "node"\nplacement = "none"\n'
        f"[actuators.node]\nendpoints = {{ {endpoints} }}\n"
        f'token_file = "{root / "token"}"\n'
    )

    def rollback(*extra: str) -> dict[str, object]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "rollback",
                "--config",
                str(config),
                "--json",
                *extra,
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    dry = rollback("--dry-run")
    assert dry["caps_to_release"] == int(capped.sum()) and dry["failed"] == 0
    assert np.array_equal(twin.cap_w < twin.default_w, capped)  # nothing changed
    live = rollback()
    assert live["caps_to_release"] == int(capped.sum()) and live["failed"] == 0
    assert np.array_equal(twin.cap_w, twin.default_w)  # released on the GPUs, by the daemons
    assert "no placement actuator configured" in " ".join(live["notes"])  # type: ignore[arg-type]
    records = list(read_records(audit_path))
    applied = [
        r
        for r in records
        if r["event"] == "action" and r["policy"] == "rollback" and r["outcome"] == "applied"
    ]
    assert len(applied) == 1 and len(applied[0]["target"]) == int(capped.sum())
    assert rollback()["caps_to_release"] == 0  # nothing of ours left


def test_rollback_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import main

    config = tmp_path / "agent.toml"
    config.write_text('dry_run = true\n[source]\nkind = "twin"\n')
    assert main(["rollback", "--config", str(config)]) == 2
    assert "audit.path is not set" in capsys.readouterr().err
    assert main(["rollback", "--config", str(config), "--audit-log", str(tmp_path / "no")]) == 2
    assert "no audit log there" in capsys.readouterr().err


def test_rollback_plan_with_a_placement_that_cannot_list_nodes(tmp_path: Path) -> None:
    def drained(node: str) -> dict[str, object]:
        return {
            "event": "action",
            "kind": "drain_node",
            "outcome": "applied",
            "target": node,
            "dry_run": False,
        }

    records = [
        drained("n1"),
        drained("n2"),
        drained("n3"),
        {
            "event": "action",
            "kind": "drain_node",
            "outcome": "recorded",
            "target": "n4",
            "dry_run": True,
        },
    ]
    placement = FakePlacement(
        {"n1": "ooda: health: xid:79", "n2": "admin: reseat GPU", "n3": "", "n5": "ooda: x"}
    )
    plan = plan_rollback(records, placement, extra_nodes=["n5"])
    assert plan.drained == ["n1", "n5"]  # ours per the placement system, from the log or --node
    assert plan.skipped == [("n2", "drained by someone else now ('admin: reseat GPU')")]
    assert any("cannot list its nodes" in note for note in plan.notes)
    audit = AuditLog(tmp_path / "audit.jsonl")
    actions = run_rollback(
        plan, caps=None, placement=placement, audit=audit, dry_run=False, now_s=0.0
    )
    audit.close()
    assert placement.done("resume") == ["n1", "n5"] and len(actions) == 2
    assert all(a.outcome is Outcome.APPLIED for a in actions)

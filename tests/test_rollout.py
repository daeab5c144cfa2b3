"""The staged rollout: freeze windows (weekly with a zone, past midnight, one-off), advisory
actuator kinds, the dry-run predicate and its reasons, and the rollout wired through a config."""

from __future__ import annotations

import re
from datetime import datetime
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from agent.act.authority import Authority
from agent.act.executor import Actuators, Executor, RecordingCapActuator
from agent.act.rollout import FreezeWindow, Rollout, RolloutSettings
from agent.assembly import assemble
from agent.config import parse_config
from agent.core.clock import FakeClock
from agent.core.errors import ConfigError
from agent.core.intents import (
    DrainNode,
    GpuTargets,
    Notify,
    Outcome,
    RequeueJob,
    SetNodeWeight,
    SetPowerCap,
)

PARIS = ZoneInfo("Europe/Paris")


def at(text: str, zone: ZoneInfo = PARIS) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()


@pytest.mark.parametrize(
    ("spec", "when", "active"),
    [
        # 2025-03-03 is a Monday (winter time, UTC+1); 2025-07-07 too (summer time, UTC+2).
        ("Mon-Fri 08:00-10:00 Europe/Paris", "2025-03-03T08:00", True),
        ("Mon-Fri 08:00-10:00 Europe/Paris", "2025-03-03T09:59", True),
        ("Mon-Fri 08:00-10:00 Europe/Paris", "2025-03-03T10:00", False),
        ("Mon-Fri 08:00-10:00 Europe/Paris", "2025-03-03T07:59", False),
        ("Mon-Fri 08:00-10:00 Europe/Paris", "2025-07-07T08:30", True),
        ("Mon-Fri 08:00-10:00 Europe/Paris", "2025-03-08T08:30", False),  # Saturday
        ("Fri 22:00-02:00 Europe/Paris", "2025-03-07T23:00", True),  # Friday night
        ("Fri 22:00-02:00 Europe/Paris", "2025-03-08T01:59", True),  # ... into Saturday
        ("Fri 22:00-02:00 Europe/Paris", "2025-03-08T02:00", False),
        ("Fri 22:00-02:00 Europe/Paris", "2025-03-06T23:00", False),  # Thursday
        ("Fri-Mon 12:00-13:00 Europe/Paris", "2025-03-09T12:30", True),  # Sunday, wraps
        ("Fri-Mon 12:00-13:00 Europe/Paris", "2025-03-05T12:30", False),  # Wednesday
        ("Sat,Sun 00:00-24:00 Europe/Paris", "2025-03-09T23:59", True),
        ("daily 12:00-13:00 Europe/Paris", "2025-03-05T12:00", True),
        ("2025-12-24T18:00/2025-12-27T08:00 Europe/Paris", "2025-12-25T12:00", True),
        ("2025-12-24T18:00/2025-12-27T08:00 Europe/Paris", "2025-12-27T08:00", False),
        ("2025-12-24T17:00+00:00/2025-12-24T18:00+00:00", "2025-12-24T18:30", True),
    ],
)
def test_freeze_windows(spec: str, when: str, active: bool) -> None:
    assert FreezeWindow.parse(spec).active(at(when)) is active


def test_weekly_window_defaults_to_utc() -> None:
    window = FreezeWindow.parse("Mon 08:00-09:00")
    assert window.active(at("2025-03-03T08:30", ZoneInfo("UTC")))
    assert not window.active(at("2025-03-03T08:30"))  # 07:30 UTC


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("Mon-Fri 8-10", "expected 'DAYS HH:MM-HH:MM [ZONE]'"),
        ("Mun-Fri 08:00-10:00", "'mun-fri' is not a day or day range"),
        ("Mon 08:00-25:00", "'25:00' is not a time of day"),
        ("Mon 08:00-08:00", "starts and ends at the same time"),
        ("Mon 08:00-10:00 Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
        ("2025-12-27T08:00/2025-12-24T18:00", "ends before it starts"),
        ("2025-13-27T08:00/2025-12-24T18:00", "is not an ISO date-time"),
    ],
)
def test_bad_freeze_windows_name_the_window(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as exc:
        parse_config({"rollout": {"freeze": [spec]}})
    assert "rollout.freeze" in str(exc.value) and spec in str(exc.value)


def test_bad_scope_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"rollout\.nodes: bad node list 'node\[1-'"):
        parse_config({"rollout": {"nodes": "node[1-"}})
    with pytest.raises(ConfigError, match=r"rollout\.drains: Input should be 'live' or"):
        parse_config({"rollout": {"drains": "maybe"}})


def _cap() -> SetPowerCap:
    targets = GpuTargets(
        np.array(["node1"], dtype=np.str_), np.array([0]), np.array(["GPU-1"], dtype=np.str_)
    )
    return SetPowerCap(policy="power_budget", reason="r", targets=targets, watts=np.array([400.0]))


def test_dry_run_reasons_combine_policy_kind_and_freeze() -> None:
    clock = FakeClock(at("2025-03-03T12:00"))
    rollout = Rollout(
        RolloutSettings(drains="advisory", freeze=["Mon-Fri 08:00-10:00 Europe/Paris"]),
        clock=clock,
    )
    why = Authority(False, {"careful": True, "bold": False}, rollout).why
    cap = _cap()
    drain = DrainNode(policy="health_drain", reason="r", node="node1")
    weight = SetNodeWeight(policy="bold", reason="r", node="node1", weight=5)
    careful = RequeueJob(policy="careful", reason="r", job="1")
    note = Notify(policy="health_drain", reason="r", target="node1")
    assert [why(i) for i in (cap, drain, weight, careful, note)] == [
        None,
        "rollout: drains advisory",
        None,
        "policy careful: dry_run",
        None,
    ]
    # The global dry-run holds everything a policy does not take out of it.
    assert Authority(True, {"bold": False}, None).why(cap) == "dry_run"
    assert Authority(True, {"bold": False}, None).why(weight) is None
    # A freeze: everything advisory but notifications (unless told).
    clock.set(at("2025-03-03T09:00"))
    window = "freeze window 'Mon-Fri 08:00-10:00 Europe/Paris'"
    assert [why(i) for i in (cap, weight, note)] == [window, window, None]
    # Once pinned for a cycle, the answer holds for that cycle whatever the clock says.
    rollout.pin(at("2025-03-03T11:00"))
    assert why(cap) is None
    strict = Rollout(
        RolloutSettings(freeze=["daily 00:00-24:00"], notify_during_freeze=False), clock=clock
    )
    assert Authority(False, {}, strict).why(note) == "freeze window 'daily 00:00-24:00'"


def test_executor_records_why_it_only_advised() -> None:
    live = RecordingCapActuator()  # stands in for the live actuator: same protocol
    authority = Authority(False, {}, Rollout(RolloutSettings(caps="advisory")))
    executor = Executor(Actuators(caps=live), authority)
    (action,) = executor.execute([("d1", _cap())], lambda: "a1", 0.0)
    assert action.outcome is Outcome.RECORDED and action.dry_run
    assert action.detail == "advisory: rollout: caps advisory"
    assert live.calls == []  # the live actuator was never called


def _config(**rollout: object) -> dict[str, object]:
    return {
        "dry_run": False,
        "cluster": {"budget_w": 6500},
        "twin": {"nodes": 4, "gpus_per_node": 4, "seed": 1, "occupancy": 1.0},
        "policies": {"power_budget": {}},
        "actuators": {"placement": "none"},
        "daemon": {"state_dir": "/nonexistent/ooda-test"},
        "rollout": rollout,
    }


def test_caps_advisory_through_the_runtime() -> None:
    runtime = assemble(parse_config(_config(caps="advisory")))
    try:
        twin = runtime.twin
        assert twin is not None
        report = runtime.loop.cycle()
        recorded = [a for a in report.actions if a.intent.kind == "set_power_cap"]
        assert recorded and all(a.outcome is Outcome.RECORDED for a in recorded)
        assert recorded[0].detail == "advisory: rollout: caps advisory"
        assert np.all(twin.cap_w == twin.default_w)  # nothing changed on any GPU
    finally:
        runtime.close()


def test_scope_through_the_runtime() -> None:
    runtime = assemble(parse_config(_config(nodes="node[1-2]")))
    try:
        twin = runtime.twin
        assert twin is not None
        report = runtime.loop.cycle()
        applied = [a for a in report.actions if a.outcome is Outcome.APPLIED]
        touched = {str(n) for a in applied for n in a.intent.targets.node}  # type: ignore[attr-defined]
        assert touched and touched <= {"node1", "node2"}
        refused = {r.reason for r in report.refused}
        assert "out of scope: not in [rollout] nodes" in refused
        outside = np.isin(twin.node_names[twin.node_of], ["node3", "node4"])
        assert np.all(twin.cap_w[outside] == twin.default_w[outside])
    finally:
        runtime.close()


def test_freeze_through_the_runtime_then_live() -> None:
    clock = FakeClock(at("2025-03-03T08:30"))
    runtime = assemble(
        parse_config(_config(freeze=["Mon-Fri 08:00-10:00 Europe/Paris"])), clock=clock
    )
    try:
        twin = runtime.twin
        assert twin is not None
        report = runtime.loop.cycle()
        caps = [a for a in report.actions if a.intent.kind == "set_power_cap"]
        assert caps and all(a.outcome is Outcome.RECORDED for a in caps)
        assert "freeze window" in caps[0].detail
        assert np.all(twin.cap_w == twin.default_w)
        clock.set(at("2025-03-03T10:00"))
        report = runtime.loop.cycle()
        assert any(a.outcome is Outcome.APPLIED for a in report.actions)
        assert np.any(twin.cap_w < twin.default_w)
    finally:
        runtime.close()


def test_one_authority_answers_for_everyone_who_asks() -> None:
    """Live or advice, and why: the same answer for the gate, the executor and the audit log;
    replay's authority makes every intent advice, and the agent then counts recorded caps as
    its own (`dry_run`)."""
    cap = _cap()
    replaying = Authority(False, {"power_budget": False}, always="replay")
    assert replaying.why(cap) == "replay" and replaying.dry_run
    scoped = Authority(False, {}, Rollout(RolloutSettings(), ["node1", "node2"]))
    assert not scoped.scope.everything and scoped.why(cap) is None
    assert Authority().scope.everything and not Authority().advisory(cap)

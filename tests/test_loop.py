from __future__ import annotations

import io
import json
from typing import ClassVar

import numpy as np
from pydantic import Field

from agent.act.audit import AuditLog
from agent.act.executor import Actuators, Executor, RecordingCapActuator
from agent.core.clock import FakeClock
from agent.core.errors import TelemetryError
from agent.core.intents import Action, GpuTargets, Intent, Outcome, SetPowerCap
from agent.core.situation import Situation
from agent.loop import Loop
from policies.base import BasePolicy, Decision, PolicyMemory, PolicySettings
from policies.power_budget import PowerBudget, PowerBudgetSettings
from tests.conftest import make_snapshot
from tests.fakes import AdoptingCaps, FakeSource, RenewingCaps, TimingOutCaps, make_loop


class Exploding(BasePolicy[PolicySettings, PolicyMemory]):
    name: ClassVar[str] = "exploding"

    def decide(
        self, situation: Situation, memory: PolicyMemory, now_s: float
    ) -> Decision[PolicyMemory]:
        raise RuntimeError("bug in a plug-in")


def build(
    source: FakeSource, dry_run: bool = False
) -> tuple[Loop, io.StringIO, RecordingCapActuator]:
    stream = io.StringIO()
    live = RecordingCapActuator()  # stands in for a real cap actuator: same protocol
    loop = make_loop(
        source,
        [Exploding(PolicySettings()), PowerBudget(PowerBudgetSettings())],
        dry_run=dry_run,
        caps=live,
        audit=AuditLog(stream=stream),
        budget_w=3000.0,
    )
    return loop, stream, live


def events(stream: io.StringIO) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_outage_is_explicit_and_the_loop_lives_on() -> None:
    snap = make_snapshot([600.0] * 8, time_s=500)
    loop, _stream, live = build(
        FakeSource([TelemetryError("http://prom:9090: connection refused"), snap])
    )
    report = loop.cycle()
    assert report.snapshot.n_gpus == 0
    assert any("connection refused" in e for e in report.errors)
    assert report.actions == [] and live.calls == []  # nothing proposed for what cannot be seen
    report = loop.cycle()
    assert report.snapshot.n_gpus == 8
    assert any("exploding failed" in e for e in report.errors)  # one broken policy, others run
    assert any(
        isinstance(a.intent, SetPowerCap) and a.outcome is Outcome.APPLIED for a in report.actions
    )


def test_every_decision_and_action_is_audited() -> None:
    snap = make_snapshot([600.0] * 8, time_s=500)
    loop, stream, _ = build(FakeSource([snap]))
    report = loop.cycle()
    evs = events(stream)
    decisions = [e for e in evs if e["event"] == "decision"]
    actions = [e for e in evs if e["event"] == "action"]
    assert len(decisions) == len(report.intents) >= 1
    assert len(actions) == len(report.actions) >= 1
    decision_ids = {d["decision_id"] for d in decisions}
    for a in actions:
        assert a["decision_id"] in decision_ids
        assert {"action_id", "policy", "target", "before", "after", "dry_run", "evidence"} <= set(a)
    assert set(report.stage_s) == {"observe", "orient", "decide", "guard", "act"}


def test_dry_run_records_through_the_same_path() -> None:
    snap = make_snapshot([600.0] * 8, time_s=500)
    loop, stream, live = build(FakeSource([snap]), dry_run=True)
    report = loop.cycle()
    assert live.calls == []  # the live actuator is never touched
    assert report.actions and all(
        a.outcome is Outcome.RECORDED and a.dry_run for a in report.actions
    )
    recorded = loop.executor.actuators.recorded_caps.calls
    assert recorded and recorded[0][0] == "set"
    assert all(e["dry_run"] for e in events(stream) if e["event"] == "action")


def test_policy_memory_is_kept_between_cycles() -> None:
    snap = make_snapshot([100.0] * 4, time_s=500, limit_w=400.0)
    loop, _, _ = build(FakeSource([snap, snap]))
    loop.budget_w = 100_000.0
    loop.cycle()
    assert loop.memory["power_budget"].fits_since_s == 500.0  # type: ignore[attr-defined]


def _unused(x: list[Intent]) -> np.ndarray:  # keep imports honest for type checkers
    return np.zeros(len(x))


def test_leases_are_renewed_every_live_cycle_and_failures_reported() -> None:
    snap = make_snapshot([100.0] * 4, time_s=500)
    loop, _, _ = build(FakeSource([snap, snap]))
    caps = RenewingCaps()
    loop.executor.actuators.caps = caps
    loop.cycle()
    assert caps.renewals == [loop.executor.lease_s]
    caps.fail = True
    report = loop.cycle()
    assert any("lease renewal failed: node3 unreachable" in e for e in report.errors)


def test_dry_run_renews_nothing() -> None:
    snap = make_snapshot([100.0] * 4, time_s=500)
    loop, _, _ = build(FakeSource([snap]), dry_run=True)
    caps = RenewingCaps()
    loop.executor.actuators.caps = caps
    loop.cycle()
    assert caps.renewals == []


def test_caps_found_after_a_restart_are_settled_against_telemetry_and_leased_again() -> None:
    # node1/gpu0 is at the cap the log says we set; node1/gpu1 is not (never set, or changed
    # since); node1/gpu2 was released and is at its default; node9/gpu0 is not seen.
    snap = make_snapshot([300.0] * 4, limit_w=[300.0, 700.0, 700.0, 700.0], time_s=500)
    loop, _, _ = build(FakeSource([snap]))
    caps = AdoptingCaps()
    loop.executor.actuators.caps = caps
    names = np.array(["node1/gpu0", "node1/gpu1", "node1/gpu2", "node9/gpu0"])
    loop.ledger.remember_pending(
        names, np.array([300.0, 320.0, np.nan, 300.0]), np.array([490.0, 490.0, 490.0, 490.0])
    )
    ours = SetPowerCap(  # the cap the release ended was ours
        policy="p", reason="r", targets=GpuTargets.from_rows(snap, [2]), watts=np.array([250.0])
    )
    loop.ledger.record(Action("a0", "d0", ours, Outcome.APPLIED, False), 0.0)
    loop.cycle()
    assert caps.adopted == [(["node1/gpu0"], [300.0])]
    owned = loop.ledger.capped_by_us(snap.uuid, recorded=False)
    assert owned.tolist() == [True, False, False, False]
    slot = loop.ledger.caps.lookup(np.array(["GPU-0000"]))[0]
    assert loop.ledger.caps["last_change_s"][slot].tolist() == [490.0]  # cooldown from then
    assert loop.ledger.pending.keys.tolist() == ["node9/gpu0"]  # waits to be seen


def test_a_cap_call_that_failed_is_settled_against_telemetry_next_cycle() -> None:
    # Cycle 1 caps all 8 GPUs and every call fails. At cycle 2 node1's caps are in force (its
    # daemon acted, then timed out answering); node2's are not.
    first = make_snapshot([600.0] * 8, time_s=500)
    loop, stream, _ = build(FakeSource([first]))
    caps = TimingOutCaps()
    loop.executor.actuators.caps = caps
    loop.cycle()
    (_kind, targets, watts), *_ = caps.calls
    assert watts is not None and targets.names() == [
        f"node{i // 4 + 1}/gpu{i % 4}" for i in range(8)
    ]
    assert not loop.ledger.capped_by_us(first.uuid, recorded=False).any()
    in_force = [*watts[:4].tolist(), *[700.0] * 4]
    loop.source = FakeSource([make_snapshot([600.0] * 8, limit_w=in_force, time_s=515)])
    report = loop.cycle()
    assert report.settled == {"adopted": 4, "released": 0, "not_in_force": 0, "given_up": 0}
    (settled,) = [e for e in events(stream) if e.get("event") == "guard_caps_recovered"]
    assert settled["adopted"] == targets.names()[:4]
    assert settled["not_in_force"] == []  # failed, as the failed action says: no news
    assert caps.adopted == [(targets.names()[:4], watts[:4].tolist())]
    # Cycle 2 asked node2's caps again (their call failed again): pending until cycle 3,
    # which settles them with nothing to say (no event).
    assert loop.ledger.pending.keys.tolist() == targets.names()[4:]
    loop.source = FakeSource([make_snapshot([600.0] * 8, limit_w=in_force, time_s=530)])
    loop.executor.actuators.caps = AdoptingCaps()  # node2 answers now
    assert loop.cycle().settled == {}
    assert len(loop.ledger.pending) == 0
    assert len([e for e in events(stream) if e.get("event") == "guard_caps_recovered"]) == 1


def test_a_found_cap_is_matched_as_the_guard_clipped_it() -> None:
    # The log holds the policy's 150 W (a decision whose action was never recorded); the guard
    # sent the H100's 200 W floor, which is what telemetry shows.
    snap = make_snapshot([200.0] * 4, limit_w=[200.0, 700.0, 700.0, 700.0], time_s=500)
    loop, _, _ = build(FakeSource([snap]))
    caps = AdoptingCaps()
    loop.executor.actuators.caps = caps
    loop.ledger.remember_pending(np.array(["node1/gpu0"]), np.array([150.0]), np.array([490.0]))
    loop.cycle()
    assert caps.adopted == [(["node1/gpu0"], [200.0])]
    slot = loop.ledger.caps.lookup(np.array(["GPU-0000"]))[0]
    assert loop.ledger.caps["our_cap_w"][slot].tolist() == [200.0]
    # A change whose node is not seen at all waits.
    loop.ledger.remember_pending(np.array(["node9/gpu0"]), np.array([300.0]), np.array([495.0]))
    loop.cycle()
    assert loop.ledger.pending.keys.tolist() == ["node9/gpu0"]


class CapsJobA(BasePolicy[PolicySettings, PolicyMemory]):
    """Caps every GPU that runs job "a" (a stand-in for a per-job policy such as
    energy_efficiency)."""

    name: ClassVar[str] = "caps_job_a"

    def decide(
        self, situation: Situation, memory: PolicyMemory, now_s: float
    ) -> Decision[PolicyMemory]:
        snap = situation.snapshot
        rows = np.flatnonzero(snap.job == "a")
        if rows.size == 0:
            return Decision([], memory)
        intent = SetPowerCap(
            policy=self.name,
            reason="job a's cap",
            expires_s=now_s + 300.0,
            targets=GpuTargets.from_rows(snap, rows),
            watts=np.full(rows.size, 500.0),
        )
        return Decision([intent], memory)


def test_a_cap_chosen_for_a_job_is_released_when_the_next_job_arrives() -> None:
    before = make_snapshot([600.0] * 4, jobs=["a", "a", "c", "c"])
    capped = [500.0, 500.0, 700.0, 700.0]
    after = make_snapshot([480.0] * 4, limit_w=capped, jobs=["b", "a", "c", "c"])
    live = RecordingCapActuator()
    clock = FakeClock(500.0)
    loop = make_loop(
        FakeSource([before, after, after]), [CapsJobA(PolicySettings())], caps=live, clock=clock
    )
    loop.cycle()
    assert [(kind, t.uuid.tolist()) for kind, t, _ in live.calls] == [
        ("set", ["GPU-0000", "GPU-0001"])
    ]
    clock.advance(120.0)  # past the cooldown on raising a cap
    report = loop.cycle()
    # GPU 0 now runs job b: job a's cap goes; GPU 1 still runs job a and keeps it.
    done = [(a.intent.policy, a.intent.targets.uuid.tolist()) for a in report.actions]
    assert done == [("ownership", ["GPU-0000"])]
    assert live.calls[-1][0] == "release"
    clock.advance(15.0)
    assert not loop.cycle().actions  # released once, not again


class HoldMemory(PolicyMemory):
    since_s: float | None = None
    held_s: dict[str, float] = Field(default_factory=dict)
    note: dict[str, float] = Field(default_factory=dict)  # not a time: kept as it is


class Holds(BasePolicy[PolicySettings, HoldMemory]):
    """Remembers what it was given (a stand-in for a policy with hold timers)."""

    name: ClassVar[str] = "holds"
    seen: ClassVar[list[HoldMemory]] = []

    def decide(
        self, situation: Situation, memory: PolicyMemory, now_s: float
    ) -> Decision[HoldMemory]:
        assert isinstance(memory, HoldMemory)
        Holds.seen.append(memory)
        return Decision([], memory)


def test_policy_holds_restart_from_now_when_the_clock_goes_back() -> None:
    """As the guard's cooldowns: a hold remembered at 10,000 s must not last until the clock,
    set back to 500 s, catches up."""
    snap = make_snapshot([600.0] * 4, time_s=500)
    clock = FakeClock(10_000.0)
    loop = make_loop(
        FakeSource([snap, snap]),
        [Holds(PolicySettings())],
        caps=RecordingCapActuator(),
        clock=clock,
    )
    Holds.seen.clear()
    loop.memory["holds"] = HoldMemory(
        since_s=9_990.0, held_s={"node1": 9_000.0, "node2": 100.0}, note={"x": 9_999.0}
    )
    loop.cycle()
    assert Holds.seen[-1].since_s == 9_990.0  # time went forward: nothing changes
    clock.set(500.0)
    report = loop.cycle()
    assert any("the clock went back 9500 s" in e for e in report.errors), report.errors
    given = Holds.seen[-1]
    assert given.since_s == 500.0
    assert given.held_s == {"node1": 500.0, "node2": 100.0}
    assert given.note == {"x": 9_999.0}


def test_every_builtin_memory_pulls_its_times_back() -> None:
    from policies.curve_exploration import CurveExplorationMemory, Exploring
    from policies.health_drain import HealthDrainMemory
    from policies.placement import PlacementMemory
    from policies.power_budget import PowerBudgetMemory

    step = Exploring(
        job="j", uuid="u", node="n", gpu=0, since_s=900.0, cap_w=400.0, restore_default=True,
        given_back_s=950.0, share_lo=0.9,
    )  # fmt: skip
    memory = CurveExplorationMemory(active=(step,), last_explored_s={"j": 990.0, "k": 10.0})
    back = memory.clock_went_back(100.0)
    assert back.active[0].since_s == back.active[0].given_back_s == 100.0
    assert back.active[0].share_lo == 0.9 and back.active[0].cap_w == 400.0
    assert back.last_explored_s == {"j": 100.0, "k": 10.0}
    drain = HealthDrainMemory(healthy_since_s={"n": 500.0}, requeued_at_s={"7": 50.0})
    assert drain.clock_went_back(100.0).healthy_since_s == {"n": 100.0}
    assert drain.clock_went_back(100.0).requeued_at_s == {"7": 50.0}
    # Only field names say what is a time: a node called "rack_s" keeps its weight.
    placement = PlacementMemory(original_weight={"rack_s": 50, "n": 7}, marked=["rack_s"])
    assert placement.clock_went_back(5.0) == placement
    assert PowerBudgetMemory(fits_since_s=None).clock_went_back(1.0).fits_since_s is None
    assert PowerBudgetMemory(fits_since_s=5.0).clock_went_back(1.0).fits_since_s == 1.0


def test_an_unexpected_actuator_error_fails_that_intent_only() -> None:
    """A bug-shaped failure (not an OodaError) in one actuator call is that intent's FAILED
    action: the caps applied before it in the same call keep their actions (audit, ownership,
    cooldowns), and nothing escapes the executor."""
    from agent.core.intents import Notify, Severity

    class BrokenNotifier:
        def notify(self, intent: Notify) -> None:
            raise ValueError("Out of range float values are not JSON compliant")

    live = RecordingCapActuator()
    executor = Executor(Actuators(caps=live, notifier=BrokenNotifier()))
    snap = make_snapshot([500.0])
    targets = GpuTargets.from_rows(snap, [0])
    cap = SetPowerCap(policy="p", reason="r", targets=targets, watts=np.array([400.0]))
    note = Notify(policy="p", reason="r", target="cluster", severity=Severity.WARNING)
    ids = iter(range(10))
    actions = executor.execute([("d1", cap), ("d2", note)], lambda: f"a{next(ids)}", 0.0)
    assert [a.outcome for a in actions] == [Outcome.APPLIED, Outcome.FAILED]
    assert actions[1].detail == (
        "unexpected ValueError: Out of range float values are not JSON compliant"
    )

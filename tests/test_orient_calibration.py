"""The live loop's calibration (agent.orient.stream over each GPU's residuals): a swing that is
a GPU's normal life (a checkpoint stall every few minutes) stops alarming once seen, while the
same swing on a GPU that never had it, and every limit, still alarm; the per-GPU alarm budget
holds back floods of statistical alarms, never a limit."""

from __future__ import annotations

from agent.orient.orienter import Orienter
from agent.orient.settings import AnomalySettings, OrientSettings
from tests.test_orient_anomaly import Fleet

STALL_EVERY = 24  # cycles (6 minutes at 15 s)
STALL_CYCLES = 3


def stalled_fleet_run(calibrate: bool, cycles: int = 480) -> tuple[list[int], list[int]]:
    """GPU 0 (job 100) stalls for 45 s every 6 minutes, its draw and utilization near idle (a
    checkpoint); GPU 5 stalls once, at the end. Returns the cycles each was flagged in."""
    fleet = Fleet(seed=3)
    settings = OrientSettings(anomaly=AnomalySettings(calibrate=calibrate))
    orienter = Orienter(settings=settings)
    fleet.warm(orienter, cycles=60)
    fleet.cap[:] = 700.0  # uncapped from here: a drop is the GPU's own
    for _ in range(40):
        orienter.orient(fleet.step(), None)
    natural = fleet.natural.copy()
    flagged: dict[int, list[int]] = {0: [], 5: []}
    for c in range(cycles):
        stall0 = c % STALL_EVERY < STALL_CYCLES
        stall5 = c >= cycles - STALL_CYCLES
        fleet.natural = natural.copy()
        fleet.natural[0] = 0.25 * natural[0] if stall0 else natural[0]
        fleet.natural[5] = 0.25 * natural[5] if stall5 else natural[5]
        sit = orienter.orient(fleet.step(), None)
        assert sit.anomalies is not None
        for gpu, cycles_flagged in flagged.items():
            if sit.anomalies.flagged[gpu]:
                cycles_flagged.append(c)
    return flagged[0], flagged[5]


def test_a_gpus_routine_stalls_stop_alarming_once_learned() -> None:
    routine, once = stalled_fleet_run(calibrate=True)
    # The first stall alarms; after an hour of them (ten), none does.
    assert routine and min(routine) < STALL_CYCLES
    assert not [c for c in routine if c >= 240]
    # The same stall on a GPU that never had one is an anomaly.
    assert once


def test_without_calibration_every_stall_alarms() -> None:
    routine, once = stalled_fleet_run(calibrate=False, cycles=240)
    stalls_seen = {c // STALL_EVERY for c in routine}
    assert len(stalls_seen) >= 8  # nearly every one of the ten
    assert once


def test_the_alarm_budget_holds_a_flood_but_never_a_limit() -> None:
    fleet = Fleet(seed=4)
    # (Without calibration, which would learn the repeated surge: the budget on its own.)
    budget = AnomalySettings(calibrate=False, alarms_per_hour=2.0, alarm_burst=1.0)
    orienter = Orienter(settings=OrientSettings(anomaly=budget))
    fleet.warm(orienter, cycles=60)
    fleet.cap[:] = 700.0
    for _ in range(40):
        orienter.orient(fleet.step(), None)
    episodes = 0
    was = False
    over_cap_flags = 0
    for c in range(120):  # 30 minutes: a short surge (below the cap) every 10 cycles
        fleet.extra_w[:] = 0.0
        fleet.extra_w[12] = 150.0 if c % 10 == 0 else 0.0  # GPU 12 draws 400 W of 700
        if c == 115:
            fleet.cap[8] = 300.0
            fleet.extra_w[8] = 200.0  # past its cap: a limit
        sit = orienter.orient(fleet.step(), None)
        assert sit.anomalies is not None
        now = bool(sit.anomalies.flagged[12])
        episodes += now and not was
        was = now
        over_cap_flags += bool(sit.anomalies.flagged[8])
    assert 1 <= episodes <= 2  # the burst, then one an hour (30 minutes: at most one more)
    assert orienter.anomaly.held_alarms >= 5
    assert over_cap_flags >= 1

"""The built-in policies on hand-built situations (replay tests on the twin live elsewhere)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from agent.core.gpu_models import BUILTIN_MODELS
from agent.core.intents import (
    DrainNode,
    Notify,
    ReleasePowerCap,
    RequeueJob,
    ResumeNode,
    SetNodeWeight,
    SetPowerCap,
)
from agent.core.situation import (
    AnomalyFlags,
    CurveEstimates,
    HealthSeverity,
    HealthStatus,
    NodeStates,
    Situation,
)
from agent.core.snapshot import Metric, Snapshot
from agent.orient.orienter import Orienter, cap_bounds
from policies.base import PolicyMemory
from policies.energy_efficiency import EnergyEfficiency, EnergyEfficiencySettings
from policies.health_drain import HealthDrain, HealthDrainMemory, HealthDrainSettings
from policies.idle_powerdown import IdlePowerdown, IdlePowerdownSettings
from policies.placement import Placement, PlacementMemory, PlacementSettings
from policies.thermal_guard import ThermalGuard, ThermalGuardMemory, ThermalGuardSettings
from tests.conftest import make_snapshot


def orient(snap: Snapshot) -> Situation:
    return Orienter().orient(snap, None)


def with_temp(snap: Snapshot, temps: list[float]) -> Snapshot:
    values = dict(snap.values)
    values[Metric.TEMP_C] = np.asarray(temps, dtype=float)
    return replace(snap, values=values)


def only(intents: object, kind: type) -> list:  # type: ignore[type-arg]
    return [i for i in intents if isinstance(i, kind)]  # type: ignore[attr-defined]


def test_priority_labels_read_as_small_integers_and_odd_text_as_zero() -> None:
    """A label is anyone's text: digits that are not ASCII-decimal, or a number that overflows,
    read as class 0 rather than stopping orient."""
    snap = make_snapshot([300.0] * 5)
    labels = {"priority": np.array(["2", "", "³", "9" * 20, "low"], dtype=np.str_)}
    situation = orient(replace(snap, labels=labels))
    assert situation.priority.tolist() == [2, 0, 0, 0, 0]


def test_cap_bounds_come_from_telemetry_else_from_the_model_table() -> None:
    h100 = BUILTIN_MODELS["H100"]
    snap = make_snapshot([300.0, 300.0])  # no cap range in telemetry: the model's
    _cur, lo, hi, default = cap_bounds(snap)
    assert lo.tolist() == [h100.min_cap_w] * 2 and hi.tolist() == [h100.max_cap_w] * 2
    assert default.tolist() == [h100.default_cap_w] * 2
    values = dict(snap.values)
    values[Metric.MAX_LIMIT_W] = np.array([650.0, np.nan])
    reported = replace(snap, values=values, valid={m: np.isfinite(v) for m, v in values.items()})
    _cur, lo, hi, _default = cap_bounds(reported)
    assert hi.tolist() == [650.0, h100.max_cap_w]  # where reported, telemetry wins
    hi[0] = 1.0  # the caller's own array: the table is not changed
    assert cap_bounds(snap)[2].tolist() == [h100.max_cap_w] * 2
    unknown = replace(snap, model=np.array(["Some GPU", "Some GPU"]))
    assert np.isnan(cap_bounds(unknown)[1]).all()


# -- idle_powerdown --------------------------------------------------------------------------


def test_a_gpu_whose_power_is_missing_is_not_idle() -> None:
    """A running GPU whose power reading is missing (an exporter hiccup) is not known to be
    idle, however long it lasts: idle_powerdown must not floor its cap."""
    orienter = Orienter()
    policy = IdlePowerdown(IdlePowerdownSettings(idle_after_s=120))
    for t in range(0, 600, 15):
        snap = make_snapshot(
            [float("nan"), 80.0], time_s=float(t), util_pct=[95, 0], jobs=["7", ""]
        )
        situation = orienter.orient(snap, None)
    assert situation.idle_s is not None
    assert np.isnan(situation.idle_s[0]) and situation.idle_s[1] >= 120.0
    caps = only(policy.decide(situation, PolicyMemory(), 600.0).intents, SetPowerCap)
    assert [c.targets.uuid.tolist() for c in caps] == [["GPU-0001"]]


def test_idle_powerdown_caps_lasting_idleness_and_restores_on_work() -> None:
    snap = make_snapshot(
        [80.0, 80.0, 500.0, 210.0], util_pct=[0, 0, 95, 95], jobs=["", "", "7", "8"]
    )
    sit = replace(
        orient(snap),
        idle_s=np.array([300.0, 30.0, 0.0, 0.0]),
        cap_w=np.array([700.0, 700.0, 700.0, 200.0]),
        capped_by_us=np.array([False, False, False, True]),
    )
    d = IdlePowerdown(IdlePowerdownSettings(idle_after_s=120)).decide(sit, PolicyMemory(), 1000)
    caps = only(d.intents, SetPowerCap)
    assert caps[0].targets.uuid.tolist() == ["GPU-0000"] and caps[0].watts.tolist() == [200.0]
    releases = only(d.intents, ReleasePowerCap)
    assert releases[0].targets.uuid.tolist() == ["GPU-0003"]  # work arrived at the floor


# -- energy_efficiency ------------------------------------------------------------------------


def curves_for(n: int, natural: float, a: float, b: float, confidence: float) -> CurveEstimates:
    return CurveEstimates(
        natural_w=np.full(n, natural),
        a=np.full(n, a),
        b=np.full(n, b),
        cap_draw_frac=np.full(n, 1.0),
        confidence=np.full(n, confidence),
        source=np.full(n, "learned"),
        natural_w_hi=np.full(n, natural),
    )


@pytest.mark.parametrize("objective", ["energy", "energy_delay"])
def test_energy_efficiency_respects_the_slowdown_bound(objective: str) -> None:
    from agent.core.curves import throughput_at_cap

    snap = make_snapshot([600.0] * 4)
    sit = replace(orient(snap), curves=curves_for(4, 600.0, 0.85, 1.58, 0.9))
    settings = EnergyEfficiencySettings(objective=objective, max_slowdown_frac=0.05)  # type: ignore[arg-type]
    d = EnergyEfficiency(settings).decide(sit, PolicyMemory(), 0)
    caps = only(d.intents, SetPowerCap)[0]
    t = throughput_at_cap(caps.watts, 600.0, 0.85, 1.58, 1.0)
    assert np.all(t >= 0.95 - 1e-3)  # within the slowdown bound
    assert np.all(caps.watts < 600.0)  # and it does save
    assert np.all(caps.evidence["expected_energy_saving"] > 0.02)


def test_energy_efficiency_keeps_the_bound_where_the_cap_draw_share_is_not_learned() -> None:
    from agent.core.curves import LOWEST_CAP_DRAW_FRAC, throughput_at_cap

    # Never seen under a binding cap: orient hands out its budget prior (the whole cap).
    sit = orient(make_snapshot([600.0] * 4))
    assert np.all(sit.curves.cap_draw_frac == 1.0)
    # A job whose curve is learned (a requeued job: same id, new GPUs), the most sensitive one.
    curves = replace(sit.curves, confidence=np.full(4, 0.9), a=np.full(4, 1.13), b=np.full(4, 1.65))
    settings = EnergyEfficiencySettings(max_slowdown_frac=0.05)
    d = EnergyEfficiency(settings).decide(replace(sit, curves=curves), PolicyMemory(), 0)
    caps = only(d.intents, SetPowerCap)[0]
    # Whatever share of the cap the GPUs really draw (at least LOWEST_CAP_DRAW_FRAC of it, real
    # ones 0.9-0.95), the job keeps within the bound.
    for k in (LOWEST_CAP_DRAW_FRAC, 0.92, 0.95, 1.0):
        t = throughput_at_cap(caps.watts, sit.curves.natural_w, 1.13, 1.65, k)
        assert np.all(t >= 0.95 - 1e-3), (k, caps.watts, t)


def test_energy_efficiency_raises_a_cap_short_of_the_bound_past_the_guards_dead_band() -> None:
    from agent.act.guard import GuardSettings

    # Its own cap, set on earlier estimates, is now a few watts short of what the bound needs
    # (the estimates settled): a raise by so little would be skipped by the guard's dead band and
    # the job held past its bound for good, so it is raised by at least the dead band.
    snap = make_snapshot([600.0] * 4)
    sit = replace(orient(snap), curves=curves_for(4, 600.0, 0.85, 1.58, 0.9))
    policy = EnergyEfficiency(EnergyEfficiencySettings(max_slowdown_frac=0.05))
    needed = only(policy.decide(sit, PolicyMemory(), 0).intents, SetPowerCap)[0].watts
    short = replace(sit, cap_w=needed - 3.0)
    raised = only(policy.decide(short, PolicyMemory(), 0).intents, SetPowerCap)[0].watts
    assert np.all(raised - short.cap_w >= GuardSettings().cap_dead_band_w)
    # A cap in force above what the bound needs is asked down to it (the safe side: the guard
    # lowers it when the change is worth making).
    roomy = replace(sit, cap_w=needed + 3.0)
    lowered = only(policy.decide(roomy, PolicyMemory(), 0).intents, SetPowerCap)[0].watts
    assert np.array_equal(lowered, needed)


def test_energy_efficiency_ignores_unconfident_curves_and_insensitive_jobs() -> None:
    snap = make_snapshot([600.0] * 4)
    policy = EnergyEfficiency(EnergyEfficiencySettings())
    unsure = replace(orient(snap), curves=curves_for(4, 600.0, 0.85, 1.58, 0.1))
    assert policy.decide(unsure, PolicyMemory(), 0).intents == []
    # Natural draw under the lowest cap: nothing to gain.
    flat = replace(orient(snap), curves=curves_for(4, 150.0, 0.0, 1.05, 0.9))
    assert policy.decide(flat, PolicyMemory(), 0).intents == []


def test_pool_within_jobs_keeps_real_differences_and_drops_noise() -> None:
    from policies.common import pool_within_jobs

    keys = np.array(["a", "a", "a", "a", "b", "c", "c"])
    noise_var = np.full(7, 10.0**2)  # estimates good to about 10 W
    # Job a: spread within the noise; b alone; c: 200 W apart, far beyond it.
    values = np.array([600.0, 612.0, 590.0, 606.0, 450.0, 400.0, 600.0])
    pooled = pool_within_jobs(values, noise_var, keys)
    assert np.allclose(pooled[:4], values[:4].mean())
    assert pooled[4] == 450.0
    assert 400.0 <= pooled[5] < 402.0 and 598.0 < pooled[6] <= 600.0
    # Unknown values stay unknown and pool nothing.
    with_nan = pool_within_jobs(np.array([600.0, np.nan, 610.0]), np.full(3, 100.0), keys[:3])
    assert np.isnan(with_nan[1]) and np.allclose(with_nan[[0, 2]], 605.0)


def test_pool_within_jobs_pools_a_spread_that_noise_alone_gives_often() -> None:
    from policies.common import pool_within_jobs

    # One natural draw (513 W) estimated on each of 8 GPUs from a sample or two, each off by
    # about 10 W: these spread a little more than 10 W (sample sd 12 W), as noise alone does 4
    # times in 10. Keeping a third of each deviation (the method of moments' share) would cap the
    # GPU estimated at 493 W some 7 W too deep, and its job runs at that GPU's pace.
    values = np.array([492.8, 503.4, 519.2, 518.9, 529.9, 521.0, 525.3, 524.3])
    assert 11.0 < float(np.std(values, ddof=1)) < 13.0
    pooled = pool_within_jobs(values, np.full(8, 10.0**2), np.zeros(8, dtype=np.int64))
    assert np.allclose(pooled, values.mean())


def test_energy_efficiency_gives_a_jobs_gpus_the_same_share_despite_noisy_estimates() -> None:
    # A job runs at its slowest GPU's pace: natural draws known from a few noisy samples must not
    # cap one GPU of the job deeper than its peers.
    snap = make_snapshot([600.0] * 8, gpus_per_node=8, jobs=["7"] * 4 + ["8"] * 4)
    curves = curves_for(8, 600.0, 0.85, 1.58, 0.9)
    noisy = np.array([588.0, 612.0, 600.0, 596.0, 400.0, 402.0, 600.0, 598.0])
    curves = replace(
        curves,
        natural_w=noisy,
        natural_w_hi=noisy + 2 * 12.0,  # each estimate's draw spreads by 12 W
        cap_draw_frac=np.array([0.95, 0.97, 0.96, 0.96, 0.95, 0.95, 0.95, 0.95]),
    )
    sit = replace(orient(snap), curves=curves)
    caps = only(
        EnergyEfficiency(EnergyEfficiencySettings()).decide(sit, PolicyMemory(), 0).intents,
        SetPowerCap,
    )[0]
    watts = dict(zip(caps.targets.uuid.tolist(), caps.watts.tolist(), strict=True))
    job7 = [watts[f"GPU-{i:04d}"] for i in range(4)]
    assert max(job7) - min(job7) <= 1.0  # one share for the job
    # Job 8's GPUs really differ (200 W apart, far beyond the noise): each keeps its own.
    assert watts["GPU-0006"] - watts["GPU-0004"] > 150.0


# -- thermal_guard ----------------------------------------------------------------------------


def test_thermal_guard_steps_down_then_drains_then_releases() -> None:
    settings = ThermalGuardSettings(step_interval_s=60, drain_after_s=300, release_hold_s=120)
    policy = ThermalGuard(settings)
    hot = with_temp(make_snapshot([600.0] * 4), [85.0, 60.0, 60.0, 60.0])
    d = policy.decide(orient(hot), ThermalGuardMemory(), 0)
    cap = only(d.intents, SetPowerCap)[0]
    assert cap.targets.uuid.tolist() == ["GPU-0000"] and cap.watts[0] == 540.0  # 10% under its draw
    mem = d.memory
    d = policy.decide(orient(hot), mem, 30)  # too soon for another step: holds
    assert only(d.intents, SetPowerCap)[0].watts[0] == 540.0
    # Still hot at the floor for long enough: the node is drained.
    assert isinstance(mem, ThermalGuardMemory)
    floor_mem = ThermalGuardMemory(
        held={"GPU-0000": mem.held["GPU-0000"].model_copy(update={"cap_w": 200.0})}
    )
    d = policy.decide(orient(hot), floor_mem, 100)
    d = policy.decide(orient(hot), d.memory, 500)
    drains = only(d.intents, DrainNode)
    assert drains and drains[0].node == "node1" and drains[0].reason.startswith("ooda: thermal")
    # Cool for the hold: released.
    cool = with_temp(make_snapshot([300.0] * 4), [60.0] * 4)
    d = policy.decide(orient(cool), d.memory, 600)
    assert not only(d.intents, ReleasePowerCap)
    d = policy.decide(orient(cool), d.memory, 730)
    assert only(d.intents, ReleasePowerCap)[0].targets.uuid.tolist() == ["GPU-0000"]
    assert d.memory.held == {}  # type: ignore[attr-defined]


def test_thermal_guard_acts_on_abnormal_heating_earlier() -> None:
    snap = with_temp(make_snapshot([500.0] * 4), [75.0, 74.0, 60.0, 60.0])
    sit = orient(snap)
    flags = AnomalyFlags(
        score=np.array([5.0, 0, 0, 0]),
        flagged=np.array([True, False, False, False]),
        kind=np.array(["hot_vs_peers", "", "", ""]),
    )
    d = ThermalGuard(ThermalGuardSettings()).decide(
        replace(sit, anomalies=flags), ThermalGuardMemory(), 0
    )
    assert only(d.intents, SetPowerCap)[0].targets.uuid.tolist() == ["GPU-0000"]


# -- health_drain -----------------------------------------------------------------------------


def health(n: int, rows: dict[int, tuple[int, str, str]]) -> HealthStatus:
    h = HealthStatus.healthy(n)
    sev, code, rem = h.severity.copy(), h.code.astype("U64"), h.remediation.astype("U64")
    for row, (s, c, r) in rows.items():
        sev[row], code[row], rem[row] = s, c, r
    return HealthStatus(severity=sev, code=code, remediation=rem, since_s=h.since_s)


def node_states(drained: list[bool], ours: list[bool]) -> NodeStates:
    n = len(drained)
    base = NodeStates.unknown(n)
    return replace(
        base,
        drained=np.array(drained),
        drained_by_us=np.array(ours),
        known=np.ones(n, dtype=bool),
        reason=np.array(
            ["ooda: x" if o else ("admin" if d else "") for d, o in zip(drained, ours, strict=True)]
        ),
    )


def test_health_drain_drains_requeues_and_notifies() -> None:
    snap = make_snapshot([300.0] * 8)
    sit = replace(
        orient(snap),
        health=health(
            8,
            {
                5: (HealthSeverity.DRAIN, "xid:79", "drain, requeue its jobs"),
                1: (HealthSeverity.WATCH, "xid:63", "watch; reset when convenient"),
            },
        ),
        nodes=node_states([False, False], [False, False]),
    )
    policy = HealthDrain(HealthDrainSettings())
    d = policy.decide(sit, HealthDrainMemory(), 100)
    drains = only(d.intents, DrainNode)
    assert [x.node for x in drains] == ["node2"] and drains[0].reason.startswith(
        "ooda: health: gpu1 xid:79"
    )
    assert [x.job for x in only(d.intents, RequeueJob)] == ["101"]
    assert [x.target for x in only(d.intents, Notify)] == ["node1/gpu1"]
    # Next cycle: the job is not requeued again, the watch signal not notified again.
    d2 = policy.decide(sit, d.memory, 115)
    assert not only(d2.intents, RequeueJob) and not only(d2.intents, Notify)


def test_health_drain_resumes_only_its_own_drains_after_the_hold() -> None:
    snap = make_snapshot([300.0] * 8)
    sit = replace(
        orient(snap), health=HealthStatus.healthy(8), nodes=node_states([True, True], [True, False])
    )
    policy = HealthDrain(HealthDrainSettings(resume_hold_s=600))
    d = policy.decide(sit, HealthDrainMemory(), 0)
    assert not only(d.intents, ResumeNode)
    d = policy.decide(sit, d.memory, 601)
    assert [x.node for x in only(d.intents, ResumeNode)] == ["node1"]  # never node2 (an admin's)
    assert not only(d.intents, DrainNode)


# -- placement --------------------------------------------------------------------------------


def test_placement_steers_away_and_back() -> None:
    snap = with_temp(make_snapshot([500.0] * 12), [84.0] + [60.0] * 11)
    nodes = replace(NodeStates.unknown(3), known=np.ones(3, dtype=bool), weight=np.array([1, 1, 1]))
    policy = Placement(PlacementSettings(max_changes_per_cycle=5))
    d = policy.decide(replace(orient(snap), nodes=nodes), PlacementMemory(), 0)
    weights = only(d.intents, SetNodeWeight)
    assert [(w.node, w.weight) for w in weights] == [("node1", 1000)]
    cool = with_temp(make_snapshot([500.0] * 12), [60.0] * 12)
    nodes2 = replace(nodes, weight=np.array([1000, 1, 1]))
    d2 = policy.decide(replace(orient(cool), nodes=nodes2), d.memory, 60)
    assert [(w.node, w.weight) for w in only(d2.intents, SetNodeWeight)] == [("node1", 1)]
    assert d2.memory.original_weight == {}  # type: ignore[attr-defined]


def test_placement_rate_limit_and_opt_out() -> None:
    snap = with_temp(make_snapshot([500.0] * 12), [84.0] * 12)
    nodes = replace(
        NodeStates.unknown(3),
        known=np.ones(3, dtype=bool),
        opted_out=np.array([False, True, False]),
    )
    d = Placement(PlacementSettings(max_changes_per_cycle=1)).decide(
        replace(orient(snap), nodes=nodes), PlacementMemory(), 0
    )
    assert len(only(d.intents, SetNodeWeight)) == 1
    assert "node2" not in [w.node for w in only(d.intents, SetNodeWeight)]


def test_placement_steers_away_from_a_rack_at_its_budget_only() -> None:
    snap = make_snapshot([500.0] * 12)  # 3 nodes of 4 GPUs at 500 W
    nodes = replace(NodeStates.unknown(3), known=np.ones(3, dtype=bool))
    rack_a = np.repeat([True, False, False], 4)
    policy = Placement(PlacementSettings())
    at_budget = replace(orient(snap), nodes=nodes, group_budgets={"rack-a": (2000.0, rack_a)})
    d = policy.decide(at_budget, PlacementMemory(), 0)
    assert [(w.node, w.weight) for w in only(d.intents, SetNodeWeight)] == [("node1", 50)]
    # Every node constrained alike (e.g. by the cluster budget): nothing to steer between.
    everyone = replace(
        orient(snap), nodes=nodes, group_budgets={"all": (6000.0, np.ones(12, dtype=bool))}
    )
    assert only(policy.decide(everyone, PlacementMemory(), 0).intents, SetNodeWeight) == []


def test_energy_efficiency_caps_against_the_curves_own_natural_draw() -> None:
    # The budget's natural draw leans high on purpose; the curve's x was measured against the
    # unbiased level, and the cap must be too (else it caps less than the curve allows).
    from agent.core.curves import throughput_at_cap

    snap = make_snapshot([600.0] * 4)
    curves = replace(
        curves_for(4, 630.0, 0.85, 1.58, 0.9),
        natural_w_hi=np.full(4, 640.0),
        curve_natural_w=np.full(4, 600.0),
        cap_draw_frac=np.full(4, 0.95),  # learned
    )
    sit = replace(orient(snap), curves=curves)
    caps = only(
        EnergyEfficiency(EnergyEfficiencySettings()).decide(sit, PolicyMemory(), 0).intents,
        SetPowerCap,
    )[0]
    t = throughput_at_cap(caps.watts, 600.0, 0.85, 1.58, 0.95)
    assert np.all(np.abs(t - 0.95) < 2e-3)  # at the bound, by the curve's own reference

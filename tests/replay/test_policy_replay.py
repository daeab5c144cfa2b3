"""Each built-in policy, replayed on the twin: its decisions against golden files, its KPIs
against bounds. Regenerate goldens deliberately with OODA_UPDATE_GOLDEN=1 and review the diff."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from agent.act.guard import GuardSettings
from agent.replay.testing import assert_golden, record, replay, replay_twin
from agent.sim.faults import parse_fault
from agent.sim.kpis import uncapped_demand_w
from agent.sim.twin import BudgetSchedule, TwinSpec

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def test_power_budget_replay() -> None:
    base = TwinSpec(nodes=2, gpus_per_node=8, seed=5, median_job_s=3600.0)
    demand = uncapped_demand_w(base, 1800)
    spec = replace(
        base, budget=BudgetSchedule.demand_response(0.9 * demand, 0.65 * demand, 600, 600)
    )
    result = replay_twin(spec, policies=["power_budget"], duration_s=1800)
    assert result.kpis["budget_violation_s"] == 0
    assert result.kpis["throughput_vs_uncapped"] >= 0.85
    assert result.kpis["energy_vs_uncapped"] < 0.97
    assert result.actions("set_power_cap", "power_budget")
    assert_golden(result, GOLDEN / "power_budget.json")


def test_thermal_guard_replay() -> None:
    spec = TwinSpec(
        nodes=2,
        gpus_per_node=4,
        seed=3,
        occupancy=1.0,
        median_job_s=7200.0,
        faults=(parse_fault("fan=1.6:node1/gpu0@60"),),
    )
    result = replay_twin(spec, policies=["thermal_guard"], duration_s=1800)
    capped = {a["target"] for a in result.actions("set_power_cap", "thermal_guard")}
    assert capped == {"node1/gpu0"}  # only the GPU whose cooling failed
    assert_golden(result, GOLDEN / "thermal_guard.json")


def test_health_drain_replay() -> None:
    spec = TwinSpec(
        nodes=4,
        gpus_per_node=4,
        seed=2,
        occupancy=1.0,
        median_job_s=7200.0,
        faults=(parse_fault("xid=79:node2/gpu1@60+300"),),
    )
    result = replay_twin(
        spec,
        policies=["health_drain"],
        duration_s=1200,
        settings={"health_drain": {"resume_hold_s": 120}},
        guard=GuardSettings(node_cooldown_s=60),
    )
    drains = result.actions("drain_node")
    assert [d["target"] for d in drains] == ["node2"] and 60 <= drains[0]["t_s"] <= 90
    assert len(result.actions("requeue_job")) == 1
    resumes = result.actions("resume_node")
    assert [r["target"] for r in resumes] == ["node2"] and resumes[0]["t_s"] >= 360 + 120
    assert_golden(result, GOLDEN / "health_drain.json")


def test_idle_powerdown_replay() -> None:
    spec = TwinSpec(nodes=2, gpus_per_node=4, seed=4, occupancy=0.5, median_job_s=900.0)
    result = replay_twin(spec, policies=["idle_powerdown"], duration_s=3600)
    caps = result.actions("set_power_cap")
    assert caps and all(c["value"] == 200 for c in caps)
    assert result.actions("release_power_cap")  # work arrived somewhere and got its power back
    assert result.kpis["throughput_vs_uncapped"] >= 0.99  # idle caps cost (almost) nothing
    assert_golden(result, GOLDEN / "idle_powerdown.json")


def test_placement_replay() -> None:
    spec = TwinSpec(
        nodes=3,
        gpus_per_node=4,
        seed=8,  # node3/gpu2 runs a full-power job, so its failing fan shows
        occupancy=1.0,
        median_job_s=7200.0,
        faults=(parse_fault("fan=1.6:node3/gpu2@30"),),
    )
    result = replay_twin(spec, policies=["placement"], duration_s=1200)
    weights = result.actions("set_node_weight")
    assert weights and weights[0]["target"] == "node3" and weights[0]["value"] == 1000
    assert_golden(result, GOLDEN / "placement.json")


@pytest.mark.parametrize("dry_run", [False, True])
def test_energy_efficiency_acts_only_on_confident_curves(dry_run: bool) -> None:
    spec = TwinSpec(nodes=2, gpus_per_node=4, seed=8, occupancy=1.0, median_job_s=7200.0)
    result = replay_twin(spec, policies=["energy_efficiency"], duration_s=900, dry_run=dry_run)
    # With nothing learned confidently yet (priors only), nobody's job is slowed down.
    assert result.kpis["throughput_vs_uncapped"] >= 0.99
    assert_golden(result, GOLDEN / f"energy_efficiency{'_dry' if dry_run else ''}.json")


# -- the same policies over recorded traces (agent.replay.testing.replay: `ooda replay`'s engine)


@pytest.fixture(scope="module")
def fan_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TwinSpec(
        nodes=2,
        gpus_per_node=4,
        seed=3,
        occupancy=1.0,
        median_job_s=7200.0,
        faults=(parse_fault("fan=1.6:node1/gpu0@60"),),
    )
    return record(spec, tmp_path_factory.mktemp("fan") / "fan.parquet", duration_s=1800)


def test_thermal_guard_over_a_recorded_trace(fan_trace: Path) -> None:
    result = replay(fan_trace, policies=["thermal_guard"])
    caps = result.assert_actions("set_power_cap", targets=["node1/gpu0"], policy="thermal_guard")
    assert 60 < caps[0]["t_s"] < 1800
    result.assert_no_actions("drain_node")
    result.assert_kpis(budget_violation_s=(0, 0), throughput_ratio=(0.9, 1.0))
    # The failing fan's GPU runs cooler under its cap: energy can only go down.
    assert result.kpis["energy_kwh"] <= result.kpis["baseline"]["energy_kwh"] + 1e-6


def test_power_budget_over_a_recorded_trace(tmp_path: Path) -> None:
    base = TwinSpec(nodes=2, gpus_per_node=8, seed=5, median_job_s=3600.0)
    demand = uncapped_demand_w(replace(base, step_s=15.0), 1800)
    trace = record(base, tmp_path / "day.parquet", duration_s=1800)  # recorded uncapped
    result = replay(
        trace, config={"cluster": {"budget_w": 0.85 * demand}}, policies=["power_budget"]
    )
    result.assert_actions("set_power_cap", policy="power_budget")
    result.assert_kpis(budget_violation_s=(0, 30), throughput_ratio=(0.8, 1.0))
    assert result.kpis["energy_kwh"] < result.kpis["baseline"]["energy_kwh"]
    assert result.kpis["baseline"]["budget_violation_s"] > 600  # uncapped, it was over


def test_replay_assertions_say_what_went_wrong(fan_trace: Path) -> None:
    result = replay(fan_trace, policies=["thermal_guard"])
    with pytest.raises(AssertionError, match=r"no drain_node action; actions: set_power_cap"):
        result.assert_actions("drain_node")
    with pytest.raises(
        AssertionError, match=r"acted on \['node1/gpu0'\], expected \['node2/gpu1'\]"
    ):
        result.assert_actions("set_power_cap", targets=["node2/gpu1"])
    with pytest.raises(AssertionError, match=r"expected no set_power_cap, got \d+; the first"):
        result.assert_no_actions("set_power_cap")
    with pytest.raises(
        AssertionError, match=r"throughput_ratio = [\d.]+ \(90% interval .*\) outside"
    ):
        result.assert_kpis(throughput_ratio=(1.5, None))
    with pytest.raises(AssertionError, match=r"no KPI 'nope'"):
        result.assert_kpis(nope=(0, 1))
    with pytest.raises(ValueError, match="unknown action kind"):
        result.assert_actions("reboot")


def test_health_drain_over_a_recorded_trace(tmp_path: Path) -> None:
    spec = TwinSpec(
        nodes=4,
        gpus_per_node=4,
        seed=2,
        occupancy=1.0,
        median_job_s=7200.0,
        faults=(parse_fault("xid=79:node2/gpu1@60+300"),),
    )
    trace = record(spec, tmp_path / "xid.parquet", duration_s=1200)
    result = replay(
        trace,
        policies=["health_drain"],
        config={
            "guard": {"node_cooldown_s": 60},
            "policies": {"health_drain": {"resume_hold_s": 120}},
        },
    )
    result.assert_actions("drain_node", targets=["node2"], count=1, between_s=(60, 90))
    result.assert_actions("requeue_job", count=1)
    resumes = result.assert_actions("resume_node", targets=["node2"])
    assert resumes[0]["t_s"] >= 360 + 120
    assert result.kpis["drains"] == 1
    # Orient's finding on the recorded trace is on the report's timeline.
    assert result.report is not None
    findings = result.report.learned.findings
    assert any(f.target == "node2/gpu1" and f.kind == "health:xid:79" for f in findings)

"""Replay's 90% intervals on the two traces that showed them unusable: a budget held by
power_budget (`seconds above budget 0 [0, 34982]` on a day: "zero, or nine hours") and a trace
with no budget (`[41.2, 41.2]` beside "curves from the prior, with wide intervals")."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.cli import main
from agent.config import default_config
from agent.observe.trace import TraceReader
from agent.replay.engine import PolicySet, learn, replay_trace
from agent.replay.outcome import Counterfactual
from agent.replay.twin_trace import record_twin, run_twin
from agent.sim.kpis import uncapped_demand_w
from agent.sim.twin import BudgetSchedule, TwinSpec

INTERVAL_S = 15.0
EVERY = "power_budget+thermal_guard+health_drain+energy_efficiency+idle_powerdown+placement"


def _last_json(text: str) -> dict[str, Any]:
    return dict(json.loads(text.strip().splitlines()[-1]))


def test_a_held_budget_is_not_zero_or_hours(tmp_path: Path) -> None:
    """Recorded uncapped over a budget a little under demand, replayed through power_budget.
    Open-loop draws (a shared k 3% high keeps every GPU 3% above what the point estimate's
    caps planned) put the fleet over the budget for as long as the budget binds; the policy
    would have seen that draw and capped harder. Seconds above budget stay within a couple of
    intervals of the twin running power_budget live, and the uncertainty shows in throughput."""
    duration_s = 3 * 3600.0
    base = TwinSpec(nodes=4, gpus_per_node=8, seed=2, step_s=INTERVAL_S)
    budget = round(0.92 * uncapped_demand_w(base, duration_s), -1)
    spec = replace(base, budget=BudgetSchedule.constant(budget))
    trace = tmp_path / "uncapped.parquet"
    record_twin(spec, trace, duration_s=duration_s)
    live = run_twin(spec, duration_s=duration_s, policies=["power_budget"]).kpis

    report = replay_trace(trace, policy_sets=[PolicySet("power_budget", ("power_budget",))])
    kpis = report.sets[0].kpis
    assert report.baseline["budget_violation_s"] > 3600  # the budget binds, recorded uncapped
    lo, hi = kpis["interval"]["budget_violation_s"]
    assert hi <= 4 * INTERVAL_S, (lo, hi)  # was most of the time the budget binds
    assert lo - INTERVAL_S <= live.violation_s <= hi + INTERVAL_S
    e_lo, e_hi = kpis["interval"]["energy_kwh"]
    t_lo, t_hi = kpis["interval"]["throughput_ratio"]
    assert (e_hi - e_lo) / kpis["energy_kwh"] < 0.01  # the budget pins the fleet's draw
    assert t_hi - t_lo > 0.03  # prior curves: what the caps cost is what is uncertain
    assert any("re-planned to the budget" in note for note in kpis["notes"])


def test_the_caps_as_recorded_give_the_trace_as_recorded(tmp_path: Path) -> None:
    """Whatever the parameters: a GPU drawing 680 W under its 700 W limit, the cap not binding,
    is not held to a fleet-wide k x 700 W (669 W) because other GPUs bound at 0.956 x their
    cap. (That made `[41.2, 41.2]` a range at all: 41.175 [41.157, 41.181] against 41.181
    recorded, with no cap changed.)"""
    trace = tmp_path / "no-budget.parquet"
    record_twin(TwinSpec(nodes=4, gpus_per_node=8, seed=0), trace, duration_s=3600)
    reader = TraceReader(trace)
    world = Counterfactual(learn(reader, default_config()).estimates)
    for snap in reader.snapshots():
        _view, out = world.step(snap, reader.meta.step_s)
        assert out.fleet_cf_w == pytest.approx(out.fleet_obs_w, abs=1e-6)
        np.testing.assert_allclose(out.fleet_cf_draws_w, out.fleet_cf_w, atol=1e-6)
        np.testing.assert_allclose(out.work_cf_draws, out.work_obs, atol=1e-9)
        assert out.work_cf == pytest.approx(out.work_obs, abs=1e-9)
    assert world.tally.estimated_gpu_s == 0 and world.tally.busy_gpu_s > 0


def test_an_unbudgeted_trace_says_why_its_intervals_have_no_width(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No budget: power_budget never caps, and the other policies' caps (idle GPUs') never hold
    a busy one: nothing is estimated, the outcome is the recording, and the notes say so
    instead of calling the intervals wide."""
    trace = tmp_path / "no-budget.parquet"
    record_twin(TwinSpec(nodes=4, gpus_per_node=8, seed=0), trace, duration_s=3600)
    assert main(["replay", str(trace), "--compare", "power_budget", EVERY, "--json"]) == 0
    out = _last_json(capsys.readouterr().out)
    assert out["compare"][1]["actions"]["set_power_cap"] > 0  # idle_powerdown capped
    for kpis in out["compare"]:
        for key in ("energy_kwh", "throughput_ratio"):
            lo, hi = kpis["interval"][key]
            assert lo == hi == kpis[key], key
        assert kpis["energy_kwh"] == out["baseline"]["energy_kwh"]
        assert kpis["notes"] == [
            "its caps never bound a busy GPU: the outcome is the trace as recorded, nothing is "
            "estimated, and the intervals have no width"
        ]
    assert not any("wide" in note for note in out["notes"]), out["notes"]

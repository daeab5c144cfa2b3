"""The counterfactual model on a hand-made trace whose every number is known."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import default_config
from agent.core.gpu_models import H100_SXM
from agent.core.snapshot import Metric, build_snapshot
from agent.observe.trace import TraceReader, TraceWriter
from agent.replay.engine import learn
from agent.replay.outcome import Counterfactual

STEP_S = 15.0
NATURAL_W = 600.0
K = 0.9
CLOCK_MHZ = 1800.0
CAPPED_CLOCK = 0.904  # the clock share the recorded cap left (T at x = 0.6)


def _trace(path: Path) -> Path:
    """GPU0 runs job 1 uncapped for 20 steps, then under a 400 W cap that binds (360 W, clock
    at 90.4%) for 15 steps, then idles; GPU1 idles throughout."""
    metrics = (
        Metric.POWER_W,
        Metric.POWER_LIMIT_W,
        Metric.MAX_LIMIT_W,
        Metric.MIN_LIMIT_W,
        Metric.DEFAULT_LIMIT_W,
        Metric.SM_CLOCK_MHZ,
        Metric.UTIL_PCT,
    )
    with TraceWriter(path, time_base="twin", step_s=STEP_S, source={}, metrics=metrics) as w:
        for k in range(40):
            busy = k < 35
            capped = 20 <= k < 35
            power0 = (K * 400.0 if capped else NATURAL_W) if busy else 75.0
            clock0 = (CLOCK_MHZ * (CAPPED_CLOCK if capped else 1.0)) if busy else 345.0
            w.append(
                build_snapshot(
                    time_s=k * STEP_S,
                    node_of_gpu=["n1", "n1"],
                    gpu=[0, 1],
                    uuid=["GPU-0", "GPU-1"],
                    model=[H100_SXM.model_name] * 2,
                    job=["1" if busy else "", ""],
                    values={
                        Metric.POWER_W: [power0, 75.0],
                        Metric.POWER_LIMIT_W: [400.0 if capped else 700.0, 700.0],
                        Metric.MAX_LIMIT_W: [700.0, 700.0],
                        Metric.MIN_LIMIT_W: [200.0, 200.0],
                        Metric.DEFAULT_LIMIT_W: [700.0, 700.0],
                        Metric.SM_CLOCK_MHZ: [clock0, 345.0],
                        Metric.UTIL_PCT: [97.0 if busy else 0.0, 0.0],
                    },
                    age_s=[0.0, 0.0],
                    stale=[False, False],
                )
            )
    return path


def test_what_the_learn_pass_measures(tmp_path: Path) -> None:
    reader = TraceReader(_trace(tmp_path / "t.parquet"))
    est = learn(reader, default_config(), draws=8).estimates
    (seg,) = np.flatnonzero(np.char.endswith(est.keys, "\x1f1"))
    assert est.natural_known[seg]
    assert est.natural_w[seg] == pytest.approx(NATURAL_W)
    assert est.k[seg] == pytest.approx(K)
    assert est.natural_clock_mhz[seg] == pytest.approx(CLOCK_MHZ)
    assert est.natural_util_pct[seg] == pytest.approx(97.0)
    # Its end is in the trace: 20 steps at full speed, 15 at 90.4%.
    assert est.work_total[seg] == pytest.approx((20 + 15 * CAPPED_CLOCK) * STEP_S)
    assert est.idle_w[H100_SXM.model_name] == pytest.approx(75.0)


def test_power_and_throughput_under_other_caps(tmp_path: Path) -> None:
    reader = TraceReader(_trace(tmp_path / "t.parquet"))
    est = learn(reader, default_config(), draws=8).estimates
    world = Counterfactual(est)
    outs = []
    views = []
    for step, snap in enumerate(reader.snapshots()):
        if step == 30:  # the replayed policy caps GPU0 at 300 W from here on
            world.set_caps(np.array(["GPU-0"]), np.array([300.0]))
        view, out = world.step(snap, STEP_S)
        outs.append(out)
        views.append(view)
    # Before the recorded cap: as recorded.
    assert outs[10].fleet_cf_w == pytest.approx(NATURAL_W + 75.0)
    assert outs[10].work_cf == pytest.approx(outs[10].work_obs) == pytest.approx(1.0)
    # Under the recorded cap, uncapped instead: the natural draw, full speed.
    assert outs[25].fleet_obs_w == pytest.approx(K * 400.0 + 75.0)
    assert outs[25].fleet_cf_w == pytest.approx(NATURAL_W + 75.0)
    assert outs[25].work_obs == pytest.approx(CAPPED_CLOCK)
    assert outs[25].work_cf == pytest.approx(1.0)
    power, _ = views[25].column(Metric.POWER_W)
    limit, _ = views[25].column(Metric.POWER_LIMIT_W)
    assert power[0] == pytest.approx(NATURAL_W) and limit[0] == 700.0
    # Capped harder than recorded: k x cap, and slower than recorded (the curve, through the
    # recorded point); the interval holds the point estimate.
    assert outs[31].fleet_cf_w == pytest.approx(K * 300.0 + 75.0)
    assert 0.3 < outs[31].work_cf < CAPPED_CLOCK
    draws = outs[31].work_cf_draws
    assert draws.min() < outs[31].work_cf < draws.max()
    assert outs[31].capped_cf == 1 and outs[31].lowered_cf == 1


def test_a_job_that_got_ahead_finishes_early(tmp_path: Path) -> None:
    reader = TraceReader(_trace(tmp_path / "t.parquet"))
    est = learn(reader, default_config(), draws=8).estimates
    world = Counterfactual(est)
    outs = [world.step(snap, STEP_S) for snap in reader.snapshots()]
    # Uncapped, job 1 does its recorded work (33.56 steps' worth) by step 34: its GPU idles there.
    early = [out.finished_early for _view, out in outs]
    assert early[:34] == [0] * 34 and early[34] == 1
    view, out = outs[34]
    assert out.fleet_cf_w == pytest.approx(75.0 + 75.0)
    assert out.work_cf == 0.0
    assert view.job[0] == ""
    # Total work is the recorded work: done sooner, not more of it.
    assert sum(o.work_cf for _v, o in outs) == pytest.approx(34.0, abs=0.01)
    assert sum(o.work_obs for _v, o in outs) == pytest.approx(20 + 15 * CAPPED_CLOCK)


def _capped_at_300(world: Counterfactual, reader: TraceReader, budget_w: float | None) -> list[Any]:
    """The replayed policy caps GPU0 at 300 W from step 10 (recorded uncapped until step 20)."""
    outs = []
    for step, snap in enumerate(reader.snapshots()):
        if step == 10:
            world.set_caps(np.array(["GPU-0"]), np.array([300.0]))
        outs.append(world.step(snap, STEP_S, budget_w)[1])
    return outs


def test_a_budget_policy_steers_each_draw_back_to_its_plan(tmp_path: Path) -> None:
    """The draws re-price the point estimate's decisions. A budget policy would have seen each
    draw's world and re-planned its caps: while it plans, a draw's fleet is where the point
    estimate's is (its error shows in throughput), not above the budget for as long as it
    lasts (`seconds above budget 0 [0, 34982]` on a day, before)."""
    reader = TraceReader(_trace(tmp_path / "t.parquet"))
    est = learn(reader, default_config(), draws=16).estimates
    open_loop = _capped_at_300(Counterfactual(est), reader, budget_w=400.0)[12]
    # Open loop, k's uncertainty moves the fleet: some draws above the point, some below.
    assert open_loop.fleet_cf_draws_w.max() > open_loop.fleet_cf_w + 1.0
    assert open_loop.fleet_cf_draws_w.min() < open_loop.fleet_cf_w - 1.0

    held = Counterfactual(est, holds_budget=True)
    held.held_budget(True)
    out = _capped_at_300(held, reader, budget_w=400.0)[12]
    assert out.fleet_cf_w == pytest.approx(open_loop.fleet_cf_w)
    np.testing.assert_allclose(out.fleet_cf_draws_w, out.fleet_cf_w, rtol=1e-9)
    assert np.ptp(out.work_cf_draws) > 0.01  # the throughput is still uncertain
    # A draw that drew less is given the difference back: throughput above the open loop's.
    low = open_loop.fleet_cf_draws_w < open_loop.fleet_cf_w - 1.0
    assert (out.work_cf_draws[low] >= open_loop.work_cf_draws[low] - 1e-12).all()

    # Not planning (the budget had room), a draw over the budget is brought down to it.
    budget = open_loop.fleet_cf_w + 1.0
    idle = Counterfactual(est, holds_budget=True)
    out = _capped_at_300(idle, reader, budget_w=budget)[12]
    assert out.fleet_cf_draws_w.max() == pytest.approx(budget)
    assert out.fleet_cf_draws_w.min() == pytest.approx(open_loop.fleet_cf_draws_w.min())


def test_a_set_without_a_budget_policy_stays_open_loop(tmp_path: Path) -> None:
    reader = TraceReader(_trace(tmp_path / "t.parquet"))
    est = learn(reader, default_config(), draws=16).estimates
    world = Counterfactual(est, holds_budget=False)
    world.held_budget(True)  # ignored: nothing in the set would have reacted to the draw
    out = _capped_at_300(world, reader, budget_w=400.0)[12]
    assert np.ptp(out.fleet_cf_draws_w) > 2.0

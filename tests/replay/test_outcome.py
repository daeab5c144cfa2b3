"""The counterfactual model on a hand-made trace whose every number is known."""

from __future__ import annotations

from pathlib import Path

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

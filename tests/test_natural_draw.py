"""The natural-draw tracker where the GPU reports its clock event reasons."""

from __future__ import annotations

import numpy as np

from agent.core.snapshot import CLOCK_EVENT_SW_POWER_CAP, Metric, Snapshot, build_snapshot
from agent.orient.natural import NaturalDrawTracker


def snapshot_at(
    time_s: float, limit_w: list[float], power_w: list[float], cap_bit: bool, job: str = "7"
) -> Snapshot:
    n = len(power_w)
    return build_snapshot(
        time_s=time_s,
        node_of_gpu=["node1"] * n,
        gpu=list(range(n)),
        uuid=[f"GPU-{i}" for i in range(n)],
        model=["NVIDIA H100 80GB HBM3"] * n,
        job=[job] * n,
        values={
            Metric.POWER_W: power_w,
            Metric.POWER_LIMIT_W: limit_w,
            Metric.MAX_LIMIT_W: [700.0] * n,
            Metric.UTIL_PCT: [95.0] * n,
            Metric.CLOCKS_EVENT_REASONS: [CLOCK_EVENT_SW_POWER_CAP if cap_bit else 0] * n,
        },
        age_s=[1.0] * n,
        stale=[False] * n,
    )


def test_a_gpu_held_at_its_maximum_limit_draws_its_natural_draw() -> None:
    # GPU 0 runs at its maximum limit and the limit binds (a power-bound job): no cap can give
    # it more, so its draw there is its natural draw. GPU 1 is under a lowered cap that binds:
    # only a lower bound on its natural draw, not yet known.
    tracker = NaturalDrawTracker(warmup_s=0.0)
    for t in np.arange(0.0, 300.0, 15.0):
        draw = tracker.update(snapshot_at(float(t), [700.0, 400.0], [690.0, 385.0], cap_bit=True))
    assert draw.mean_w[0] == 690.0 and not draw.uncertain[0]
    assert draw.uncertain[1] and draw.mean_w[1] >= 385.0
    assert 0.95 < draw.cap_draw_frac[1] < 0.97  # how close to its cap it draws, learned there


def test_a_new_job_does_not_inherit_the_previous_jobs_cap_draw_share() -> None:
    # How close to its cap a GPU draws depends on its job's workload (how bursty its draw is):
    # the next job on the GPU starts without it, until its own cap binds.
    tracker = NaturalDrawTracker(warmup_s=0.0)
    for t in np.arange(0.0, 150.0, 15.0):
        draw = tracker.update(snapshot_at(float(t), [400.0], [385.0], cap_bit=True))
    assert 0.95 < draw.cap_draw_frac[0] < 0.97
    draw = tracker.update(snapshot_at(150.0, [700.0], [500.0], cap_bit=False, job="8"))
    assert np.isnan(draw.cap_draw_frac[0])
    draw = tracker.update(snapshot_at(165.0, [450.0], [405.0], cap_bit=True, job="8"))
    assert draw.cap_draw_frac[0] == 0.9  # its own, from its first binding sample


def test_the_cap_draw_share_averages_its_first_samples_alike() -> None:
    # Each sample of the draw under a cap is off by the draw's noise: a share kept as a moving
    # average from its first sample on would keep that one sample at weight 0.9^n (a cap aimed
    # at a slowdown bound from it misses by as much). The first samples count alike.
    tracker = NaturalDrawTracker(warmup_s=0.0)
    shares = [0.99, 0.93, 0.94, 0.92, 0.93]  # a high first sample, then the job's usual share
    for i, share in enumerate(shares):
        draw = tracker.update(snapshot_at(15.0 * i, [400.0], [400.0 * share], cap_bit=True))
    assert abs(draw.cap_draw_frac[0] - float(np.mean(shares))) < 1e-9
    # Later samples move it by a small, fixed weight: old evidence fades, slowly.
    for i in range(5, 60):
        draw = tracker.update(snapshot_at(15.0 * i, [400.0], [400.0 * 0.93], cap_bit=True))
    assert abs(draw.cap_draw_frac[0] - 0.93) < 0.001

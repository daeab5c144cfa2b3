"""Learned power curves: from what the loop sees (cap, draw, SM clock), online, with a
confidence, priors per GPU model and workload class, and the lessons of the natural-draw
tracker kept (a capped GPU's draw is only a lower bound; a ramping job's draw is not its own)."""

from __future__ import annotations

import json

import numpy as np
import numpy.typing as npt

from agent.core.curves import throughput_at_power
from agent.core.snapshot import Metric, Snapshot, build_snapshot
from agent.orient.orienter import Orienter

TRUE = {"sensitive": (1.1, 1.6), "robust": (0.4, 1.1)}
NATURAL_W = 600.0
CLOCK_MHZ = 1900.0


def fleet_snapshot(
    t: float,
    caps: npt.NDArray[np.float64],
    jobs: list[str],
    workloads: list[str],
    rng: np.random.Generator,
) -> Snapshot:
    n = len(jobs)
    a = np.array([TRUE[w][0] for w in workloads])
    b = np.array([TRUE[w][1] for w in workloads])
    mean = np.minimum(NATURAL_W, 0.95 * caps)
    power = np.minimum(mean * (1 + 0.01 * rng.standard_normal(n)), caps)
    clock = CLOCK_MHZ * throughput_at_power(mean, NATURAL_W, a, b)
    return build_snapshot(
        time_s=t,
        node_of_gpu=["node1"] * n,
        gpu=list(range(n)),
        uuid=[f"GPU-{i}" for i in range(n)],
        model=["NVIDIA H100 80GB HBM3"] * n,
        job=jobs,
        values={
            Metric.POWER_W: power,
            Metric.POWER_LIMIT_W: caps,
            Metric.MAX_LIMIT_W: np.full(n, 700.0),
            Metric.MIN_LIMIT_W: np.full(n, 200.0),
            Metric.SM_CLOCK_MHZ: clock,
            Metric.UTIL_PCT: np.full(n, 97.0),
            Metric.MEM_UTIL_PCT: np.where(np.array(workloads) == "robust", 60.0, 40.0),
            Metric.TEMP_C: np.full(n, 60.0),
        },
        age_s=np.zeros(n),
        stale=np.zeros(n, dtype=bool),
        labels={"workload": workloads},
    )


def run(
    orienter: Orienter,
    jobs: list[str],
    workloads: list[str],
    start_t: float,
    cycles: int,
    uncapped_first: int = 20,
    seed: int = 0,
) -> float:
    """Uncapped first (the natural draw and clock are seen), then caps that vary."""
    rng = np.random.default_rng(seed)
    n = len(jobs)
    t = start_t
    for k in range(cycles):
        if k < uncapped_first:
            caps = np.full(n, 700.0)
        else:
            caps = np.full(n, float(rng.choice([330.0, 400.0, 480.0, 560.0])))
        orienter.orient(fleet_snapshot(t, caps, jobs, workloads, rng), None)
        t += 15.0
    return t


def curve_error(sit_a: float, sit_b: float, truth: tuple[float, float]) -> float:
    x = np.linspace(0.5, 0.95, 10)
    return float(
        np.max(
            np.abs(throughput_at_power(x, 1.0, sit_a, sit_b) - throughput_at_power(x, 1.0, *truth))
        )
    )


def test_each_job_curve_is_learned_with_confidence() -> None:
    orienter = Orienter()
    jobs = ["1"] * 4 + ["2"] * 4
    workloads = ["sensitive"] * 4 + ["robust"] * 4
    t = run(orienter, jobs, workloads, 0.0, 90)
    rng = np.random.default_rng(9)
    sit = orienter.orient(fleet_snapshot(t, np.full(8, 480.0), jobs, workloads, rng), None)
    c = sit.curves
    assert (c.source == "learned").all() and (c.confidence > 0.5).all()
    assert curve_error(c.a[0], c.b[0], TRUE["sensitive"]) < 0.04
    assert curve_error(c.a[4], c.b[4], TRUE["robust"]) < 0.04
    # The prior (the most sensitive measured curve) was far off for the robust job.
    assert curve_error(1.13, 1.65, TRUE["robust"]) > 0.15
    assert c.natural_known is not None and c.natural_known.all()


def test_confidence_grows_with_evidence() -> None:
    orienter = Orienter()
    jobs, workloads = ["1"] * 4, ["sensitive"] * 4
    confidences = []
    rng = np.random.default_rng(1)
    for k in range(60):
        caps = np.full(4, 700.0 if k < 20 else float(rng.choice([350.0, 450.0, 550.0])))
        sit = orienter.orient(fleet_snapshot(15.0 * k, caps, jobs, workloads, rng), None)
        confidences.append(float(sit.curves.confidence[0]))
    assert confidences[15] == 0.0  # nothing capped yet: nothing learned
    assert confidences[30] > 0.0 and confidences[-1] >= confidences[30]


def test_a_gpu_never_seen_uncapped_teaches_nothing() -> None:
    orienter = Orienter()
    jobs, workloads = ["1"] * 4, ["robust"] * 4
    run(orienter, jobs, workloads, 0.0, 60, uncapped_first=0)  # capped from its first cycle
    rng = np.random.default_rng(2)
    sit = orienter.orient(fleet_snapshot(900.0, np.full(4, 400.0), jobs, workloads, rng), None)
    assert (sit.curves.confidence == 0.0).all()
    assert sit.curves.natural_known is not None and not sit.curves.natural_known.any()


def test_priors_per_workload_class_for_jobs_not_seen_yet() -> None:
    orienter = Orienter()
    t = run(orienter, ["1"] * 4 + ["2"] * 4, ["robust"] * 4 + ["sensitive"] * 4, 0.0, 90)
    t = run(orienter, ["3"] * 4 + ["4"] * 4, ["robust"] * 4 + ["sensitive"] * 4, t, 90, seed=1)
    # Jobs 1-4 end; an hour later they are committed to their class's prior.
    rng = np.random.default_rng(3)
    idle = ["", "", "", "", "", "", "", ""]
    orienter.orient(fleet_snapshot(t + 4000, np.full(8, 700.0), idle, ["robust"] * 8, rng), None)
    jobs = ["5"] * 4 + ["6"] * 4
    workloads = ["robust"] * 4 + ["sensitive"] * 4
    sit = orienter.orient(fleet_snapshot(t + 4015, np.full(8, 700.0), jobs, workloads, rng), None)
    sit = orienter.orient(fleet_snapshot(t + 4030, np.full(8, 700.0), jobs, workloads, rng), None)
    c = sit.curves
    assert c.source[0] == "class_prior" and c.source[4] == "class_prior"
    assert c.confidence[0] == 0.0
    assert curve_error(c.a[0], c.b[0], TRUE["robust"]) < 0.06
    assert curve_error(c.a[4], c.b[4], TRUE["sensitive"]) < 0.06


def test_curves_survive_a_restart() -> None:
    orienter = Orienter()
    jobs, workloads = ["1"] * 4, ["robust"] * 4
    t = run(orienter, jobs, workloads, 0.0, 60)
    restored = Orienter()
    restored.load_dict(json.loads(json.dumps(orienter.to_dict(), allow_nan=False)))
    rng_a, rng_b = np.random.default_rng(4), np.random.default_rng(4)
    a = orienter.orient(fleet_snapshot(t, np.full(4, 480.0), jobs, workloads, rng_a), None)
    b = restored.orient(fleet_snapshot(t, np.full(4, 480.0), jobs, workloads, rng_b), None)
    assert np.allclose(a.curves.a, b.curves.a) and np.allclose(a.curves.b, b.curves.b)
    assert np.allclose(a.curves.confidence, b.curves.confidence)
    assert np.allclose(a.curves.natural_w, b.curves.natural_w)

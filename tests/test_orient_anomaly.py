"""Anomaly detection on synthetic fleets: every detector on its own signal, none on the normal
life of a fleet (cap changes, noise), evidence, persistence, causality and saved state."""

from __future__ import annotations

import json
import tracemalloc
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from agent.core.curves import throughput_at_power
from agent.core.situation import Situation
from agent.core.snapshot import Metric, Snapshot, build_snapshot
from agent.orient.orienter import Orienter
from agent.orient.settings import OrientSettings

N = 16
ALPHA = 0.7  # thermal decay per 15 s cycle
AMBIENT = 30.0


@dataclass
class Fleet:
    """A small synthetic fleet with first-order thermals and DVFS clocks; faults by hand."""

    seed: int = 0
    t: float = 0.0
    rng: np.random.Generator = field(init=False)
    cap: npt.NDArray[np.float64] = field(init=False)
    natural: npt.NDArray[np.float64] = field(init=False)
    r: npt.NDArray[np.float64] = field(init=False)
    temp: npt.NDArray[np.float64] = field(init=False)
    clock_factor: npt.NDArray[np.float64] = field(init=False)
    extra_w: npt.NDArray[np.float64] = field(init=False)
    xid: npt.NDArray[np.float64] = field(init=False)
    age: npt.NDArray[np.float64] = field(init=False)
    util_drop: npt.NDArray[np.float64] = field(init=False)
    frozen: npt.NDArray[np.bool_] = field(init=False)  # readings served as last served
    served: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] = field(init=False)
    job: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.job = [str(100 + i // 4) for i in range(N)]
        self.rng = np.random.default_rng(self.seed)
        self.cap = np.full(N, 700.0)
        self.natural = np.repeat([620.0, 560.0, 480.0, 400.0], 4)
        self.r = 0.074 * self.rng.uniform(0.97, 1.03, N)
        self.temp = AMBIENT + self.r * self.natural
        self.clock_factor = np.ones(N)
        self.extra_w = np.zeros(N)
        self.xid = np.zeros(N)
        self.age = np.zeros(N)
        self.util_drop = np.zeros(N)
        self.frozen = np.zeros(N, dtype=bool)
        self.served = (np.zeros(N), np.zeros(N))

    def power(self) -> npt.NDArray[np.float64]:
        mean = np.minimum(self.natural, 0.95 * self.cap)
        noisy = mean * (1 + 0.01 * self.rng.standard_normal(N))
        noisy = np.minimum(noisy, self.cap)
        return np.where(self.xid == 79, 75.0, noisy + self.extra_w)

    def step(self) -> Snapshot:
        self.t += 15.0
        p = self.power()
        self.temp = ALPHA * self.temp + (1 - ALPHA) * (AMBIENT + self.r * p)
        x = np.minimum(np.minimum(self.natural, 0.95 * self.cap) / self.natural, 1.0)
        clock = 1900.0 * throughput_at_power(x, 1.0, 1.1, 1.6) * self.clock_factor
        clock = np.where(self.xid == 79, 0.0, clock)
        p = np.where(self.frozen, self.served[0], p)
        temp = np.where(self.frozen, self.served[1], self.temp)
        self.served = (p, temp)
        return build_snapshot(
            time_s=self.t,
            node_of_gpu=[f"node{i // 8 + 1}" for i in range(N)],
            gpu=[i % 8 for i in range(N)],
            uuid=[f"GPU-{i:02d}" for i in range(N)],
            model=["NVIDIA H100 80GB HBM3"] * N,
            job=list(self.job),
            values={
                Metric.POWER_W: p,
                Metric.POWER_LIMIT_W: self.cap.copy(),
                Metric.MAX_LIMIT_W: np.full(N, 700.0),
                Metric.MIN_LIMIT_W: np.full(N, 200.0),
                Metric.TEMP_C: temp,
                Metric.UTIL_PCT: np.where(
                    self.xid == 79, 0.0, 97.0 - self.util_drop + self.rng.normal(0, 0.5, N)
                ),
                Metric.SM_CLOCK_MHZ: clock,
                Metric.XID: self.xid.copy(),
            },
            age_s=self.age.copy(),
            stale=self.age > 45,
        )

    def warm(self, orienter: Orienter, cycles: int = 60) -> Situation:
        """Normal life: the agent moves caps every few cycles (the thermal model needs the
        fleet to move to learn its time constant)."""
        sit = orienter.orient(self.step(), None)
        for c in range(cycles):
            if c % 6 == 0:
                self.cap = np.where(self.rng.random(N) < 0.5, self.rng.uniform(350, 700, N), 700.0)
            sit = orienter.orient(self.step(), None)
            assert not sit.anomalies.flagged.any(), (c, sit.anomalies.kind[sit.anomalies.flagged])
        return sit


def test_normal_life_flags_nothing() -> None:
    fleet = Fleet(seed=1)
    sit = Fleet.warm(fleet, Orienter(), cycles=120)
    assert sit.anomalies is not None and sit.anomalies.persistent is not None
    assert not sit.anomalies.persistent.any()


def test_power_past_the_cap_is_flagged_with_evidence() -> None:
    fleet, orienter = Fleet(), Orienter()
    fleet.warm(orienter)
    fleet.cap[:] = 500.0
    orienter.orient(fleet.step(), None)  # the new caps take hold
    fleet.extra_w[5] = 200.0
    sit = orienter.orient(fleet.step(), None)
    a = sit.anomalies
    assert a is not None
    assert np.flatnonzero(a.flagged).tolist() == [5]
    assert a.kind[5] == "power" and a.score[5] >= 1.0
    (ev,) = [e for e in a.evidence[5] if e["kind"] == "power"]
    assert ev["metric"] == "power_w" and ev["value"] > ev["expected_hi"]
    assert ev["score"] >= 1.0 and set(a.evidence) == {5}


def test_a_straggler_among_its_job_peers() -> None:
    fleet, orienter = Fleet(), Orienter()
    fleet.warm(orienter)
    fleet.clock_factor[9] = 0.7
    sit = orienter.orient(fleet.step(), None)
    a = sit.anomalies
    assert a is not None
    assert np.flatnonzero(a.flagged).tolist() == [9] and a.kind[9] == "straggler"
    ev = a.evidence[9][0]
    assert ev["metric"] == "sm_clock_mhz" and ev["value"] < ev["expected_lo"]


def test_gpus_held_under_a_cap_set_in_a_long_warm_up_are_no_stragglers() -> None:
    """Job 200 on GPUs 8-11 warms up longer than the draw tracker waits (its ramp's draw is
    learned as its natural draw); the agent caps it there, the ramp ends under the cap (its
    clocks fall: the cap binds), then lifts the caps of two of its GPUs. The two still held
    run slower than their curve expects at the learned draw, by the agent's own cap: no
    straggler (their peers at the same draw are their measure)."""
    fleet, orienter = Fleet(), Orienter()
    fleet.warm(orienter)
    fleet.cap[:] = 700.0
    job = slice(8, 12)
    fleet.job[job] = ["200"] * 4
    fleet.natural[job] = 250.0  # the ramp, past the tracker's 180 s warm-up
    for _ in range(20):
        orienter.orient(fleet.step(), None)
    fleet.cap[job] = 260.0
    fleet.natural[job] = 620.0  # the ramp ends, held under the cap
    for _ in range(10):
        a = orienter.orient(fleet.step(), None).anomalies
        assert a is not None and not a.flagged.any(), a.kind[a.flagged]
    fleet.cap[8:10] = 700.0
    for _ in range(6):
        a = orienter.orient(fleet.step(), None).anomalies
        assert a is not None
        # (GPUs 8 and 9 may be flagged `power`: their draw rose past the ramp's learned level.)
        assert not (a.flagged & (a.kind == "straggler")).any(), np.flatnonzero(a.flagged)


def test_a_whole_job_moving_together_is_its_phase_and_a_gpu_apart_from_it_is_seen() -> None:
    """All four GPUs of job 102 slow their clocks and idle their SMs together (a collective
    stall, a data stall): the job's phase, no GPU's fault. One of them slowing further than
    its peers at the same moment is a straggler still."""
    fleet, orienter = Fleet(), Orienter()
    fleet.warm(orienter)
    job = slice(8, 12)
    fleet.clock_factor[job] = 0.7
    fleet.util_drop[job] = 60.0
    for _ in range(3):
        sit = orienter.orient(fleet.step(), None)
        assert sit.anomalies is not None and not sit.anomalies.flagged.any()
    fleet.clock_factor[9] = 0.45
    a = orienter.orient(fleet.step(), None).anomalies
    assert a is not None
    assert np.flatnonzero(a.flagged).tolist() == [9] and a.kind[9] == "straggler"


def test_frozen_readings_say_nothing_and_raise_nothing() -> None:
    """GPU 3's exporter hangs, serving its last power and temperature while the GPU works on;
    the agent then lowers its cap under the frozen draw: no excursion, no alarm."""
    fleet, orienter = Fleet(), Orienter()
    fleet.warm(orienter)
    fleet.cap[:] = 700.0
    for _ in range(3):
        orienter.orient(fleet.step(), None)
    fleet.frozen[3] = True
    for _ in range(3):
        orienter.orient(fleet.step(), None)
    fleet.cap[3] = 450.0
    for _ in range(5):
        a = orienter.orient(fleet.step(), None).anomalies
        assert a is not None and not a.flagged.any(), a.kind[a.flagged]


def test_a_failed_fan_shows_in_the_thermal_model() -> None:
    fleet, orienter = Fleet(), Orienter()
    fleet.warm(orienter, cycles=90)
    fleet.r[3] *= 1.6
    flagged_at = None
    for k in range(1, 4):
        sit = orienter.orient(fleet.step(), None)
        assert sit.anomalies is not None
        if sit.anomalies.flagged[3] and flagged_at is None:
            flagged_at = k
            assert sit.anomalies.kind[3] in ("temp", "hot_vs_peers")
        others = np.delete(sit.anomalies.flagged, 3)
        assert not others.any()
    assert flagged_at is not None and flagged_at <= 2


def test_dropout_from_the_age_of_samples_and_persistence() -> None:
    fleet, orienter = Fleet(), Orienter()
    fleet.warm(orienter)
    kinds = []
    for _ in range(5):
        fleet.age[8:] += 15.0  # node2's exporter stopped answering
        sit = orienter.orient(fleet.step(), None)
        assert sit.anomalies is not None
        kinds.append(set(sit.anomalies.kind[sit.anomalies.flagged].tolist()))
        assert not sit.anomalies.flagged[:8].any()
    # The node's first silent cycle could be its exporter restarting; the second is a dropout.
    assert kinds[0] == set() and kinds[1] == {"dropout"} and sit.anomalies.flagged[8:].all()
    assert sit.anomalies.persistent is not None and sit.anomalies.persistent[8:].all()


def test_a_node_away_for_one_cycle_is_a_restart_and_a_gpu_alone_silent_a_dropout() -> None:
    fleet, orienter = Fleet(), Orienter()
    fleet.warm(orienter)
    fleet.age[8:] = 60.0  # node2's exporter restarts: one scrape missed
    a = orienter.orient(fleet.step(), None).anomalies
    assert a is not None and not a.flagged.any()
    fleet.age[8:] = 0.0
    for _ in range(3):
        a = orienter.orient(fleet.step(), None).anomalies
        assert a is not None and not a.flagged.any()
    fleet.age[11] = 60.0  # one GPU's readings stop while its node reports
    a = orienter.orient(fleet.step(), None).anomalies
    assert a is not None and np.flatnonzero(a.flagged).tolist() == [11]
    assert a.kind[11] == "dropout"


def test_a_drain_worthy_health_condition_explains_the_rest() -> None:
    fleet, orienter = Fleet(), Orienter()
    fleet.warm(orienter)
    fleet.xid[2] = 79  # fell off the bus: no clock, idle draw, no utilization
    sit = orienter.orient(fleet.step(), None)
    assert sit.health is not None and sit.health.code[2] == "xid:79"
    assert sit.anomalies is not None and not sit.anomalies.flagged.any()


def test_detection_is_causal_and_state_survives_a_restart() -> None:
    def run(save_at: int | None) -> list[list[str]]:
        fleet, orienter = Fleet(seed=3), Orienter()
        fleet.warm(orienter)
        out = []
        for k in range(8):
            if k == 3:
                fleet.extra_w[1] = 250.0
                fleet.clock_factor[12] = 0.6
            if save_at == k:
                state = json.loads(json.dumps(orienter.to_dict(), allow_nan=False))
                orienter = Orienter()
                orienter.load_dict(state)
            sit = orienter.orient(fleet.step(), None)
            assert sit.anomalies is not None
            out.append(sit.anomalies.kind.tolist())
        return out

    straight = run(None)
    assert straight[3][1] == "power" and straight[3][12] == "straggler"
    assert run(save_at=2) == straight  # saved, restored, and nothing learned was lost
    # A prefix sees exactly what the full run saw at those cycles.
    fleet, orienter = Fleet(seed=3), Orienter()
    fleet.warm(orienter)
    first = [orienter.orient(fleet.step(), None).anomalies.kind.tolist() for _ in range(3)]
    assert first == straight[:3]


def test_an_absurd_power_sample_costs_no_memory() -> None:
    """One absurd draw (DCGM's blank 2^47 W, an infinity, a negative) is that GPU's problem: the
    peer groups (node or job x draw band) stay as small as on a sane fleet."""
    fleet, orienter = Fleet(), Orienter()
    fleet.warm(orienter, cycles=20)
    for bad in (2.0**47, 1e300, np.inf, -np.inf, -50.0, 1e9):
        snap = fleet.step()
        power = snap.values[Metric.POWER_W].copy()
        power[5] = bad
        snap = replace(
            snap,
            values={**snap.values, Metric.POWER_W: power},
            valid={**snap.valid, Metric.POWER_W: np.isfinite(power)},
        )
        tracemalloc.start()
        try:
            sit = orienter.orient(snap, None)
            peak_b = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak_b < 64 << 20, (bad, peak_b)
        assert sit.anomalies is not None and not np.delete(sit.anomalies.flagged, 5).any()


def test_slow_models_reuse_their_findings_between_runs_for_the_same_gpus() -> None:
    fleet = Fleet()
    orienter = Orienter(settings=OrientSettings(slow_models_every_cycles=3))
    found = [orienter.orient(fleet.step(), None).anomalies for _ in range(6)]
    # Run on cycles 3 and 6 (and the first); the cycles between reuse the last findings.
    assert found[1] is found[0] and found[3] is found[2]
    assert found[2] is not found[1] and found[5] is not found[4]
    # Other GPUs in the rows: the models run again, whatever the cycle.
    moved = fleet.step()
    moved = replace(moved, uuid=moved.uuid[::-1].copy())
    assert orienter.orient(moved, None).anomalies is not found[5]

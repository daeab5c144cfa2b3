"""inference_slo: the lowest SM clock lock keeping a service's p90 latencies under its SLOs,
stepping down while comfortable, backing off at once at risk, learning per load where risk
lies; the clock intents it proposes, and the gate refusing them until the node daemon's clock
lever lands."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from agent.core.app_metrics import THROUGHPUT_KIND_LABEL, THROUGHPUT_UNIT_LABEL
from agent.core.intents import GpuTargets, LockClocks, ResetClocks
from agent.core.situation import Situation
from agent.core.snapshot import Metric, build_snapshot
from agent.orient.orienter import Orienter
from policies.base import PolicyMemory
from policies.inference_slo import InferenceSlo, InferenceSloMemory, InferenceSloSettings

H100 = "NVIDIA H100 80GB HBM3"
SLO = InferenceSloSettings(ttft_p90_slo_s=0.25, tpot_p90_slo_s=0.04)


def situation(ttft_s: float, rate: float = 1000.0, kind: str = "vllm") -> Situation:
    """Two GPUs of service job 7 (their vLLM figures), one GPU of training job 8."""
    snap = build_snapshot(
        time_s=0.0,
        node_of_gpu=["n1", "n1", "n2"],
        gpu=[0, 1, 0],
        uuid=["GPU-a", "GPU-b", "GPU-c"],
        model=[H100] * 3,
        job=["7", "7", "8"],
        values={
            Metric.POWER_W: [250.0, 250.0, 600.0],
            Metric.POWER_LIMIT_W: [700.0] * 3,
            Metric.MIN_LIMIT_W: [200.0] * 3,
            Metric.MAX_LIMIT_W: [700.0] * 3,
            Metric.SM_CLOCK_MHZ: [1980.0] * 3,
            Metric.APP_RATE_PER_S: [rate, rate, np.nan],
            Metric.TTFT_P90_S: [ttft_s, ttft_s, np.nan],
            Metric.TPOT_P90_S: [0.02, 0.02, np.nan],
        },
        age_s=[1.0] * 3,
        stale=[False] * 3,
    )
    snap = replace(
        snap,
        labels={
            THROUGHPUT_KIND_LABEL: np.array([kind, kind, "sm_clock"]),
            THROUGHPUT_UNIT_LABEL: np.array(["tokens", "tokens", "relative"]),
        },
    )
    return Orienter().orient(snap, None)


def lock_of(intents: list[object]) -> float | None:
    """The lock's share of the maximum clock (None: no lock proposed)."""
    for intent in intents:
        if isinstance(intent, LockClocks):
            assert intent.targets.names() == ["n1/gpu0", "n1/gpu1"]  # the service's GPUs only
            return float(intent.max_mhz[0]) / 1980.0
    return None


def decide(policy: InferenceSlo, memory: PolicyMemory, sit: Situation, now_s: float):  # type: ignore[no-untyped-def]
    decision = policy.decide(sit, memory, now_s)
    return decision.intents, decision.memory


def test_steps_down_while_comfortable_and_backs_off_at_once_at_risk() -> None:
    policy = InferenceSlo(SLO)
    memory: PolicyMemory = InferenceSloMemory()
    locks = []
    for k in range(8):  # p90 TTFT 0.1 s: far under its 0.25 s SLO
        intents, memory = decide(policy, memory, situation(0.1), 15.0 * k)
        locks.append(lock_of(intents))
    assert locks == sorted(locks, reverse=True) and locks[-1] == 1.0 - 8 * SLO.step_frac
    intents, memory = decide(policy, memory, situation(0.245), 120.0)  # at risk
    backed = lock_of(intents)
    assert backed == locks[-1] + SLO.backoff_steps * SLO.step_frac
    # Never below the lowest lock it is allowed.
    for k in range(60):
        intents, memory = decide(policy, memory, situation(0.05, rate=10.0), 135.0 + 15 * k)
    assert lock_of(intents) == SLO.min_clock_frac


def test_a_load_once_at_risk_raises_the_lock_before_the_latency_does() -> None:
    policy = InferenceSlo(SLO)
    memory: PolicyMemory = InferenceSloMemory()
    t = 0.0
    for _ in range(12):  # comfortable at low load: down to 0.7
        _, memory = decide(policy, memory, situation(0.1, rate=1000.0), t)
        t += 15
    intents, memory = decide(policy, memory, situation(0.245, rate=2000.0), t)  # a burst: risk
    risky_lock = 1.0 - 12 * SLO.step_frac
    for _ in range(10):  # back at low load: straight back down to what was comfortable there
        t += 15
        intents, memory = decide(policy, memory, situation(0.12, rate=1000.0), t)
    low = lock_of(intents)
    assert low is not None and low <= risky_lock
    # The load returns to where it was at risk: the lock rises above that at once, while the
    # latency still reads comfortable.
    intents, memory = decide(policy, memory, situation(0.12, rate=2000.0), t + 15)
    high = lock_of(intents)
    assert high is not None and high > risky_lock


def test_only_inference_services_with_figures_get_locks_and_a_release_resets() -> None:
    policy = InferenceSlo(SLO)
    memory: PolicyMemory = InferenceSloMemory()
    intents, _ = decide(policy, memory, situation(0.1, kind="sm_clock"), 0.0)
    assert intents == []  # the SM-clock proxy says nothing of latencies
    intents, memory = decide(policy, memory, situation(0.1), 0.0)
    assert lock_of(intents) is not None
    seen = []
    for k in range(1, 8):  # at risk again and again: back to full clock, the lock released
        intents, memory = decide(policy, memory, situation(0.3), 15.0 * k)
        seen.extend(intents)
    resets = [i for i in seen if isinstance(i, ResetClocks)]
    assert len(resets) == 1 and resets[0].targets.names() == ["n1/gpu0", "n1/gpu1"]
    assert lock_of(intents) is None and intents == []  # released once, then nothing


def test_the_gate_refuses_clock_intents_until_the_node_daemon_applies_them() -> None:
    from agent.act.gate import Gate
    from agent.act.guard import GuardSettings
    from agent.act.ledger import Ledger

    sit = situation(0.1)
    intent = LockClocks(
        policy="inference_slo",
        reason="test",
        targets=GpuTargets.from_rows(sit.snapshot, [0]),
        min_mhz=np.array([1000.0]),
        max_mhz=np.array([1000.0]),
    )
    assert intent.to_records()[0]["max_mhz"] == 1000
    gate = Gate(Ledger(GuardSettings()))
    review = gate.review([intent], sit, 0.0)
    assert not review.allowed and "not yet applied" in review.refused[0].reason


def test_the_inference_scenario_prints_a_line_per_controller() -> None:
    """bench/decision_quality.py --scenario inference, shortened (its figures: the report)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    code = (
        f"import sys; sys.path.insert(0, {str(bench)!r}); import json, _inference; "
        "[print(json.dumps(r)) for r in _inference.evaluate(7, duration_s=900.0)]"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    rows = {r["controller"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert set(rows) == {"ooda", "oracle", "caps_only", "none"}
    for row in rows.values():
        assert {"tokens_per_joule", "slo_attainment", "energy_saving_vs_oracle_saving"} <= set(row)
    assert rows["none"]["energy_saving"] == 0.0
    assert rows["oracle"]["tokens_per_joule"] > rows["caps_only"]["tokens_per_joule"]
    assert rows["ooda"]["tokens_per_joule"] > rows["none"]["tokens_per_joule"]

"""Acceptance on the twin: metered energy per job within 1% of the twin's true energy over a
(shortened, bounded) twin day, and per account the sum of its jobs (bench/meter.py: a full day)."""

from __future__ import annotations

import pytest

from agent.meter.ledger import Ledger
from agent.meter.meter import Meter
from agent.sim.accounts import JobEnergyTruth, TwinAccounts
from agent.sim.adapters import TwinSource
from agent.sim.phases import NO_PHASES, NORMAL_DAY
from agent.sim.twin import Twin, TwinSpec

INTERVAL_S = 15.0
HOURS = 6.0


@pytest.fixture(scope="module", params=["plain", "normal-day"])
def metered(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[JobEnergyTruth, Ledger]:
    # Short jobs (median 20 min) so the day has many starts and ends to get right; and the same
    # with a real fleet's normal phases (checkpoint stalls, flat-lined power readings, exporter
    # restarts that hide a node's GPUs and reset their counters...).
    phases = NORMAL_DAY if request.param == "normal-day" else NO_PHASES
    twin = Twin(TwinSpec(nodes=4, gpus_per_node=8, seed=11, median_job_s=1200.0, phases=phases))
    truth = JobEnergyTruth(twin)
    source = TwinSource(twin)
    ledger = Ledger(tmp_path_factory.mktemp("meter") / "l.sqlite", timeline="twin")
    meter = Meter(ledger, accounting=TwinAccounts(twin), node_overhead_w=500.0)
    meter.book(source.observe(twin.t_s))
    while twin.t_s < HOURS * 3600:
        truth.run_until(twin.t_s + INTERVAL_S)
        assert meter.book(source.observe(twin.t_s)).booked
    return truth, ledger


def test_every_jobs_metered_energy_is_within_1pct_of_the_truth(
    metered: tuple[JobEnergyTruth, Ledger],
) -> None:
    truth, ledger = metered
    booked = ledger.job_totals()
    jobs = [j for j in truth.joules if j]
    assert len(jobs) > 50  # many starts and ends
    errors = {j: abs(booked.get(j, 0.0) - truth.joules[j]) / truth.joules[j] for j in jobs}
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] < 0.01, f"job {worst}: {errors[worst]:.2%} off"
    # Nothing lost or made up: the fleet's total is the twin's (the counters are exact).
    assert sum(booked.values()) == pytest.approx(sum(truth.joules.values()), rel=1e-9)


def test_each_accounts_energy_is_the_sum_of_its_jobs(
    metered: tuple[JobEnergyTruth, Ledger],
) -> None:
    _, ledger = metered
    per_account: dict[str, float] = {}
    for row in ledger.rows():
        job, account, gpu_j, overhead_j = row[1], row[3], row[6], row[7]
        key = "(idle)" if job == "" else account
        per_account[key] = per_account.get(key, 0.0) + gpu_j + overhead_j
    accounts = {a: j for a, (j, _, _) in ledger.account_totals().items()}
    assert set(accounts) == {"team-a", "team-b", "team-c", "(idle)"}
    assert accounts == pytest.approx(per_account, rel=1e-12)
    # Node overhead is booked in full: 4 nodes x 500 W over the whole day.
    overhead = ledger.db.execute("SELECT sum(overhead_j) FROM usage").fetchone()[0]
    assert overhead == pytest.approx(4 * 500.0 * HOURS * 3600, rel=1e-9)

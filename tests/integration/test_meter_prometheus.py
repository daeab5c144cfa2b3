"""Acceptance: `ooda meter backfill` from a real Prometheus matches the live ledger within 1%.

The twin's telemetry, as its DCGM exporter serves it (energy counter in mJ, job labels), is
booked live step by step and also loaded into a real Prometheus's history (promtool
create-blocks-from openmetrics); the backfill rebuilds a ledger from Prometheus alone (range
queries, the same recorder `ooda record` uses)."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent.core.errors import TelemetryError
from agent.meter.ledger import J_PER_KWH, Ledger
from agent.meter.meter import Meter
from agent.observe.signal import PromQLSignal
from agent.observe.trace import TraceReader
from agent.replay.twin_trace import run_twin
from agent.sim.twin import TwinSpec
from tests.conftest import last_json
from tests.integration.conftest import PrometheusFactory, ooda, tsdb_blocks

pytestmark = pytest.mark.integration

STEP_S = 15
STEPS = 160  # 40 minutes
PRICE = "electricity_price_eur_per_kwh"


def add_price_series(openmetrics: Path, start: int, end: int) -> None:
    """A price signal in the history: 0.20 EUR/kWh for the first half, 0.40 after, sampled
    every 15 s (before the file's `# EOF`)."""
    lines = [f"# TYPE {PRICE} gauge"]
    half = (start + end) / 2
    for t in range(start - 60, end + 60, STEP_S):
        lines.append(f"{PRICE} {0.2 if t < half else 0.4} {t}.000")
    text = openmetrics.read_text().removesuffix("# EOF\n")
    openmetrics.write_text(text + "\n".join(lines) + "\n# EOF\n")


def test_backfill_from_prometheus_matches_the_live_ledger(
    prometheus_factory: PrometheusFactory, tmp_path: Path
) -> None:
    # Short jobs: the 40 minutes hold starts and ends to attribute.
    spec = TwinSpec(nodes=4, gpus_per_node=4, seed=4, median_job_s=600.0)
    trace = tmp_path / "q.parquet"
    run_twin(spec, duration_s=STEP_S * (STEPS - 1), record_to=trace)
    start = int(time.time()) // STEP_S * STEP_S - 3600  # well inside what Prometheus serves
    end = start + STEP_S * (STEPS - 1)

    openmetrics = tmp_path / "q.om"
    done = ooda("trace", "export", "--openmetrics", str(trace), "-o", str(openmetrics),
                "--start", str(start))  # fmt: skip
    assert done.returncode == 0, done.stderr
    add_price_series(openmetrics, start, end)
    data = tsdb_blocks(openmetrics, tmp_path / "data")
    # Scrapes nothing: only the loaded history. A scrape that no longer finds a series (a job
    # ended, its label went) marks it stale; loaded blocks carry no such marks, so a lookback
    # shorter than a step stands in for them (else an ended job's series would still answer
    # for five minutes beside the GPU's new one).
    prom = prometheus_factory({}, data=data, args=[f"--query.lookback-delta={STEP_S - 1}s"])

    # The live ledger: the same telemetry booked as it came, priced by instant queries.
    price = PromQLSignal(prom.source(), PRICE, "price")
    live = Meter(
        Ledger(tmp_path / "live.sqlite", timeline="unix"), node_overhead_w=250.0, price=price
    )
    for snapshot in TraceReader(trace).snapshots():
        live.book(replace(snapshot, time_s=snapshot.time_s + start))
    expected = live.ledger.job_totals()
    live_cost = live.ledger.db.execute("SELECT sum(cost), sum(unpriced_j) FROM usage").fetchone()
    live.close()
    assert live_cost[1] == 0.0  # every interval found its price

    config = tmp_path / "agent.toml"
    config.write_text(
        f'[cluster]\nnode_overhead_w = 250.0\n[meter.tariff]\nkind = "promql"\n'
        f'query = "{PRICE}"\ncurrency = "EUR"\n'
    )
    backfilled = tmp_path / "backfill.sqlite"
    args = ["meter", "backfill", "--prometheus", prom.url, "--start", str(start), "--end",
            str(end), "--step", f"{STEP_S}s", "--config", str(config), "--ledger",
            str(backfilled), "--json"]  # fmt: skip
    done = ooda(*args, timeout_s=120)
    assert done.returncode == 0, done.stderr
    result = last_json(done.stdout)
    assert result["booked"] == STEPS - 1 and result["errors"] == []

    got = Ledger(backfilled, read_only=True).job_totals()
    jobs = [j for j in expected if j]
    assert len(jobs) >= 8
    for job in jobs:
        assert got.get(job, 0.0) == pytest.approx(expected[job], rel=0.01), job
    assert sum(got.values()) == pytest.approx(sum(expected.values()), rel=0.01)
    assert result["kwh"] * J_PER_KWH == pytest.approx(
        sum(expected.values()) + 4 * 250.0 * STEP_S * (STEPS - 1), rel=0.01
    )

    # Priced from the same series by range queries: the cost of the same energy.
    cost = Ledger(backfilled, read_only=True).db.execute("SELECT sum(cost) FROM usage").fetchone()
    assert cost[0] == pytest.approx(live_cost[0], rel=0.01)
    kwh = result["kwh"]
    assert 0.2 * kwh < cost[0] < 0.4 * kwh  # both prices were used
    # A query that gives many series is not a price: unknown one at a time, an error at once.
    many = PromQLSignal(prom.source(), "DCGM_FI_DEV_POWER_USAGE", "meter.tariff.query")
    assert math.isnan(float(many.at(np.array([start + 30.0]))[0]))
    several = r"meter\.tariff\.query: .* gives \d+ series; it must give one"
    with pytest.raises(TelemetryError, match=several):
        many.at(np.arange(start, start + 300.0, 15.0))

    again = last_json(ooda(*args, timeout_s=120).stdout)  # a second backfill books nothing
    assert again["booked"] == 0 and again["already_booked"] == STEPS - 1
    assert Ledger(backfilled, read_only=True).job_totals() == got

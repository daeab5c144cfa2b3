"""The meter in the daemon: every cycle books its interval, a reload keeps booking on the same
ledger without a gap, and the ledger's series are on /metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.meter.ledger import Ledger
from tests.daemon_helpers import drive, in_process, sample, twin_config, write

METER = """
[meter]
enabled = true
[meter.tariff]
kind = "flat"
price_per_kwh = 0.3
"""


def test_cycles_book_and_a_reload_goes_on_without_a_gap(tmp_path: Path) -> None:
    from agent.core.clock import FakeClock

    config = write(tmp_path / "ooda.toml", twin_config(speed=0.0, extra=METER))
    daemon = in_process(config, tmp_path / "state")
    wall = daemon.wall
    assert isinstance(wall, FakeClock)
    try:
        drive(daemon, wall, 4)
        assert sample(daemon, "ooda_meter_intervals_total", result="booked") == 3.0
        write(config, twin_config(speed=0.0, extra=METER + "[guard]\ncap_dead_band_w = 25\n"))
        assert daemon.reload()
        drive(daemon, wall, 3)
        assert sample(daemon, "ooda_meter_intervals_total", result="booked") == 6.0
        energy = sum(
            sample(daemon, "ooda_meter_energy_joules_total", account=a) or 0.0
            for a in ("team-a", "team-b", "team-c", "idle")
        )
        cost = sum(
            sample(daemon, "ooda_meter_cost_total", account=a) or 0.0
            for a in ("team-a", "team-b", "team-c", "idle")
        )
    finally:
        daemon.shutdown()
    ledger = Ledger(tmp_path / "state" / "lab.ledger.sqlite", read_only=True)
    spans = ledger.spans()
    assert [(a, b, n) for a, b, _, n, _, _ in spans] == [(15.0, 105.0, 6)]  # 15 s a cycle
    booked = sum(ledger.job_totals().values())
    assert energy > 0 and booked <= energy  # the series add node overhead to the GPUs' energy
    assert cost == pytest.approx(sum(row[11] for row in ledger.rows()))

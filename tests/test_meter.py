"""The meter: booking arithmetic (counter, power, switches, overhead, idle), the ledger's
idempotency and crash safety, price and carbon signals, and its config errors."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from agent.cli import main
from agent.config import parse_config
from agent.core.errors import ConfigError
from agent.core.jobs import JobRecord
from agent.core.situation import NodeStates
from agent.core.snapshot import Metric, Snapshot, build_snapshot
from agent.meter.booking import EnergySource, book_interval, reading_of
from agent.meter.export import write_csv, write_parquet
from agent.meter.ledger import EXPORT_COLUMNS, J_PER_KWH, Ledger, LedgerError, Prices
from agent.meter.meter import Meter
from agent.meter.pricing import Schedule, TimeOfUse, load_schedule, parse_clock
from agent.meter.settings import MeterSettings
from tests.conftest import last_json


def snap(
    t: float,
    power: list[float],
    energy: list[float] | None = None,
    jobs: list[str] | None = None,
    gpus_per_node: int = 2,
    uuids: list[str] | None = None,
) -> Snapshot:
    n = len(power)
    values = {Metric.POWER_W: power}
    if energy is not None:
        values[Metric.ENERGY_J] = energy
    return build_snapshot(
        time_s=t,
        node_of_gpu=[f"node{i // gpus_per_node + 1}" for i in range(n)],
        gpu=[i % gpus_per_node for i in range(n)],
        uuid=uuids or [f"GPU-{i}" for i in range(n)],
        model=["H100"] * n,
        job=jobs or [""] * n,
        values=values,
        age_s=[0.0] * n,
        stale=[False] * n,
    )


def book(a: Snapshot, b: Snapshot, **kw: object) -> dict[str, float]:
    parts = kw.pop("partitions", [""] * a.n_nodes)
    overhead = float(kw.pop("overhead_w", 0.0))  # type: ignore[arg-type]
    booking = book_interval(
        reading_of(a, parts, overhead),  # type: ignore[arg-type]
        reading_of(b, parts, overhead),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )
    return dict(zip(booking.job.tolist(), booking.gpu_j.tolist(), strict=True))


def test_the_counter_is_used_where_it_moved_forward_else_integrated_power() -> None:
    a = snap(0, [100.0, 200.0, 300.0], energy=[1000.0, 5000.0, math.nan], jobs=["1", "2", "3"])
    b = snap(10, [100.0, 400.0, 300.0], energy=[2500.0, 10.0, 7000.0], jobs=["1", "2", "3"])
    booking = book_interval(reading_of(a, [""] * 2), reading_of(b, [""] * 2))
    got = dict(
        zip(booking.job.tolist(), zip(booking.counter_j, booking.power_j, strict=True), strict=True)
    )
    assert got["1"] == (1500.0, 0.0)  # the counter's difference, not 10 s x 100 W
    assert got["2"] == (0.0, 3000.0)  # the counter went back (a reset): (200 + 400) / 2 x 10 s
    assert got["3"] == (0.0, 3000.0)  # no counter at the start
    only_power = book(a, b, source=EnergySource.POWER)
    assert only_power["1"] == 1000.0


def test_missing_readings_are_unmetered_never_zero() -> None:
    a = snap(0, [100.0, math.nan], jobs=["1", "2"])
    b = snap(10, [100.0, 150.0], jobs=["1", "2"])
    booking = book_interval(reading_of(a, [""]), reading_of(b, [""]), EnergySource.AUTO)
    assert booking.job.tolist() == ["1"]
    assert booking.unmetered_gpus == 1 and booking.metered_gpus == 1
    counter_only = book_interval(reading_of(a, [""]), reading_of(b, [""]), EnergySource.COUNTER)
    assert len(counter_only) == 0 and counter_only.unmetered_gpus == 2


def test_a_gpu_that_appears_is_not_booked_until_it_has_two_readings() -> None:
    a = snap(0, [100.0], uuids=["GPU-a"])
    b = snap(10, [100.0, 100.0], uuids=["GPU-b", "GPU-a"])
    booking = book_interval(reading_of(a, [""]), reading_of(b, [""]))
    assert booking.metered_gpus == 1 and booking.unmetered_gpus == 1
    assert float(booking.gpu_j.sum()) == 1000.0


def test_a_job_ending_at_full_draw_keeps_its_energy_up_to_its_end() -> None:
    # Two idle GPUs at 70 W show the idle level; the GPU switching from job 1 to idle drew
    # 500 W then 70 W: 4,000 J over 10 s is 500 W for 7.67 s.
    a = snap(0, [500.0, 70.0, 70.0, 70.0], energy=[0.0, 0.0, 0.0, 0.0], jobs=["1", "", "", ""])
    b = snap(10, [70.0, 70.0, 70.0, 70.0], energy=[4000.0, 700.0, 700.0, 700.0])
    got = book(a, b)
    assert got["1"] == pytest.approx(500.0 * (4000.0 / 10 - 70.0) / (500.0 - 70.0) * 10)
    assert got["1"] + got[""] == pytest.approx(4000.0 + 2100.0)


def test_a_reading_that_still_shows_the_ended_jobs_draw_books_it_to_that_job() -> None:
    # The sample at the end averages the moments before: it still shows 500 W, the job is gone.
    a = snap(0, [500.0, 70.0], energy=[0.0, 0.0], jobs=["1", ""], gpus_per_node=1)
    b = snap(10, [500.0, 70.0], energy=[5000.0, 700.0], gpus_per_node=1)
    assert book(a, b, partitions=["", ""])["1"] == pytest.approx(5000.0)


def test_the_schedulers_start_time_places_the_switch() -> None:
    a = snap(0, [70.0], energy=[0.0], jobs=[""], gpus_per_node=1)
    b = snap(10, [90.0], energy=[760.0], jobs=["7"], gpus_per_node=1)
    # Without times the two-level model gives job 7 what is above idle: 30% of the interval.
    assert book(a, b)["7"] == pytest.approx(760.0 - 70.0 * 7.0)
    started = book(a, b, times=lambda job: (2.0, math.nan) if job == "7" else (math.nan, math.nan))
    assert started["7"] == pytest.approx(760.0 - 70.0 * 2.0)
    assert started[""] == pytest.approx(140.0)


def test_overhead_follows_the_jobs_share_of_the_nodes_gpus_idle_goes_to_its_partition() -> None:
    a = snap(0, [300.0, 300.0, 300.0, 60.0], jobs=["1", "1", "2", ""], gpus_per_node=4)
    b = snap(10, [300.0, 300.0, 300.0, 60.0], jobs=["1", "1", "2", ""], gpus_per_node=4)
    booking = book_interval(
        reading_of(a, ["batch"], node_overhead_w=400.0),
        reading_of(b, ["batch"], node_overhead_w=400.0),
    )
    rows = {
        (j, p): (o, s)
        for j, p, o, s in zip(
            booking.job, booking.partition, booking.overhead_j, booking.gpu_s, strict=True
        )
    }
    assert rows[("1", "batch")] == (2000.0, 20.0)  # half the node's GPUs: half of 4,000 J
    assert rows[("2", "batch")] == (1000.0, 10.0)
    assert rows[("", "batch")] == (1000.0, 10.0)  # the idle GPU's share, booked as idle


def test_partitions_come_from_the_placement_systems_node_states() -> None:
    from agent.meter.booking import node_partitions

    nodes = NodeStates.unknown(2)
    assert node_partitions(nodes, 2) == ["", ""]
    with_parts = NodeStates(
        **{**nodes.__dict__, "partitions": (frozenset({"gpu", "debug"}), frozenset())}
    )
    assert node_partitions(with_parts, 2) == ["debug", ""]


# -- the ledger ---------------------------------------------------------------------------------


def meter_for(path: Path, **kw: object) -> Meter:
    return Meter(Ledger(path, timeline="t"), **kw)  # type: ignore[arg-type]


def series(n: int, step: float = 10.0) -> list[Snapshot]:
    """Two GPUs, job "1" then "2" on the first, idle on the second; counters rising."""
    out = []
    for k in range(n):
        job = "1" if k < n // 2 else "2"
        out.append(
            snap(
                k * step, [300.0, 60.0], energy=[300.0 * k * step, 60.0 * k * step], jobs=[job, ""]
            )
        )
    return out


def test_each_interval_is_booked_once_across_replays(tmp_path: Path) -> None:
    meter = meter_for(tmp_path / "l.sqlite")
    for s in series(10):
        meter.book(s)
    first = meter.ledger.job_totals()
    assert first["1"] + first["2"] == pytest.approx(300.0 * 90.0)
    for s in series(10):  # the same readings again (a replay, a restart that went back)
        assert not meter.book(s).booked
    assert meter.ledger.job_totals() == first
    assert [(a, b) for a, b, *_ in meter.ledger.spans()] == [(0.0, 90.0)]


def test_a_restart_books_the_interval_it_missed_from_the_cursor(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    readings = series(10)
    whole = meter_for(tmp_path / "whole.sqlite")
    for s in readings:
        whole.book(s)
    meter = meter_for(path)
    for s in readings[:4]:
        meter.book(s)
    meter.close()  # the process dies; the next one starts at reading 6 (4 and 5 missed)
    again = meter_for(path)
    result = again.book(readings[6])
    assert result.booked and (result.t0_s, result.t1_s) == (30.0, 60.0)
    for s in readings[7:]:
        again.book(s)
    assert again.ledger.job_totals() == pytest.approx(whole.ledger.job_totals())


def test_a_gap_longer_than_max_gap_is_left_unbooked(tmp_path: Path) -> None:
    meter = meter_for(tmp_path / "l.sqlite", max_gap_s=25.0)
    readings = series(10)
    meter.book(readings[0])
    result = meter.book(readings[3])
    assert not result.booked and "gap of 30 s" in result.reason
    assert meter.book(readings[4]).booked
    assert [(a, b) for a, b, *_ in meter.ledger.spans()] == [(30.0, 40.0)]


def test_backfill_never_books_what_the_live_meter_did(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    live = meter_for(path)
    readings = series(10)
    for s in readings[4:]:
        live.book(s)
    backfill = Meter(live.ledger, origin="backfill")
    booked = [backfill.book(s).booked for s in readings]
    assert booked == [False, True, True, True, True, False, False, False, False, False]
    # Job 1 holds the GPU to 40 s and shares the switching interval (equal draws: half each).
    assert live.ledger.job_totals()["1"] == pytest.approx(300.0 * 45.0)
    spans = [(a, b, o) for a, b, o, *_ in live.ledger.spans()]
    assert spans == [(0.0, 40.0, "backfill"), (40.0, 90.0, "live")]


def test_the_cursor_reading_survives_a_reopen_with_its_fleet(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite", timeline="t")
    reading = reading_of(series(2)[1], [""])
    ledger.move_cursor(reading)
    ledger.close()
    again = Ledger(tmp_path / "l.sqlite", timeline="t").cursor_reading()
    assert again is not None and again.time_s == 10.0
    assert again.uuid.tolist() == ["GPU-0", "GPU-1"]
    assert again.jobs().tolist() == ["2", ""]
    np.testing.assert_array_equal(again.energy_j, reading.energy_j)


def test_a_ledger_of_another_timeline_or_kind_is_refused(tmp_path: Path) -> None:
    Ledger(tmp_path / "l.sqlite", timeline="twin-1").close()
    with pytest.raises(LedgerError, match="timeline 'twin-1'"):
        Ledger(tmp_path / "l.sqlite", timeline="unix")
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(LedgerError, match="not a usable SQLite database"):
        Ledger(tmp_path / "junk.sqlite")
    with pytest.raises(LedgerError, match="no such file"):
        Ledger(tmp_path / "none.sqlite", read_only=True)


def test_the_ledger_is_in_wal_mode(tmp_path: Path) -> None:
    Ledger(tmp_path / "l.sqlite").close()
    db = sqlite3.connect(tmp_path / "l.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_retention_prunes_old_buckets_and_their_jobs(tmp_path: Path) -> None:
    meter = meter_for(tmp_path / "l.sqlite")
    for k in range(3):  # three hours, one job an hour
        t = k * 3600.0
        meter.book(snap(t + 1800, [100.0], energy=[0.0], jobs=[str(k)], gpus_per_node=1))
        meter.book(snap(t + 1810, [100.0], energy=[1000.0], jobs=[str(k)], gpus_per_node=1))
        meter.ledger.save_jobs([JobRecord(str(k), account="a")])
    assert meter.ledger.prune(3600.0) == 1
    assert sorted(meter.ledger.job_totals()) == ["1", "2"]
    assert meter.ledger.db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 2


def test_cost_and_carbon_are_booked_and_unknown_prices_are_said(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    booking = book_interval(
        reading_of(snap(0, [360.0], jobs=["1"], gpus_per_node=1), [""]),
        reading_of(snap(10_000, [360.0], jobs=["1"], gpus_per_node=1), [""]),
    )
    ledger.book(booking, Prices(0.25, 400.0))  # 1 kWh
    row = ledger.rows()[0]
    named = dict(zip(EXPORT_COLUMNS, row, strict=True))
    assert named["gpu_j"] == pytest.approx(J_PER_KWH)
    assert named["cost"] == pytest.approx(0.25) and named["co2_g"] == pytest.approx(400.0)
    later = book_interval(
        reading_of(snap(10_000, [360.0], jobs=["1"], gpus_per_node=1), [""]),
        reading_of(snap(20_000, [360.0], jobs=["1"], gpus_per_node=1), [""]),
    )
    ledger.book(later, Prices())
    totals = ledger.db.execute("SELECT sum(cost), sum(unpriced_j) FROM usage").fetchone()
    assert totals[0] == pytest.approx(0.25) and totals[1] == pytest.approx(J_PER_KWH)


def test_exports_round_trip(tmp_path: Path) -> None:
    meter = meter_for(tmp_path / "l.sqlite")
    for s in series(6):
        meter.book(s)
    meter.ledger.save_jobs([JobRecord("1", user="ann", account="physics", qos="high")])
    rows = meter.ledger.rows()
    assert write_csv(rows, tmp_path / "x.csv") == len(rows)
    assert (tmp_path / "x.csv").read_text().splitlines()[0] == ",".join(EXPORT_COLUMNS)
    write_parquet(rows, tmp_path / "x.parquet")
    table = pq.read_table(tmp_path / "x.parquet").to_pylist()
    by_job = {r["job"]: r for r in table}
    assert by_job["1"]["account"] == "physics" and by_job["1"]["user"] == "ann"
    assert sum(r["gpu_j"] for r in table) == pytest.approx(sum(r[6] for r in rows))


# -- accounting -----------------------------------------------------------------------------


class FakeAccounting:
    """Knows jobs "1" (running) at once and "2" only after a while (sacct once it ended)."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []
        self.ended = False

    def job_records(self, job_ids: list[str]) -> dict[str, JobRecord]:
        self.asked.append(list(job_ids))
        out = {}
        if "1" in job_ids:
            out["1"] = JobRecord("1", user="ann", account="physics", state="running")
        if "2" in job_ids and self.ended:
            out["2"] = JobRecord("2", user="bo", account="chem", state="completed")
        return out


def test_jobs_are_attributed_once_and_unknown_ones_asked_again_later(tmp_path: Path) -> None:
    accounting = FakeAccounting()
    meter = meter_for(tmp_path / "l.sqlite", accounting=accounting)
    readings = series(10, step=100.0)
    for s in readings[:8]:
        meter.book(s)
    asked = [j for batch in accounting.asked for j in batch]
    assert asked.count("1") == 2  # once when it came, once when it left (for its end)
    assert asked.count("2") == 1  # unknown: not asked again before ASK_AGAIN_S
    accounting.ended = True
    for s in readings[8:]:
        meter.book(s)
    accounts = meter.ledger.account_totals()
    assert set(accounts) == {"physics", "chem", "(idle)"}


# -- price and carbon -------------------------------------------------------------------------


def test_time_of_use_picks_the_period_by_local_weekday_and_time() -> None:
    tou = TimeOfUse(
        [(frozenset({0, 1, 2, 3, 4}), parse_clock("08:00"), parse_clock("20:00"), 0.30)],
        default=0.10,
        timezone="Europe/Berlin",
    )
    # 2024-05-06 was a Monday; Berlin is UTC+2 in May.
    monday_0700_utc = 1714978800.0  # 09:00 in Berlin
    saturday = monday_0700_utc + 5 * 86400
    monday_1900_utc = monday_0700_utc + 12 * 3600  # 21:00 in Berlin
    got = tou.at(np.array([monday_0700_utc, saturday, monday_1900_utc, math.nan]))
    assert got[:3].tolist() == [0.30, 0.10, 0.10] and math.isnan(got[3])


def test_a_schedule_holds_each_value_until_the_next_and_is_unknown_before(tmp_path: Path) -> None:
    path = tmp_path / "carbon.csv"
    path.write_text("time,g_per_kwh\n2024-05-06T00:00:00Z,300\n1715000000,150.5\n")
    schedule = load_schedule(path)
    got = schedule.at(np.array([1714953600.0 - 1, 1714953600.0, 1715000000.0 + 5]))
    assert math.isnan(got[0]) and got[1:].tolist() == [300.0, 150.5]
    assert isinstance(schedule, Schedule)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("when,g\n1,2\n", "header must name the columns time and g_per_kwh"),
        ("time,g_per_kwh\n2024-05-06T00:00:00,300\n", "line 2: '2024-05-06T00:00:00' has no time"),
        ("time,g_per_kwh\n1,lots\n", "line 2: could not convert"),
        ("time,g_per_kwh\n1,-3\n", "line 2: g_per_kwh must be a number in [0, 5000]"),
        ("time,g_per_kwh\n", "no rows"),
    ],
)
def test_a_bad_schedule_file_is_one_line_naming_the_file_and_line(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "carbon.csv"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        parse_config({"meter": {"carbon": {"kind": "schedule", "schedule_file": str(path)}}})
    message = str(err.value)
    assert "meter.carbon" in message and problem in message and "\n" not in message


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"tariff": {"kind": "flat"}}, "meter.tariff: kind = 'flat' needs price_per_kwh"),
        ({"tariff": {"kind": "time_of_use", "price_per_kwh": 0.1}}, "needs periods"),
        ({"tariff": {"kind": "promql"}}, "kind = 'promql' needs query"),
        ({"tariff": {"kind": "flat", "price_per_kwh": -1}}, "greater than or equal to 0"),
        ({"tariff": {"timezone": "Mars/Olympus"}}, "unknown time zone 'Mars/Olympus'"),
        (
            {
                "tariff": {
                    "kind": "time_of_use",
                    "price_per_kwh": 0.1,
                    "periods": [{"start": "20:00", "end": "08:00", "price_per_kwh": 1}],
                }
            },
            "a period over midnight is two periods",
        ),
        (
            {
                "tariff": {
                    "kind": "time_of_use",
                    "price_per_kwh": 0.1,
                    "periods": [{"start": "8:00", "end": "9:00", "price_per_kwh": 1}],
                }
            },
            "expected HH:MM",
        ),
        ({"carbon": {"kind": "constant"}}, "meter.carbon: kind = 'constant' needs g_per_kwh"),
        ({"carbon": {"kind": "constant", "g_per_kwh": 9000}}, "less than or equal to 5000"),
        ({"bucket_s": 7000}, "must divide a day"),
        ({"energy": "dcgm"}, "meter.energy"),
    ],
)
def test_meter_settings_errors_name_the_key(section: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"meter": section})
    assert problem in str(err.value)


def test_config_check_refuses_a_bad_meter_section_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[source]\nkind = "twin"\n[meter.tariff]\nkind = "flat"\n')
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "meter.tariff" in err


def test_defaults_meter_nothing() -> None:
    settings = MeterSettings()
    assert not settings.enabled and settings.tariff.kind == "none"


def test_report_json_parses_and_groups_sum_to_the_total(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "l.sqlite"
    meter = meter_for(path, accounting=FakeAccounting())
    for s in series(10, step=100.0):
        meter.book(s)
    meter.close()
    code = main(["report", "energy", "--ledger", str(path), "--by", "account", "--json"])
    assert code == 0
    data = last_json(capsys.readouterr().out)
    total = data["total"]["total_kwh"]
    assert total == pytest.approx((300.0 + 60.0) * 900.0 / J_PER_KWH)
    assert sum(g["usage"]["total_kwh"] for g in data["groups"]) == pytest.approx(total)
    assert {g["name"] for g in data["groups"]} == {"physics", "(unknown)", "(idle)"}
    assert main(["report", "energy", "--ledger", str(path), "--by", "nobody"]) == 2
    assert "--by: 'nobody' is not one of" in capsys.readouterr().err


def test_metrics_name_the_top_accounts_and_sum_the_rest_as_other() -> None:
    from prometheus_client import CollectorRegistry

    from agent.meter.metrics import MeterMetrics

    registry = CollectorRegistry()
    metrics = MeterMetrics(registry, top_accounts=2)
    metrics.seed({"big": (9e9, 0.0, 0.0), "small": (1.0, 0.0, 0.0), "(idle)": (5e9, 0.0, 0.0)})
    jobs = ["1", "2", "3", "4", ""]
    a = snap(0, [100.0] * 5, jobs=jobs, gpus_per_node=5)
    b = snap(10, [100.0] * 5, jobs=jobs, gpus_per_node=5)
    booking = book_interval(reading_of(a, ["gpu"]), reading_of(b, ["gpu"]))
    accounts = {"1": "big", "2": "small", "3": "newcomer", "4": ""}
    metrics.booked(booking, Prices(0.5, math.nan), accounts)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    energy = "ooda_meter_energy_joules_total"
    assert value(energy, account="big") == 1000.0 and value(energy, account="small") == 1000.0
    assert value(energy, account="other") == 1000.0  # the third account: no label of its own
    assert value(energy, account="unknown") == 1000.0 and value(energy, account="idle") == 1000.0
    assert value("ooda_meter_idle_energy_joules_total", partition="gpu") == 1000.0
    assert value("ooda_meter_cost_total", account="big") == pytest.approx(0.5 * 1000 / J_PER_KWH)
    assert value("ooda_meter_carbon_grams_total", account="big") is None  # no carbon known


def test_a_gpu_idle_between_two_jobs_books_the_gap_as_idle() -> None:
    # Job 1 at 500 W ends at 3 s, the GPU idles at 70 W, job 2 starts at 8 s and rises from
    # 70 W to 170 W by the end (its mean since the start: 120 W). Other GPUs show the idle level.
    truth = {"1": 500.0 * 3, "": 70.0 * 5, "2": 120.0 * 2}
    a = snap(0, [500.0, 70.0], energy=[0.0, 0.0], jobs=["1", ""], gpus_per_node=1)
    b = snap(10, [170.0, 70.0], energy=[sum(truth.values()), 700.0], jobs=["2", ""],
             gpus_per_node=1)  # fmt: skip

    def times(job: str) -> tuple[float, float]:
        return {"1": (math.nan, math.nan), "2": (8.0, math.nan)}.get(job, (math.nan, math.nan))

    got = book(a, b, partitions=["", ""], times=times)
    assert got["1"] == pytest.approx(truth["1"])
    assert got["2"] == pytest.approx(truth["2"])
    assert got[""] == pytest.approx(truth[""] + 700.0)

    def both(job: str) -> tuple[float, float]:
        return {"1": (math.nan, 3.0), "2": (8.0, math.nan)}.get(job, (math.nan, math.nan))

    known = book(a, b, partitions=["", ""], times=both)
    assert known["1"] == pytest.approx(truth["1"]) and known[""] == pytest.approx(truth[""] + 700)


def test_export_and_status_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "l.sqlite"
    meter = meter_for(path)
    for s in series(10, step=100.0):
        meter.book(s)
    meter.close()
    # The ledger's times here are a test timeline's (0..900 s): --until in seconds from its start.
    common = ["--ledger", str(path), "--since", "1h", "--until", "1h"]
    assert main(["meter", "export", *common, "-o", str(tmp_path / "x.csv")]) == 0
    assert main(["meter", "export", *common, "-o", str(tmp_path / "x.parquet")]) == 0
    assert "wrote 3 rows" in capsys.readouterr().out  # job 1, job 2, idle: one bucket
    assert len(pq.read_table(tmp_path / "x.parquet")) == 3
    assert main(["meter", "export", *common, "-o", str(tmp_path / "x.json")]) == 2
    assert "--format: csv or parquet" in capsys.readouterr().err
    assert main(["meter", "status", "--ledger", str(path), "--json"]) == 0
    status = last_json(capsys.readouterr().out)
    assert status["cursor_s"] == 900.0 and status["gaps_s"] == []
    assert status["spans"] == [{"start_s": 0.0, "end_s": 900.0, "origin": "live", "intervals": 9}]
    assert main(["meter", "status", "--ledger", str(tmp_path / "none.sqlite")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["meter", "status"]) == 2
    assert "give --config (its [meter] ledger) or --ledger" in capsys.readouterr().err


def test_backfill_refuses_bad_input_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["meter", "backfill", "--prometheus", "prom:9090", "--start", "-1h"]) == 2
    assert "--prometheus: not an http(s) URL" in capsys.readouterr().err
    args = ["meter", "backfill", "--prometheus", "http://127.0.0.1:9", "--start"]
    assert main([*args, "yesterday"]) == 2
    assert "--start: not a time" in capsys.readouterr().err
    assert main([*args, "-1h", "--step", "1.5s"]) == 2
    assert "--step: must be a whole number of seconds" in capsys.readouterr().err


def test_a_batching_backfill_books_what_one_at_a_time_would(tmp_path: Path) -> None:
    readings = series(60, step=120.0)  # two hours: the batches end at the bucket's edge too
    single = meter_for(tmp_path / "one.sqlite")
    for s in readings:
        single.book(s)
    batched = Meter(Ledger(tmp_path / "many.sqlite", timeline="t"), origin="backfill", batch=7)
    for s in readings:
        assert not batched.book(s).errors
    batched.close()
    assert (batched.booked, batched.skipped) == (59, 0)
    again = Meter(Ledger(tmp_path / "many.sqlite", timeline="t"), origin="backfill", batch=7)
    for s in readings:
        again.book(s)
    again.close()
    assert (again.booked, again.skipped) == (0, 59)
    one = single.ledger.rows()
    many = Ledger(tmp_path / "many.sqlite", read_only=True).rows()
    assert [r[:6] for r in one] == [r[:6] for r in many]
    for a, b in zip(one, many, strict=True):
        assert a[6:] == pytest.approx(b[6:])


def test_a_new_twins_ledger_moves_the_old_one_aside(tmp_path: Path) -> None:
    from agent.assembly import open_ledger

    config = parse_config(
        {"cluster": {"name": "c"}, "daemon": {"state_dir": str(tmp_path)}, "meter": {}}
    )
    open_ledger(config, "twin-1").close()
    open_ledger(config, "twin-2").close()  # a new twin: its times start again at 0
    assert (tmp_path / "c.ledger.twin-1.sqlite").exists()
    assert Ledger(tmp_path / "c.ledger.sqlite", read_only=True).timeline == "twin-2"
    with pytest.raises(ConfigError, match=r"meter\.ledger: .* timeline 'twin-2'"):
        open_ledger(config, "unix")  # a real cluster's ledger is never moved aside


def test_a_gpu_unread_for_a_while_has_its_gap_booked_when_it_is_read_again(
    tmp_path: Path,
) -> None:
    nan = math.nan
    # GPU 1's exporter restarts: unread at 10 s and 20 s, back at 30 s (its counter kept on).
    e = 1e6  # the counters' values at the start (J since the driver loaded)
    readings = [
        snap(0, [300.0, 400.0], energy=[e, e], jobs=["1", "2"], gpus_per_node=1),
        snap(10, [300.0, nan], energy=[e + 3000.0, nan], jobs=["1", ""], gpus_per_node=1),
        snap(20, [300.0, nan], energy=[e + 6000.0, nan], jobs=["1", ""], gpus_per_node=1),
        snap(30, [300.0, 400.0], energy=[e + 9000.0, e + 12000.0], jobs=["1", "2"],
             gpus_per_node=1),
    ]  # fmt: skip
    meter = meter_for(tmp_path / "l.sqlite")
    unmetered = [meter.book(s).unmetered_gpus for s in readings]
    assert unmetered[1:] == [1, 1, 0]  # unread at the time, booked when it came back
    assert meter.ledger.job_totals() == {"1": 9000.0, "2": 12000.0}
    # Its counter reset by the restart: the power at both ends stands in for it.
    reset = [*readings[:3], snap(30, [300.0, 400.0], energy=[e + 9000.0, 50.0], jobs=["1", "2"],
                                 gpus_per_node=1)]  # fmt: skip
    again = meter_for(tmp_path / "reset.sqlite")
    for s in reset:
        again.book(s)
    assert again.ledger.job_totals()["2"] == pytest.approx(400.0 * 30)
    # Unread for longer than max_gap_s: the gap is not booked (never guessed).
    short = meter_for(tmp_path / "short.sqlite", max_gap_s=15.0)
    for s in readings:
        short.book(s)
    assert short.ledger.job_totals() == {"1": 9000.0}


def test_a_job_that_drew_more_than_its_first_reading_keeps_it_when_it_falls_idle() -> None:
    # A job read at 290 W (a low phase), back at 640 W, then ended at the end: 9,600 J in 15 s
    # with the GPU idle (75 W) at the second reading. Idle draws 75 W at most, so the job has
    # all but the idle level's share of its time.
    a = snap(0, [290.0, 75.0], energy=[0.0, 0.0], jobs=["1", ""], gpus_per_node=1)
    b = snap(15, [75.0, 75.0], energy=[9600.0, 1125.0], gpus_per_node=1)
    got = book(a, b, partitions=["", ""])
    assert got["1"] >= 9600.0 - 75.0 * 15 and got["1"] + got[""] == pytest.approx(9600 + 1125)

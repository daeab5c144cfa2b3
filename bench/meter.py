"""The meter: what booking costs a cycle at scale, and how close it gets on a twin day.

Two JSON lines:
- `meter_cycle`: a twin of N GPUs (N/8 nodes, 400 W of node overhead each, the twin's accounts)
  booked every 15 s for `--cycles` cycles into a fresh ledger: per cycle, the reading (numpy over
  GPUs), the booking (aggregated per job) and the SQLite commit (usage rows, cursor), median and
  max; rows per cycle; the ledger's size.
- `meter_twin_day`: a full twin day (default 8 nodes x 8 GPUs, median job 20 min) booked every
  15 s against the twin's true energy per job: the largest and 99th-percentile relative error
  over jobs, the fleet's total error, jobs.
- `meter_twin_normal_day`: the same with the twin's normal-day phases (checkpoint stalls,
  flat-lined power readings, exporter restarts that hide a node's GPUs and reset counters...).

    python bench/meter.py --json [--gpus 100000] [--cycles 20] [--day-nodes 8] [--hours 24]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def cycle_cost(gpus: int, cycles: int) -> dict[str, Any]:
    from agent.meter.booking import book_interval
    from agent.meter.ledger import Ledger, Prices
    from agent.meter.meter import Meter
    from agent.sim.accounts import TwinAccounts
    from agent.sim.adapters import TwinSource
    from agent.sim.twin import Twin, TwinSpec

    twin = Twin(TwinSpec(nodes=max(1, gpus // 8), gpus_per_node=8, seed=1))
    source = TwinSource(twin)
    with tempfile.TemporaryDirectory(prefix="ooda-bench-meter-") as tmp:
        path = Path(tmp) / "ledger.sqlite"
        meter = Meter(
            Ledger(path, timeline="bench"),
            node_overhead_w=400.0,
            accounting=TwinAccounts(twin),
        )
        meter.book(source.observe(twin.t_s))
        took: list[float] = []
        phases: dict[str, list[float]] = {"reading": [], "booking": [], "commit": []}
        rows: list[int] = []
        for _ in range(cycles):
            twin.run_until(twin.t_s + 15.0)
            snapshot = source.observe(twin.t_s)
            result = meter.book(snapshot)
            assert result.booked, result
            took.append(result.duration_s)
            rows.append(result.rows)
        # The phases apart, on the last two readings (the commit into a scratch ledger).
        prev = meter.reading(snapshot, None)
        twin.run_until(twin.t_s + 15.0)
        snapshot = source.observe(twin.t_s)
        t0 = time.perf_counter()
        cur = meter.reading(snapshot, None)
        phases["reading"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        booking = book_interval(prev, cur)
        phases["booking"].append(time.perf_counter() - t0)
        scratch = Ledger(Path(tmp) / "scratch.sqlite", timeline="bench")
        t0 = time.perf_counter()
        scratch.book(booking, Prices(), cursor=cur)
        phases["commit"].append(time.perf_counter() - t0)
        size = meter.ledger.bytes()
        meter.close()
        scratch.close()
    return {
        "bench": "meter_cycle",
        "gpus": twin.spec.n_gpus,
        "cycles": cycles,
        "book_s_median": round(statistics.median(took), 4),
        "book_s_max": round(max(took), 4),
        "reading_s": round(phases["reading"][0], 4),
        "booking_s": round(phases["booking"][0], 4),
        "commit_s": round(phases["commit"][0], 4),
        "rows_per_cycle": int(statistics.median(rows)),
        "ledger_mb": round(size / 1e6, 2),
    }


def twin_day(nodes: int, hours: float, normal_day: bool = False) -> dict[str, Any]:
    from agent.meter.ledger import Ledger
    from agent.meter.meter import Meter
    from agent.sim.accounts import JobEnergyTruth, TwinAccounts
    from agent.sim.adapters import TwinSource
    from agent.sim.phases import NO_PHASES, NORMAL_DAY
    from agent.sim.twin import Twin, TwinSpec

    phases = NORMAL_DAY if normal_day else NO_PHASES
    twin = Twin(TwinSpec(nodes=nodes, gpus_per_node=8, seed=11, median_job_s=1200.0, phases=phases))
    truth = JobEnergyTruth(twin)
    source = TwinSource(twin)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ooda-bench-meter-") as tmp:
        meter = Meter(
            Ledger(Path(tmp) / "ledger.sqlite", timeline="bench"),
            accounting=TwinAccounts(twin),
        )
        meter.book(source.observe(twin.t_s))
        while twin.t_s < hours * 3600:
            truth.run_until(twin.t_s + 15.0)
            meter.book(source.observe(twin.t_s))
        booked = meter.ledger.job_totals()
        meter.close()
    jobs = [j for j in truth.joules if j]
    errors = np.array([abs(booked.get(j, 0.0) - truth.joules[j]) / truth.joules[j] for j in jobs])
    total_true = sum(truth.joules.values())
    return {
        "bench": "meter_twin_normal_day" if normal_day else "meter_twin_day",
        "gpus": twin.spec.n_gpus,
        "hours": hours,
        "interval_s": 15.0,
        "jobs": len(jobs),
        "job_error_max_pct": round(100 * float(errors.max()), 3),
        "job_error_p99_pct": round(100 * float(np.quantile(errors, 0.99)), 3),
        "jobs_within_1pct": int((errors < 0.01).sum()),
        "fleet_error_pct": round(100 * abs(sum(booked.values()) - total_true) / total_true, 6),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="JSON lines (the only output)")
    parser.add_argument("--gpus", type=int, default=100_000)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--day-nodes", type=int, default=8)
    parser.add_argument("--hours", type=float, default=24.0)
    args = parser.parse_args()
    print(json.dumps(cycle_cost(args.gpus, args.cycles)), flush=True)
    print(json.dumps(twin_day(args.day_nodes, args.hours)), flush=True)
    print(json.dumps(twin_day(args.day_nodes, args.hours, normal_day=True)), flush=True)


if __name__ == "__main__":
    main()

"""Replay speed and memory: 24 hours of 1,000 and 10,000 twin GPUs at 15 s steps, replayed through
power_budget (the learn pass, the dry-run loop and the counterfactual with its 90% intervals).

Each size is recorded first (the twin, uncapped, under a budget that binds for part of the day),
then replayed in a fresh process whose peak RSS is the replay's own. Prints one JSON line per
size: `gpus`, `steps`, `trace_mb`, `record_s`, `replay_s`, `learn_s`, `replay_set_s`,
`sim_s_per_wall_s` (simulated seconds per wall second), `peak_rss_mb`.

    python bench/replay.py --json [--gpus 1000 10000] [--hours 24]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import structlog

STEP_S = 15.0


def _quiet() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def record(gpus: int, hours: float, path: Path) -> dict[str, float]:
    from agent.replay.twin_trace import record_twin
    from agent.sim.twin import BudgetSchedule, TwinSpec

    nodes = gpus // 8
    duration = hours * 3600.0
    # About 440 W per GPU uncapped at 85% occupancy: 560 W never binds, 400 W does.
    budget = BudgetSchedule.demand_response(
        gpus * 560.0, gpus * 400.0, 0.4 * duration, 0.2 * duration
    )
    spec = TwinSpec(nodes=nodes, gpus_per_node=8, seed=1, budget=budget)
    t0 = time.perf_counter()
    summary = record_twin(spec, path, duration_s=duration, step_s=STEP_S)
    return {"record_s": time.perf_counter() - t0, "trace_mb": summary.bytes / 1e6}


def replay(path: Path) -> dict[str, float]:
    from agent.replay.engine import PolicySet, replay_trace

    t0 = time.perf_counter()
    report = replay_trace(path, policy_sets=[PolicySet("power_budget", ("power_budget",))])
    wall = time.perf_counter() - t0
    kpis = report.sets[0].kpis
    return {
        "steps": report.steps,
        "gpus": report.gpus,
        "replay_s": wall,
        "learn_s": report.learned.wall_s,
        "replay_set_s": report.sets[0].wall_s,
        "sim_s_per_wall_s": report.steps * STEP_S / wall,
        "energy_kwh": kpis["energy_kwh"],
        "baseline_energy_kwh": report.baseline["energy_kwh"],
        "caps_set": kpis["actions"]["set_power_cap"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _child(mode: str, path: Path, gpus: int, hours: float) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, f"--{mode}", str(path), "--gpus", str(gpus),
         "--hours", str(hours)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="JSON lines (the only output format)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--replay", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _quiet()
    if args.record is not None:
        print(json.dumps(record(args.gpus[0], args.hours, args.record)))
        return 0
    if args.replay is not None:
        print(json.dumps(replay(args.replay)))
        return 0
    for gpus in args.gpus:
        with tempfile.TemporaryDirectory(prefix="ooda-bench-replay-") as tmp:
            path = Path(tmp) / f"day-{gpus}.parquet"
            row: dict[str, float | str] = {"bench": "replay", "hours": args.hours}
            row |= _child("record", path, gpus, args.hours)
            row |= _child("replay", path, gpus, args.hours)
            rounded = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
            sys.stdout.write(json.dumps(rounded) + "\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A normal day on the twin through the live loop: anomaly alarms and actions per 1,000 GPU-hours
on a day of normal-but-surprising phases (checkpoint stalls, evaluations, data-loader stalls,
warm-ups, inference services with a daily curve and bursts, flat-lined readings, exporter
restarts; agent/sim/phases.py) and no fault. Every built-in policy runs live, under a budget at
0.92 of the day's uncapped draw. One JSON line (`--json`), the `twin-normal-day` corpus line:

    {"corpus": "twin-normal-day", "gpu_hours": 1536.0, "alarms_per_1000_gpu_h": ...,
     "actions_per_1000_gpu_h": ..., "anomaly_actions": 0, "by_phase": {...}, ...}

`anomaly_actions` counts drains, requeues and health notifications, and thermal caps on abnormal
heating: on a normal day each one is a mistake. `--no-phases` runs the same day without them;
`--drain-on-persistent-anomaly` switches on health_drain's opt-in to drain on anomalies alone.

    python bench/twin_normal_day.py --json                  # 24 h of 64 GPUs (minutes)
    python bench/twin_normal_day.py --json --hours 2 --nodes 4 --gpus-per-node 4
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import structlog


def main() -> None:
    # Logs (the guard's alarms, say) go to stderr: stdout is the JSON line.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=lambda *_args: structlog.PrintLogger(sys.stderr),
    )
    from agent.replay.normal_day import NormalDayOptions, run_normal_day
    from agent.sim.phases import NO_PHASES, NORMAL_DAY

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object on one line")
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--budget-frac",
        type=float,
        default=0.92,
        help="budget as a share of the day's uncapped draw (0: no budget)",
    )
    parser.add_argument("--no-phases", action="store_true", help="the same day without phases")
    parser.add_argument(
        "--drain-on-persistent-anomaly",
        action="store_true",
        help="health_drain's opt-in: drain nodes whose GPUs stay anomalous",
    )
    args = parser.parse_args()
    opts = NormalDayOptions(
        hours=args.hours,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        seed=args.seed,
        phases=NO_PHASES if args.no_phases else NORMAL_DAY,
        budget_frac=args.budget_frac or None,
        drain_on_persistent_anomaly=args.drain_on_persistent_anomaly,
    )
    out = run_normal_day(opts)
    if args.json:
        print(json.dumps(out), flush=True)
    else:
        for key, value in out.items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()

"""Trace files at scale: a day of the twin at 15 s steps, written and read back.

For each N: `record_twin` writes 24 h of N GPUs (N/8 nodes) at 15 s steps; then the file is read
back as every step's Snapshot, and once more reading only the power column. Each phase runs in its
own process so its peak memory is its own.

Prints one JSON line per N: gpus, hours, steps, rows, bytes, mb_per_day_per_1k_gpus,
write_s, write_peak_rss_mb, read_s (every step as a Snapshot, every field),
read_power_s (power only), read_peak_rss_mb.

    python bench/trace.py --json [--gpus 1000 --gpus 10000] [--hours 24]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def write(path: Path, gpus: int, hours: float) -> dict[str, Any]:
    from agent.replay.twin_trace import record_twin
    from agent.sim.twin import TwinSpec

    t0 = time.perf_counter()
    summary = record_twin(
        TwinSpec(nodes=max(1, gpus // 8), gpus_per_node=8, seed=1),
        path,
        duration_s=hours * 3600,
        step_s=15.0,
    )
    return {
        "steps": summary.steps,
        "rows": summary.rows,
        "bytes": summary.bytes,
        "write_s": round(time.perf_counter() - t0, 2),
        "write_peak_rss_mb": _rss_mb(),
    }


def read(path: Path) -> dict[str, Any]:
    import numpy as np

    from agent.core.snapshot import Metric
    from agent.observe.trace import TraceReader

    t0 = time.perf_counter()
    total = 0.0
    for snap in TraceReader(path).snapshots():
        total += float(np.nansum(snap.values[Metric.POWER_W]))
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    power_only = 0.0
    for block in TraceReader(path, metrics=(Metric.POWER_W,)).blocks():
        power_only += float(np.nansum(block.values[Metric.POWER_W]))
    assert abs(power_only - total) <= 1e-6 * abs(total)
    return {
        "read_s": round(read_s, 2),
        "read_power_s": round(time.perf_counter() - t0, 2),
        "read_peak_rss_mb": _rss_mb(),
    }


def _child(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, action="append", help="fleet sizes (repeatable)")
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--json", action="store_true", help="JSON lines (the default output)")
    parser.add_argument("--write", help=argparse.SUPPRESS)
    parser.add_argument("--read", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        print(json.dumps(write(Path(args.write), args.n, args.hours)))
        return 0
    if args.read:
        print(json.dumps(read(Path(args.read))))
        return 0
    with tempfile.TemporaryDirectory(prefix="ooda-bench-trace-") as tmp:
        for gpus in args.gpus or [1000, 10000]:
            path = Path(tmp) / f"day-{gpus}.parquet"
            wrote = _child("--write", str(path), "--n", str(gpus), "--hours", str(args.hours))
            got = _child("--read", str(path))
            per_day_1k = wrote["bytes"] / 1e6 * (24 / args.hours) * (1000 / gpus)
            print(
                json.dumps(
                    {
                        "gpus": gpus,
                        "hours": args.hours,
                        **wrote,
                        "mb_per_day_per_1k_gpus": round(per_day_1k, 1),
                        **got,
                    }
                ),
                flush=True,
            )
            path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())

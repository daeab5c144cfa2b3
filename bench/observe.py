"""How long does one observe take against a real Prometheus holding N GPUs' series, and how much
memory does the agent need for it?

For each N: the twin (N/8 nodes of 8 GPUs, dcgm-exporter's default counters, a 10% of nodes'
exporters silent for the last 6 minutes, past the 5-minute lookback, so the query for their
last samples runs too) is recorded for 10
minutes at a 30 s scrape interval, exported as OpenMetrics and backfilled with promtool into a
fresh Prometheus (Debian's). Then a separate process runs `PrometheusSource.observe` at the end of
that window (one warm-up, then `--repeat` timed runs) and reports its own peak RSS.

Prints one JSON line per N: gpus, observe_s (median), observe_min_s, peak_rss_mb (the observing
process), queries, stale, query_s (waiting on Prometheus) and setup_s.

    python bench/observe.py --json [--gpus 1000 --gpus 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _prometheus import backfill_twin, mid_block_end_unix, serve

SCRAPE_S = 30.0
MINUTES = 10.0


def observe_child(url: str, at_s: float, repeat: int) -> dict[str, Any]:
    """Runs in its own process: observe timings and this process's peak memory."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    from agent.observe.prometheus import PrometheusSettings, PrometheusSource

    source = PrometheusSource(PrometheusSettings(url=url, scrape_interval_s=SCRAPE_S))
    snap = source.observe(at_s)  # warm-up (and Prometheus's caches)
    times, waits = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        snap = source.observe(at_s)
        times.append(time.perf_counter() - t0)
        waits.append(source.query_s)
    return {
        "observe_s": round(statistics.median(times), 4),
        "observe_min_s": round(min(times), 4),
        "query_s": round(statistics.median(waits), 4),
        "queries": source.queries,
        "seen": snap.n_gpus,
        "stale": int(snap.stale.sum()),
        "errors": list(snap.errors),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def bench(gpus: int, repeat: int, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    duration = MINUTES * 60
    end_unix = mid_block_end_unix()
    data, samples = backfill_twin(
        gpus,
        work,
        duration_s=duration,
        scrape_s=SCRAPE_S,
        counters="default",
        silent_nodes=max(1, gpus // 8) // 10,
        silent_from_s=duration - 360,
        silent_for_s=600,
        end_unix=end_unix,
    )
    try:
        with serve(data, work, SCRAPE_S, timeout_s=60) as prom:
            setup_s = time.perf_counter() - t0
            child = subprocess.run(
                [sys.executable, __file__, "--child", prom.url, "--at", str(end_unix + 5),
                 "--repeat", str(repeat)],
                check=True,
                capture_output=True,
                text=True,
            )  # fmt: skip
            result = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(data, ignore_errors=True)
    return {"gpus": gpus, **result, "samples": samples, "setup_s": round(setup_s, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, action="append", help="fleet sizes (repeatable)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="JSON lines (the default output)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(observe_child(args.child, args.at, args.repeat)))
        return 0
    for tool in ("prometheus", "promtool"):
        if shutil.which(tool) is None:
            print(
                f"bench/observe.py: {tool} is not installed (make test installs it)",
                file=sys.stderr,
            )
            return 1
    with tempfile.TemporaryDirectory(prefix="ooda-bench-observe-") as tmp:
        for gpus in args.gpus or [1000, 10000]:
            print(json.dumps(bench(gpus, args.repeat, Path(tmp))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How long does one full dry-run cycle take against a real Prometheus holding N GPUs, per stage,
and how much memory does the agent need for it?

For each N: the twin (N/8 nodes of 8 GPUs, every field dcgm-exporter can serve: the power limits
and the `hpc_job` labels included; 1% of the nodes' exporters go silent after the first scrape,
so some GPUs are stale) is recorded for 2 minutes at a 30 s scrape interval, exported as
OpenMetrics and backfilled with promtool into a fresh Prometheus (Debian's, on 127.0.0.1, a free
port). The backfilled block is cached under the temp dir per N (`--no-cache`: build it afresh);
each run serves a hard-linked copy of it, so Prometheus never writes into the cache.

A separate process then builds the agent as `ooda run --dry-run` would (`assemble` on a
Prometheus config, every built-in policy, an audit log in a temp dir) with a fake clock at the
end of the recording, and runs `--cycles` cycles 15 s apart through the real Loop: observe
(PrometheusSource), orient, decide, guard, act (the dry-run recorders). The budget is 85% of
the fleet's draw, stepping down 3% a cycle, so the power-budget policy moves every cap every
cycle. The first cycle is a warm-up (its time is shown apart); the figures are medians of the
others.

Prints one JSON line per N:
    {"bench": "cycle", "gpus": N, "cycle_s": median, "stages": {"observe": s, ...},
     "peak_rss_mb": MB (the agent's process), "queries": count, "prometheus_rss_mb": MB,
     "agent_cpu_s": s, "prometheus_cpu_s": s (CPU per cycle, median: steadier than wall time on
     a shared machine), ...}
and, when 10,000 and 100,000 are both measured, a last line with the growth factors.

    python bench/cycle.py --json                       # 1,000, 10,000 and 100,000 GPUs
    python bench/cycle.py --gpus 100000 --cycles 5 --profile /tmp/cycle.prof
    python bench/cycle.py --gpus 100000 --prometheus-gogc 400   # Prometheus's GC tuned for CPU

`--source remote_write`: no Prometheus; the agent (`[source] kind = "remote_write"`, the same
dry-run loop, a fake clock) receives what a Prometheus scraping the twin every `--interval-s`
would remote-write (bench/_remote_write.py: the twin's 12 loop fields per GPU by default, jobs
changing, 1% of the nodes going silent after the first scrape), `--samples-per-send` samples a
body on 4 connections, spread over each interval in real time (`--pace-s`). Per interval the
agent process's CPU while it receives (`ingest_cpu_s`: HTTP, snappy, protobuf, the store) is
measured apart from its cycle, which runs at the interval's end. The first interval (every
series new, decoded in full) is shown apart, as the warm-up cycle is.

    python bench/cycle.py --source remote_write --gpus 10000 --gpus 100000 --json
    python bench/cycle.py --source remote_write --gpus 100000 --profile /tmp/rw.prof  # .100000
"""

from __future__ import annotations

import argparse
import json
import os
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
RECORD_S = 120.0  # 4 scrapes: the source needs only the newest samples
INTERVAL_S = 15.0
SILENT_NODES = 0.01
CACHE_VERSION = 2  # bump when the recording changes
STAGES = ("observe", "orient", "decide", "guard", "act")


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) of this process (all its threads) or of `pid`: unlike wall
    time, not inflated when other work shares the cores."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cycle_child(
    url: str, at_s: float, cycles: int, work: Path, profile: str | None, prom_pid: int | None
) -> dict[str, Any]:
    """Runs in its own process: a dry-run Loop over Prometheus; timings and this process's peak
    memory."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    from agent.assembly import assemble
    from agent.config import parse_config
    from agent.core.clock import FakeClock
    from agent.observe.prometheus import PrometheusSource

    config = parse_config(
        {
            "dry_run": True,
            "source": {
                "kind": "prometheus",
                "prometheus": {"url": url, "scrape_interval_s": SCRAPE_S, "timeout_s": 120},
            },
            "audit": {"path": str(work / "audit.jsonl")},
            "daemon": {"interval_s": INTERVAL_S},
        },
        source="bench",
    )
    clock = FakeClock(at_s)
    agent = assemble(config, clock=clock)
    loop = agent.loop
    source = loop.source
    assert isinstance(source, PrometheusSource)

    warm = loop.cycle()  # model fits, caches; no budget yet
    fleet_w, first_cycle_s = warm.situation.fleet_power_w, warm.duration_s
    del warm
    clock.advance(INTERVAL_S)
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    # Only each cycle's figures are kept (a daemon holds only its last report; holding every
    # report's snapshot and situation would count them in the peak memory).
    durations, stage_s, recorded, unchanged = [], [], [], []
    agent_cpu, prom_cpu = [], []
    last = None
    for k in range(cycles):
        # The budget steps down every cycle, so every cycle moves every cap (the worst case
        # for guard and act: the same samples otherwise leave the caps in the dead band).
        loop.budget_w = (0.85 - 0.03 * k) * fleet_w
        a0, p0 = _cpu_s(), _cpu_s(prom_pid) if prom_pid else float("nan")
        report = loop.cycle()
        agent_cpu.append(_cpu_s() - a0)
        prom_cpu.append(_cpu_s(prom_pid) - p0 if prom_pid else float("nan"))
        durations.append(report.duration_s)
        stage_s.append(report.stage_s)
        recorded.append(sum(len(getattr(a.intent, "targets", [0])) for a in report.actions))
        unchanged.append(report.unchanged)
        last = report.summary()
        del report
        clock.advance(INTERVAL_S)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    agent.close()
    assert last is not None
    return {
        "cycle_s": round(statistics.median(durations), 4),
        "cycle_min_s": round(min(durations), 4),
        "stages": {s: round(statistics.median(x[s] for x in stage_s), 4) for s in STAGES},
        "agent_cpu_s": round(statistics.median(agent_cpu), 4),
        "prometheus_cpu_s": round(statistics.median(prom_cpu), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "queries": source.queries,
        "query_s": round(source.query_s, 4),
        "first_cycle_s": round(first_cycle_s, 4),
        "cycles": cycles,
        "seen": last["gpus"],
        "stale": last["stale"],
        "intents": last["intents"],
        "actions": last["actions"],
        "recorded_per_cycle": recorded,
        "unchanged_per_cycle": unchanged,
        "errors": last["errors"],
    }


def rw_child(cycles_url_file: Path, counters: str, profile: str | None = None) -> None:
    """Runs in its own process: the agent with a remote-write source on a free loopback port and
    a fake clock. Prints its URL, then for each line `T` on stdin runs a cycle at time T and
    prints its figures (JSON lines). `profile`: a cProfile of the cycles after the first (the
    loop's thread only: ingest runs on the receiver's)."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    from _remote_write import COUNTERS

    from agent.assembly import assemble
    from agent.config import parse_config
    from agent.core.clock import FakeClock

    metrics = {f.metric.value: (f.name if f in COUNTERS[counters] else "") for f in COUNTERS["all"]}
    config = parse_config(
        {
            "dry_run": True,
            "source": {
                "kind": "remote_write",
                "remote_write": {
                    "listen": "127.0.0.1:0",
                    "scrape_interval_s": INTERVAL_S,
                    "startup_wait_s": 0,
                    "metrics": metrics,
                },
            },
            "audit": {"path": str(cycles_url_file.parent / "audit.jsonl")},
            "daemon": {"interval_s": INTERVAL_S},
        },
        source="bench",
    )
    clock = FakeClock(0.0)
    runtime = assemble(config, clock=clock)
    loop = runtime.loop
    print(json.dumps({"url": loop.source.url}), flush=True)  # type: ignore[attr-defined]
    fleet_w = None
    k = 0
    profiler = None
    for line in sys.stdin:
        at_s = float(line)
        clock.advance(at_s - clock.now())
        if fleet_w is not None:  # the budget steps down: every cycle moves every cap
            loop.budget_w = (0.85 - 0.03 * k) * fleet_w
            k += 1
        cpu0 = _cpu_s()
        if profiler is not None:
            profiler.enable()
        report = loop.cycle()
        if profiler is not None:
            profiler.disable()
        cpu = _cpu_s() - cpu0
        if profile and profiler is None:  # the first cycle (every model new) not profiled
            import cProfile

            profiler = cProfile.Profile()
        if fleet_w is None:
            fleet_w = report.situation.fleet_power_w
        summary = report.summary()
        print(
            json.dumps(
                {
                    "cycle_s": report.duration_s,
                    "cycle_cpu_s": cpu,
                    "stages": {s: report.stage_s[s] for s in STAGES},
                    "seen": summary["gpus"],
                    "stale": summary["stale"],
                    "intents": summary["intents"],
                    "actions": summary["actions"],
                    "errors": summary["errors"],
                    "series": loop.source.store.series,  # type: ignore[attr-defined]
                    # VmHWM, not ru_maxrss: that one keeps the forking parent's size
                    "peak_rss_mb": _prometheus_rss_mb(os.getpid()),
                    "rss_mb": _prometheus_rss_mb(os.getpid(), "VmRSS"),
                }
            ),
            flush=True,
        )
        del report
    if profiler is not None:
        profiler.dump_stats(profile)
    runtime.close()


def bench_remote_write(
    gpus: int,
    cycles: int,
    work: Path,
    counters: str,
    per_send: int,
    pace_s: float | None,
    profile: str | None = None,
) -> dict[str, Any]:
    """The agent fed by remote write: ingest CPU per interval and the cycle, per N."""
    from _remote_write import COUNTERS, TwinSender, send

    t0 = time.perf_counter()
    start_ms = int(mid_block_end_unix()) * 1000
    interval_ms = int(INTERVAL_S * 1000)
    agent_work = work / f"agent-rw-{gpus}"
    agent_work.mkdir()
    # The agent first, while this process is small (a forked child starts with its pages).
    child = subprocess.Popen(
        [sys.executable, __file__, "--rw-child", str(agent_work / "url"), "--counters", counters]
        + (["--profile", f"{profile}.{gpus}"] if profile else []),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        url = json.loads(child.stdout.readline())["url"]
        sender = TwinSender(
            gpus,
            fields=COUNTERS[counters],
            samples_per_send=per_send,
            silent_nodes=round(max(1, gpus // 8) * SILENT_NODES),
        )
        # Every interval's bodies made first, so that making them costs the agent no CPU time.
        scrapes = [sender.scrape(start_ms + k * interval_ms) for k in range(cycles + 1)]
        setup_s = time.perf_counter() - t0
        rows = []
        for k, scrape in enumerate(scrapes):
            cpu0 = _cpu_s(child.pid)
            sent = send(
                url, scrape.bodies, shards=4, over_s=INTERVAL_S if pace_s is None else pace_s
            )
            ingest_cpu = _cpu_s(child.pid) - cpu0
            if sent.failed:
                raise RuntimeError(f"the agent refused {len(sent.failed)}: {sent.failed[:3]}")
            child.stdin.write(f"{(start_ms + k * interval_ms) / 1000 + 1.0}\n")
            child.stdin.flush()
            row = json.loads(child.stdout.readline())
            row |= {"ingest_cpu_s": ingest_cpu, "send_wall_s": sent.wall_s,
                    "samples": scrape.samples, "markers": scrape.markers,
                    "new_series": scrape.new_series, "requests": sent.requests}  # fmt: skip
            rows.append(row)
        child.stdin.close()
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    first, timed = rows[0], rows[1:]

    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in timed), 4)

    last = timed[-1]
    samples = median("samples")
    return {
        "bench": "cycle",
        "source": "remote_write",
        "gpus": gpus,
        "cycle_s": median("cycle_s"),
        "cycle_min_s": round(min(r["cycle_s"] for r in timed), 4),
        "stages": {s: round(statistics.median(r["stages"][s] for r in timed), 4) for s in STAGES},
        "agent_cpu_s": median("cycle_cpu_s"),
        "ingest_cpu_s": median("ingest_cpu_s"),
        "ingest_cpu_s_per_1.2m_samples": round(median("ingest_cpu_s") * 1.2e6 / samples, 4),
        "ingest_cpu_per_interval": [round(r["ingest_cpu_s"], 3) for r in timed],
        "samples_per_interval": samples,
        "interval_s": INTERVAL_S,
        "samples_per_send": per_send,
        "requests_per_interval": median("requests"),
        "fields_per_gpu": len(COUNTERS[counters]),
        "peak_rss_mb": last["peak_rss_mb"],
        "peak_rss_mb_after_each_cycle": [first["peak_rss_mb"]] + [r["peak_rss_mb"] for r in timed],
        # Resident memory after each cycle, and its trend over the timed cycles (MB a cycle,
        # least squares): a daemon that runs for months must not grow.
        "rss_mb_after_each_cycle": [first["rss_mb"]] + [r["rss_mb"] for r in timed],
        "rss_growth_mb_per_cycle": _slope([r["rss_mb"] for r in timed]),
        "series": last["series"],
        "first_interval": {
            "ingest_cpu_s": round(first["ingest_cpu_s"], 3),
            "new_series": first["new_series"],
            "cycle_s": round(first["cycle_s"], 4),
        },
        "new_series_per_interval": [r["new_series"] for r in timed],
        "markers_per_interval": [r["markers"] for r in timed],
        "send_wall_s": median("send_wall_s"),
        "cycles": cycles,
        "seen": last["seen"],
        "stale": last["stale"],
        "intents": last["intents"],
        "actions": last["actions"],
        "errors": last["errors"],
        "setup_s": round(setup_s, 1),
    }


def _slope(values: list[float]) -> float | None:
    """The least-squares slope of `values` against their index (None: fewer than 2)."""
    if len(values) < 2:
        return None
    return round(statistics.linear_regression(range(len(values)), values).slope, 3)


def _record(gpus: int, work: Path) -> tuple[Path, float]:
    """The backfilled TSDB of N GPUs (a fresh directory under `work`) and its last scrape's Unix
    time."""
    end_unix = mid_block_end_unix()
    data, _samples = backfill_twin(
        gpus,
        work,
        duration_s=RECORD_S,
        scrape_s=SCRAPE_S,
        counters="all",
        silent_nodes=round(max(1, gpus // 8) * SILENT_NODES),
        silent_from_s=SCRAPE_S / 2,
        silent_for_s=RECORD_S,
        end_unix=end_unix,
    )
    return data, end_unix


def _link_tree(src: Path, dst: Path) -> None:
    """A copy of `src` whose files are hard links (Prometheus only ever deletes block files)."""
    try:
        shutil.copytree(src, dst, copy_function=os.link)
    except OSError:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


def _prometheus_rss_mb(pid: int, field: str = "VmHWM") -> float | None:
    """A process's peak resident memory (VmHWM; `field="VmRSS"`: its resident memory now),
    MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def bench(
    gpus: int,
    cycles: int,
    work: Path,
    cache: Path | None,
    profile: str | None,
    gogc: str | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    cached = cache / f"gpus-{gpus}-v{CACHE_VERSION}" if cache is not None else None
    if cached is not None and (cached / "meta.json").is_file():
        end_unix = float(json.loads((cached / "meta.json").read_text())["end_unix"])
        source_data = cached / "data"
        from_cache = True
    else:
        build = work / f"build-{gpus}"
        build.mkdir()
        source_data, end_unix = _record(gpus, build)
        from_cache = False
        if cached is not None:
            shutil.rmtree(cached, ignore_errors=True)
            cached.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(build), cached)
            (cached / "meta.json").write_text(json.dumps({"end_unix": end_unix, "gpus": gpus}))
            source_data = cached / "data"
    data = work / f"data-{gpus}"
    _link_tree(source_data, data)
    prom_work = work / f"prometheus-{gpus}"
    prom_work.mkdir()
    try:
        with serve(data, prom_work, SCRAPE_S, timeout_s=120, gogc=gogc) as prom:
            url = prom.url
            setup_s = time.perf_counter() - t0
            agent_work = work / f"agent-{gpus}"
            agent_work.mkdir()
            command = [sys.executable, __file__, "--child", url, "--at", str(end_unix + 5),
                       "--cycles", str(cycles), "--work", str(agent_work),
                       "--prometheus-pid", str(prom.pid)]  # fmt: skip
            if profile:
                command += ["--profile", profile]
            child = subprocess.run(command, check=False, capture_output=True, text=True)
            if child.returncode != 0:
                raise RuntimeError(f"the cycle process failed: {child.stderr[-3000:]}")
            result = json.loads(child.stdout.strip().splitlines()[-1])
            prom_rss = _prometheus_rss_mb(prom.pid)
    finally:
        shutil.rmtree(data, ignore_errors=True)
    return {
        "bench": "cycle",
        "gpus": gpus,
        **result,
        "prometheus_rss_mb": prom_rss,
        "prometheus_gogc": gogc,
        "setup_s": round(setup_s, 1),
        "tsdb_cached": from_cache,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, action="append", help="fleet sizes (repeatable)")
    parser.add_argument("--cycles", type=int, default=5, help="timed cycles per size")
    parser.add_argument("--json", action="store_true", help="JSON lines (the default output)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "ooda-bench-cycle",
        help="where backfilled TSDBs are kept between runs",
    )
    parser.add_argument("--no-cache", action="store_true", help="record and backfill afresh")
    parser.add_argument("--profile", help="write a cProfile of the timed cycles here")
    parser.add_argument(
        "--prometheus-gogc",
        help="GOGC for the Prometheus (e.g. 400: less of its CPU goes to garbage collection, "
        "for more memory); default: Go's 100",
    )
    parser.add_argument(
        "--source",
        choices=("prometheus", "remote_write"),
        default="prometheus",
        help="where the agent's telemetry comes from (see above)",
    )
    parser.add_argument(
        "--counters",
        choices=("loop", "all"),
        default="loop",
        help="remote_write: the fields each GPU sends (loop: 12, all: 16)",
    )
    parser.add_argument(
        "--samples-per-send",
        type=int,
        default=10_000,
        help="remote_write: samples per body (the sender's queue_config.max_samples_per_send)",
    )
    parser.add_argument(
        "--pace-s",
        type=float,
        help="remote_write: spread each interval's bodies over this many seconds (default: the "
        "interval, 15 s; 0: as fast as they go)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rw-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prometheus-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rw_child:
        rw_child(args.rw_child, args.counters, args.profile)
        return 0
    if args.source == "remote_write":
        return _main_remote_write(args)
    if args.child:
        print(
            json.dumps(
                cycle_child(
                    args.child,
                    args.at,
                    args.cycles,
                    args.work,
                    args.profile,
                    args.prometheus_pid,
                )
            )
        )
        return 0
    for tool in ("prometheus", "promtool"):
        if shutil.which(tool) is None:
            print(
                f"bench/cycle.py: {tool} is not installed (make system-deps installs it)",
                file=sys.stderr,
            )
            return 1
    results: dict[int, dict[str, Any]] = {}
    cache = None if args.no_cache else args.cache_dir
    with tempfile.TemporaryDirectory(prefix="ooda-bench-cycle-") as tmp:
        for gpus in args.gpus or [1000, 10000, 100000]:
            results[gpus] = bench(
                gpus, args.cycles, Path(tmp), cache, args.profile, args.prometheus_gogc
            )
            print(json.dumps(results[gpus]), flush=True)
    if 10000 in results and 100000 in results:
        small, big = results[10000], results[100000]
        print(
            json.dumps(
                {
                    "bench": "cycle",
                    "growth": "10000->100000",
                    "cycle": round(big["cycle_s"] / small["cycle_s"], 2),
                    "stages": {
                        s: round(big["stages"][s] / max(small["stages"][s], 1e-9), 2)
                        for s in STAGES
                    },
                    "peak_rss": round(big["peak_rss_mb"] / small["peak_rss_mb"], 2),
                }
            ),
            flush=True,
        )
    return 0


def _main_remote_write(args: argparse.Namespace) -> int:
    results: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ooda-bench-cycle-rw-") as tmp:
        for gpus in args.gpus or [10000, 100000]:
            results[gpus] = bench_remote_write(
                gpus,
                args.cycles,
                Path(tmp),
                args.counters,
                args.samples_per_send,
                args.pace_s,
                args.profile,
            )
            print(json.dumps(results[gpus]), flush=True)
    if 10000 in results and 100000 in results:
        small, big = results[10000], results[100000]
        print(
            json.dumps(
                {
                    "bench": "cycle",
                    "source": "remote_write",
                    "growth": "10000->100000",
                    "cycle": round(big["cycle_s"] / small["cycle_s"], 2),
                    "ingest_cpu": round(big["ingest_cpu_s"] / small["ingest_cpu_s"], 2),
                    "stages": {
                        s: round(big["stages"][s] / max(small["stages"][s], 1e-9), 2)
                        for s in STAGES
                    },
                    "peak_rss": round(big["peak_rss_mb"] / small["peak_rss_mb"], 2),
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared by the benchmarks that observe through a real Prometheus: a twin recording backfilled
with promtool, and Debian's Prometheus serving it on 127.0.0.1 (not a benchmark itself)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BLOCK_S = 7200  # Prometheus's first-level TSDB block (promtool backfills into these too)


def mid_block_end_unix(blocks_back: int = 2) -> float:
    """An end time for a backfill of at most an hour: the middle of a 2 h block some blocks in
    the past, so the recording and an instant query's 5 min lookback lie in one block, as a
    real Prometheus holds its newest hours in one head block. (Ending on a block boundary puts
    the last scrape alone in a block of its own and makes every query read two blocks.)"""
    return float((int(time.time()) // BLOCK_S - blocks_back) * BLOCK_S + BLOCK_S // 2)


@dataclass(frozen=True)
class Served:
    url: str
    pid: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def backfill_twin(
    gpus: int,
    work: Path,
    *,
    duration_s: float,
    scrape_s: float,
    counters: str,
    silent_nodes: int,
    silent_from_s: float,
    silent_for_s: float,
    end_unix: float,
) -> tuple[Path, int]:
    """A twin of `gpus` GPUs (8 per node, seed 1, the first `silent_nodes` nodes dropping out)
    recorded, exported as OpenMetrics ending at `end_unix` and backfilled into `work/data`.
    Returns the TSDB directory and the samples written."""
    from agent.observe.openmetrics import write_openmetrics
    from agent.observe.trace import TraceReader
    from agent.replay.twin_trace import record_twin
    from agent.sim.faults import parse_fault
    from agent.sim.twin import TwinSpec

    nodes = max(1, gpus // 8)
    silent = [
        parse_fault(f"dropout:node{k}@{silent_from_s:g}+{silent_for_s:g}")
        for k in range(1, max(1, silent_nodes) + 1)
    ]
    trace = work / "twin.parquet"
    record_twin(
        TwinSpec(nodes=nodes, gpus_per_node=8, seed=1, faults=tuple(silent)),
        trace,
        duration_s=duration_s,
        step_s=scrape_s,
        counters=counters,
    )
    last = float(TraceReader(trace).meta.time_s[-1])
    text = work / "twin.om"
    with text.open("w", encoding="utf-8") as out:
        samples = write_openmetrics(trace, out, offset_s=end_unix - last)
    trace.unlink()
    data = work / "data"
    subprocess.run(
        ["promtool", "tsdb", "create-blocks-from", "openmetrics", str(text), str(data)],
        check=True,
        capture_output=True,
    )
    text.unlink()
    return data, samples


@contextmanager
def serve(
    data: Path, work: Path, scrape_s: float, timeout_s: float, gogc: str | None = None
) -> Iterator[Served]:
    """Prometheus serving `data` on a free loopback port, ready, until the block ends. `gogc`:
    its Go garbage collector's GOGC (None: the environment's, else Go's default of 100)."""
    config = work / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: {scrape_s:g}s\n")
    log_path = work / "prometheus.log"
    log = log_path.open("wb")
    port = free_port()
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=100y",
            "--log.level=error",
        ],
        stdout=log,
        stderr=log,
        env=None if gogc is None else {**os.environ, "GOGC": gogc},
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        yield Served(url, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

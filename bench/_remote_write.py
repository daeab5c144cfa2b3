"""Shared by the benchmarks that feed the agent by remote write (not a benchmark itself): what a
Prometheus scraping the twin's dcgm-exporters would send, body by body, and a sender that sends
it as one would (a few shards, each on its own kept-alive connection, spread over the interval).

Each series is what Prometheus stores for a dcgm-exporter line: the exporter's labels (gpu,
UUID, pci_bus_id, device, modelName, Hostname, DCGM_FI_DRIVER_VERSION, hpc_job while a job runs)
plus `instance`, `job` and `__name__`, sorted by name; one sample per scrape. A GPU whose job
changed gets a new series, and the old one a staleness marker (as Prometheus writes when a
series leaves a target); a node whose exporter goes silent gets markers for all its series at
the next scrape, then nothing. Everything is encoded by protobuf and compressed by cramjam: the
label block of each series once, its sample at every scrape.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import cramjam
import numpy as np

from agent.core.dcgm import DCGM_FIELDS, DcgmField
from agent.core.snapshot import Metric
from agent.observe.remote_write import wire
from agent.sim.exporter import DRIVER_VERSION, exported_values
from agent.sim.twin import Twin, TwinSpec

# The fields of a dcgm-exporter with its default counters plus the power limit in force, the
# enforced limit and the clock event reasons: 12 per GPU (about 1.2 million samples a scrape at
# 100,000 GPUs). "all": every field the twin serves (16).
LOOP_FIELDS = tuple(
    f
    for f in DCGM_FIELDS
    if f.default
    or f.metric in (Metric.POWER_LIMIT_W, Metric.ENFORCED_LIMIT_W, Metric.CLOCKS_EVENT_REASONS)
)
COUNTERS = {"loop": LOOP_FIELDS, "all": DCGM_FIELDS}
STALE = wire.stale_marker()


@dataclass
class Scrape:
    """One interval's bodies, snappy-compressed, and what they hold."""

    bodies: list[bytes]
    samples: int
    markers: int
    new_series: int


@dataclass
class TwinSender:
    """A twin of `gpus` GPUs (8 per node) seen through Prometheus's remote write."""

    gpus: int
    fields: Sequence[DcgmField] = LOOP_FIELDS
    samples_per_send: int = 10_000
    silent_nodes: int = 0  # the first nodes' exporters stop answering after the first scrape
    seed: int = 1
    twin: Twin = field(init=False)
    _blocks: dict[tuple[int, int, str], bytes] = field(init=False, default_factory=dict)
    _job_of: list[str] = field(init=False)
    _order: np.ndarray[Any, Any] = field(init=False)
    _scrapes: int = field(init=False, default=0)
    _last_ms: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.twin = Twin(TwinSpec(nodes=max(1, self.gpus // 8), gpus_per_node=8, seed=self.seed))
        self._job_of = [""] * self.twin.spec.n_gpus
        # Which shard and batch a series lands in: fixed, as Prometheus hashes series to shards.
        self._order = np.random.default_rng(self.seed).permutation(
            self.twin.spec.n_gpus * len(self.fields)
        )

    def _base_labels(self, row: int) -> list[tuple[str, str]]:
        tw = self.twin
        host = str(tw.node_names[int(tw.node_of[row])])
        gpu = int(tw.gpu_idx[row])
        return [
            ("DCGM_FI_DRIVER_VERSION", DRIVER_VERSION),
            ("Hostname", host),
            ("UUID", str(tw.uuid[row])),
            ("device", f"nvidia{gpu}"),
            ("gpu", str(gpu)),
            ("instance", f"{host}:9400"),
            ("job", "dcgm"),
            ("modelName", tw.spec.model.model_name),
            ("pci_bus_id", str(tw.pci_bus_id[row])),
        ]

    def _block(self, row: int, k: int, job: str) -> bytes:
        """The encoded labels of GPU `row`'s series of field `k` while it runs `job`."""
        key = (row, k, job)
        block = self._blocks.get(key)
        if block is None:
            labels = [*self._base_labels(row), ("__name__", self.fields[k].name)]
            if job:
                labels.append(("hpc_job", job))
            labels.sort()
            series = cast(Any, wire.TimeSeries())
            for name, value in labels:
                series.labels.add(name=name, value=value)
            block = self._blocks[key] = series.SerializeToString()
        return block

    def scrape(self, at_ms: int) -> Scrape:
        """The twin at `at_ms` (it runs from 0 on the first call) as remote-write bodies."""
        tw = self.twin
        if self._scrapes:
            tw.run_until(tw.t_s + (at_ms - self._last_ms) / 1000.0)
        self._last_ms = at_ms
        values = exported_values(tw, self.fields)
        jobs = tw.job_labels().tolist()
        silent = int(np.searchsorted(tw.node_of, self.silent_nodes))  # the silent nodes' rows
        encoded: list[bytes] = []
        markers = new = 0
        sample = cast(Any, wire.TimeSeries())
        point = sample.samples.add()
        point.timestamp = at_ms
        columns = [values[f.name].tolist() for f in self.fields]
        n_fields = len(self.fields)
        for flat in self._order.tolist():
            row, k = divmod(flat, n_fields)
            if row < silent and self._scrapes >= 1:
                if self._scrapes == 1:  # the scrape failed: every series of it is marked
                    point.value = STALE
                    encoded.append(self._block(row, k, self._job_of[row]) + _sample(sample))
                    markers += 1
                continue
            old, job = self._job_of[row], jobs[row]
            if old != job and self._scrapes:
                point.value = STALE  # the series of the old job leaves the target
                encoded.append(self._block(row, k, old) + _sample(sample))
                markers += 1
            if (row, k, job) not in self._blocks:
                new += 1
            point.value = columns[k][row]
            encoded.append(self._block(row, k, job) + _sample(sample))
        self._job_of = jobs
        self._scrapes += 1
        bodies = [
            _compress(encoded[i : i + self.samples_per_send])
            for i in range(0, len(encoded), self.samples_per_send)
        ]
        return Scrape(bodies, len(encoded), markers, new)


def _sample(series: Any) -> bytes:
    return cast(bytes, series.SerializeToString())


def _compress(series: list[bytes]) -> bytes:
    """A WriteRequest of these encoded series (the wire format of `repeated TimeSeries`)."""
    request = cast(Any, wire.MESSAGES["SplitRequest"]())
    request.timeseries.extend(series)
    return bytes(cramjam.snappy.compress_raw(request.SerializeToString()))


@dataclass
class SendReport:
    requests: int = 0
    failed: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def send(url: str, bodies: Sequence[bytes], shards: int, over_s: float) -> SendReport:
    """Every body POSTed to `url` by `shards` threads, each on one kept-alive connection, spread
    evenly over `over_s` seconds (0: as fast as they go)."""
    parts = urllib.parse.urlsplit(url)
    report = SendReport()
    lock = threading.Lock()
    start = time.monotonic()
    order = list(range(len(bodies)))
    random.Random(0).shuffle(order)

    def shard(k: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        headers = {
            "Content-Type": "application/x-protobuf",
            "Content-Encoding": "snappy",
            "X-Prometheus-Remote-Write-Version": "0.1.0",
        }
        for j in order[k::shards]:
            due = start + over_s * j / max(1, len(bodies))
            time.sleep(max(0.0, due - time.monotonic()))
            conn.request("POST", parts.path, bodies[j], headers)
            response = conn.getresponse()
            text = response.read()
            with lock:
                report.requests += 1
                if response.status != 204:
                    report.failed.append(f"HTTP {response.status}: {text[:200]!r}")
        conn.close()

    threads = [threading.Thread(target=shard, args=(k,)) for k in range(shards)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report.wall_s = time.monotonic() - start
    return report

"""Streaming telemetry for real: Debian's Prometheus scrapes the twin's dcgm-exporter endpoints
(1 s scrapes) and remote-writes every sample to the agent's receiver, while the Prometheus
source queries the same Prometheus. Both must see the same fleet:

- the same Snapshot (GPUs, identity, jobs, every field, ages) with the twin standing still;
- the same stale GPUs when a node's exporter stops answering (Prometheus sends staleness
  markers for its series: they arrive by remote write);
- `ooda once` with `[source] kind = "remote_write"`, end to end, from a config file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.core.snapshot import Snapshot
from agent.observe.remote_write import RemoteWriteConfig, RemoteWriteSource
from agent.sim.exporter import SimServer
from agent.sim.faults import parse_fault
from agent.sim.twin import TwinSpec
from tests.conftest import free_port, last_json
from tests.integration.conftest import SCRAPE_S, Prometheus, ooda, scrape_yaml

pytestmark = pytest.mark.integration

DROPOUT_AT_S = 25.0  # twin seconds: node2's exporter stops answering


def remote_write_yaml(url: str) -> str:
    """A remote_write section sending within a tenth of a second of each scrape."""
    return (
        "remote_write:\n"
        f"  - url: {url}\n"
        "    queue_config:\n"
        "      batch_send_deadline: 100ms\n"
        "      min_backoff: 50ms\n"
        "      max_backoff: 500ms\n"
    )


def start_prometheus(base: Path, targets: list[str], write_url: str) -> Prometheus:
    config = base / "prometheus.yml"
    config.write_text(scrape_yaml({"dcgm": targets}) + remote_write_yaml(write_url))
    return Prometheus.under(base).start()


@dataclass
class Pipeline:
    server: SimServer
    prometheus: Prometheus
    receiver: RemoteWriteSource


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    spec = TwinSpec(
        nodes=4,
        gpus_per_node=4,
        seed=5,
        faults=(parse_fault(f"dropout:node2@{DROPOUT_AT_S:g}+600"),),
    )
    server = SimServer(spec, port_base=0, speed=1).start()
    receiver = RemoteWriteSource(
        RemoteWriteConfig(listen="127.0.0.1:0", scrape_interval_s=SCRAPE_S, startup_wait_s=0)
    )
    prom: Prometheus | None = None
    try:
        prom = start_prometheus(tmp_path, server.targets(), receiver.url)
        prom.wait_for_gpus(16)
        deadline = time.monotonic() + 30
        while receiver.store.series < 16 * len(server.fields):
            assert time.monotonic() < deadline, "remote write never delivered every series"
            time.sleep(0.2)
        yield Pipeline(server, prom, receiver)
    finally:
        if prom is not None:
            prom.stop()
        receiver.close()
        server.stop()


def _same_moment(pipe: Pipeline) -> tuple[Snapshot, Snapshot]:
    """Both sources' snapshots at one `now`, once both hold the same newest scrape (remote
    write trails the scrape by up to its batch deadline)."""
    queried = pipe.prometheus.source()
    for _ in range(50):
        now = time.time()
        a, b = queried.observe(now), pipe.receiver.observe(now)
        if a.n_gpus == b.n_gpus and np.array_equal(a.age_s, b.age_s):
            return a, b
        time.sleep(0.13)
    raise AssertionError(f"the sources never agreed on the newest scrape: {a.age_s} {b.age_s}")


def _assert_same(a: Snapshot, b: Snapshot) -> None:
    assert a.n_gpus == b.n_gpus
    assert list(a.node_of()) == list(b.node_of())
    for name in ("gpu", "uuid", "model", "job", "stale"):
        assert list(getattr(a, name)) == list(getattr(b, name)), name
    np.testing.assert_array_equal(a.age_s, b.age_s)
    assert a.values.keys() == b.values.keys()
    for metric in a.values:
        np.testing.assert_array_equal(a.values[metric], b.values[metric], err_msg=str(metric))
        np.testing.assert_array_equal(a.valid[metric], b.valid[metric], err_msg=str(metric))
    assert a.errors == b.errors == ()


def test_the_same_snapshot_as_the_query_source_and_the_same_stale_gpus(
    pipeline: Pipeline,
) -> None:
    server = pipeline.server
    assert server.twin.t_s < DROPOUT_AT_S - 4, "too slow to compare before the dropout"
    server.pause()  # the twin stands still: every scrape serves the same values
    try:
        time.sleep(2.5 * SCRAPE_S)
        queried, received = _same_moment(pipeline)
    finally:
        server.resume()
    assert received.n_gpus == 16 and not received.stale.any()
    assert (received.job != "").any(), "the twin runs jobs: their labels come along"
    _assert_same(queried, received)

    # node2's exporter stops answering: Prometheus marks its series stale and sends the markers.
    while server.twin.t_s < DROPOUT_AT_S:
        time.sleep(0.1)
    deadline = time.monotonic() + 10
    while True:
        queried, received = _same_moment(pipeline)
        if received.stale.any() and queried.stale.any():
            break
        assert time.monotonic() < deadline, "node2 never went stale"
        time.sleep(0.2)
    assert set(received.node_of()[received.stale]) == {"node2"}
    assert int(received.stale.sum()) == 4
    assert (received.job[received.stale] == "").all()  # no live series: no job known
    _assert_same(queried, received)
    assert pipeline.receiver.store.series >= 16 * len(server.fields)


def test_ooda_once_from_a_config_with_a_remote_write_source(tmp_path: Path) -> None:
    server = SimServer(TwinSpec(nodes=2, gpus_per_node=4, seed=3), port_base=0, speed=1).start()
    port = free_port()
    config = tmp_path / "ooda.toml"
    config.write_text(
        "dry_run = true\n"
        "[cluster]\nbudget_w = 4000\n"
        '[source]\nkind = "remote_write"\n'
        f'[source.remote_write]\nlisten = "127.0.0.1:{port}"\n'
        f"scrape_interval_s = {SCRAPE_S:g}\nstartup_wait_s = 30\n"
    )
    prom = start_prometheus(tmp_path, server.targets(), f"http://127.0.0.1:{port}/api/v1/write")
    try:
        checked = ooda("config", "check", str(config))
        assert checked.returncode == 0, checked.stderr
        done = ooda("once", "--config", str(config), "--json", timeout_s=90)
        assert done.returncode == 0, done.stderr
        out = last_json(done.stdout)
        assert out["source"] == f"remote write on 127.0.0.1:{port}"
        assert (out["gpus"], out["nodes"], out["stale"]) == (8, 2, 0), json.dumps(out)[:2000]
        assert all(g["power_w"] is not None and g["power_limit_w"] == 700.0 for g in out["per_gpu"])
        assert out["intents"], "a budget of 4000 W for 8 busy H100s: caps are proposed"
    finally:
        prom.stop()
        server.stop()

"""The recorded dcgm-exporter pages (tests/fixtures/dcgm) scraped by a real Prometheus and read
by the agent's own loop: the healthy node seen whole, the degraded one as it is (a GPU off the
bus drained, a GPU whose ECC counter is not supported left alone, a GPU gone from the page not
seen at all)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from agent.assembly import assemble
from agent.config import parse_config
from agent.core.situation import HealthSeverity
from agent.core.snapshot import Metric
from tests.integration.conftest import PrometheusFactory

pytestmark = pytest.mark.integration

PAGES = Path(__file__).resolve().parent.parent / "fixtures" / "dcgm"


class _Page(BaseHTTPRequestHandler):
    text = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(type(self).text)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(page: str) -> Iterator[str]:
    handler = type("Page", (_Page,), {"text": (PAGES / page).read_bytes()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _cycle(prometheus_factory: PrometheusFactory, page: str, gpus: int):  # type: ignore[no-untyped-def]
    for target in _serve(page):
        prom = prometheus_factory({"dcgm": [target]})
        prom.wait_for_gpus(gpus)
        config = parse_config(
            {
                "source": {"kind": "prometheus", "prometheus": {"url": prom.url}},
                "policies": {"health_drain": {}},
            }
        )
        agent = assemble(config)
        try:
            return agent.cycle()
        finally:
            agent.close()
    raise AssertionError("unreachable")


def test_a_healthy_page_is_seen_whole(prometheus_factory: PrometheusFactory) -> None:
    report = _cycle(prometheus_factory, "healthy.prom", 8)
    snap = report.snapshot
    assert (snap.n_gpus, int(snap.stale.sum()), snap.node_names.tolist()) == (8, 0, ["dgx-a17"])
    power, ok = snap.column(Metric.POWER_W)
    assert ok.all() and power[snap.gpu == 0][0] == pytest.approx(588.412)
    limit, ok = snap.column(Metric.POWER_LIMIT_W)
    assert ok.all() and (limit == 700.0).all()
    assert set(snap.job.tolist()) == {"40117", "40188", ""}
    assert not report.errors and not report.intents
    assert (report.situation.health.severity == int(HealthSeverity.OK)).all()


def test_a_degraded_page_is_read_as_it_is(prometheus_factory: PrometheusFactory) -> None:
    report = _cycle(prometheus_factory, "degraded.prom", 6)
    snap = report.snapshot
    assert sorted(snap.gpu.tolist()) == [0, 1, 2, 3, 4, 5, 6]  # gpu7 is not on the page
    at = {int(g): k for k, g in enumerate(snap.gpu)}
    power, ok = snap.column(Metric.POWER_W)
    assert not ok[at[3]] and np.isnan(power[at[3]])  # DCGM's blank: missing, not 1.4e14 W
    assert any("implausible" in e for e in report.errors)
    health = report.situation.health
    assert health.severity[at[3]] == int(HealthSeverity.DRAIN)  # XID 79: off the bus
    assert health.severity[at[5]] >= int(HealthSeverity.WATCH)  # ECC, failed row remap
    assert health.severity[at[1]] == int(HealthSeverity.OK)  # ECC not supported: nothing wrong
    drains = [i for i in report.intents if i.kind == "drain_node"]
    assert [d.target_name() for d in drains] == ["dgx-a17"]

"""The demand-response PromQL signal, read from a real PromQL-compatible store (Debian's
victoria-metrics): the coordinator's site limit follows it, ramped."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from agent.core.clock import FakeClock
from agent.site.service import SiteService, promql_signal
from agent.site.settings import PromqlSignal, parse_site_config
from agent.site.store import MemoryStore
from tests.integration.site_services import VictoriaMetrics

pytestmark = pytest.mark.integration


def test_the_site_limit_follows_a_promql_target_within_its_ramp(tmp_path: Path) -> None:
    if VictoriaMetrics.binary() is None:
        pytest.skip("victoria-metrics is not installed (make test installs it)")
    vm = VictoriaMetrics(tmp_path, targets=[]).start()
    query = 'last_over_time(site_dr_target_watts{site="hall"}[1m])'
    read = promql_signal(PromqlSignal(url=vm.url, query=query))
    try:

        def push(watts: float) -> None:
            answer = httpx.post(
                f"{vm.url}/api/v1/import/prometheus",
                content=f'site_dr_target_watts{{site="hall"}} {watts}\n',
                timeout=5,
            )
            answer.raise_for_status()
            # Imported samples become searchable within a couple of seconds.
            deadline = time.monotonic() + 15
            while read() != watts and time.monotonic() < deadline:
                time.sleep(0.2)

        assert read() is None  # nothing yet: the last target is kept (none)
        push(2500.0)
        assert read() == 2500.0

        config = parse_site_config(
            {
                "site": {"name": "hall", "limit_w": 3000.0, "interval_s": 10.0},
                "clusters": {"c1": {"safe_share_w": 1000.0}},
                "demand_response": {
                    "ramp_w_per_s": 10.0,
                    "promql": {"url": vm.url, "query": query},
                },
            }
        )
        clock = FakeClock(1_800_000_000.0)
        service = SiteService(config, store=MemoryStore(clock), wall=clock)
        first = service.coordinator.step()
        assert first is not None and first.limit_w == 2500.0
        assert first.target.event is not None and first.target.event.source == "promql"
        push(1000.0)
        clock.advance(10.0)
        second = service.coordinator.step()
        assert second is not None and second.limit_w == 2400.0  # down 10 W/s for 10 s
        service.close()
    finally:
        vm.stop()

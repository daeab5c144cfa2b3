"""OpenADR 2.0b into the site's demand response, against OpenLEADR's own VTN on loopback: the
VTN sends the site's VEN a load-control event; the VEN maps it to a demand-response event, the
coordinator's store has it, and the VEN opts in (the site can meet it)."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from agent.core.clock import FakeClock
from agent.site.service import SiteService
from agent.site.settings import parse_site_config
from agent.site.store import MemoryStore
from tests.conftest import free_port

pytestmark = pytest.mark.integration

openleadr = pytest.importorskip("openleadr", reason="the openadr extra is not installed")


def test_an_openadr_event_becomes_a_demand_response_target() -> None:
    port = free_port()
    loop = asyncio.new_event_loop()
    vtn = openleadr.OpenADRServer(
        vtn_id="TESTVTN", http_port=port, http_host="127.0.0.1",
        verify_message_signatures=False, show_fingerprint=False,
    )  # fmt: skip

    async def register(_info: object) -> tuple[str, str]:
        return "ven-1", "reg-1"

    vtn.add_handler("on_create_party_registration", register)
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(vtn.run())
        ready.set()
        loop.run_forever()

    threading.Thread(target=serve, daemon=True).start()
    assert ready.wait(15)
    config = parse_site_config(
        {
            "site": {"name": "hall", "limit_w": 10_000.0, "interval_s": 10.0},
            "clusters": {"c1": {"safe_share_w": 2000.0}},
            "demand_response": {
                "ramp_w_per_s": 10.0,
                "openadr": {
                    "vtn_url": f"http://127.0.0.1:{port}/OpenADR2/Simple/2.0b",
                    "ven_name": "site-hall",
                },
            },
        }
    )
    clock = FakeClock(time.time())
    service = SiteService(config, store=MemoryStore(clock), wall=clock)
    service.round()  # the site's floor is known: cluster c1 counted at its safe share
    service.start_openadr()
    replies: list[str] = []
    try:
        time.sleep(1.0)  # the VEN registers
        start = datetime.now(UTC) + timedelta(minutes=5)
        interval = {"dtstart": start, "duration": timedelta(minutes=30), "signal_payload": 0.6}

        def add_event() -> None:
            vtn.add_event(
                ven_id="ven-1",
                signal_name="LOAD_CONTROL",
                signal_type="x-loadControlCapacity",
                intervals=[interval],
                callback=lambda ven_id, event_id, opt_type: replies.append(opt_type),
            )

        loop.call_soon_threadsafe(add_event)
        deadline = time.monotonic() + 30
        stored: dict[str, str] = {}
        while time.monotonic() < deadline and not (stored and replies):
            stored = service.store.get_prefix("/ooda/sites/hall/demand/events/")
            time.sleep(0.2)
        assert replies == ["optIn"]  # 6 kW is above the site's floor (2 kW)
        (text,) = stored.values()
        assert '"target_w": 6000.0' in text and '"source": "openadr"' in text
        clock.advance(330.0)  # the event holds
        report = service.coordinator.step()
        assert report is not None and report.limit_w == pytest.approx(6000.0)
    finally:
        service.close()
        loop.call_soon_threadsafe(loop.stop)

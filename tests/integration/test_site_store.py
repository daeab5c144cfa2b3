"""The etcd store on a real etcd: a watch wakes on a change, and closing the store while its
watches sit idle returns at once (the watch threads are blocked reading their streams); `ooda
site status` reads the coordinator's status from it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.cli import app
from agent.site.store import EtcdStore
from tests.integration.site_services import Etcd

pytestmark = [pytest.mark.integration]


def test_a_watch_wakes_on_a_change_and_an_idle_watch_stops_at_once(tmp_path: Path) -> None:
    if Etcd.binary() is None:
        pytest.skip("etcd not installed (make test installs it)")
    etcd = Etcd(tmp_path).start()
    store = EtcdStore([etcd.url], timeout_s=2.0)
    try:
        woken = threading.Event()
        store.watch_prefix("/t/grant", woken.set)
        assert woken.wait(10)  # the (re)connect itself: the caller re-reads
        woken.clear()
        store.put("/t/grant", "1")
        assert woken.wait(10)
        woken.clear()
        time.sleep(0.5)  # idle: the watch thread is blocked reading its stream
        assert not woken.is_set()
        closer = threading.Thread(target=store.close, daemon=True)
        started = time.monotonic()
        closer.start()
        closer.join(5)
        # Before the fix, close waited on the reader's buffer lock until etcd sent something.
        assert not closer.is_alive(), "closing the store hung on an idle watch"
        assert time.monotonic() - started < 2.0
    finally:
        etcd.stop()


def test_site_status_says_an_unknown_draw_is_unknown(tmp_path: Path) -> None:
    """A round with no live cluster has no measured draw (power_w null): `ooda site status`
    says so, never "drawing 0 W" (before the fix it printed 0 W, and "None W" per cluster)."""
    if Etcd.binary() is None:
        pytest.skip("etcd not installed (make test installs it)")
    etcd = Etcd(tmp_path).start()
    store = EtcdStore([etcd.url], timeout_s=2.0)
    config = tmp_path / "site.toml"
    config.write_text(
        f'[site]\nname = "hall"\nlimit_w = 3000.0\n\n[etcd]\nendpoints = ["{etcd.url}"]\n\n'
        "[clusters.c1]\nsafe_share_w = 1000.0\n"
    )
    status = {
        "limit_w": 3000.0, "power_w": None, "target_met": None, "coordinator": "coord",
        "demand_response": None,
        "clusters": {"c1": {"grant_w": None, "power_w": None, "can_meet": None,
                            "problem": "no curve (no agent leads it)"}},
    }  # fmt: skip
    try:
        store.put("/ooda/sites/hall/status", json.dumps(status))
        result = CliRunner().invoke(app, ["site", "status", "--config", str(config)])
    finally:
        store.close()
        etcd.stop()
    assert result.exit_code == 0, result.output
    assert "drawing unknown" in result.output and "drawing 0 W" not in result.output
    assert "c1: grant none, drawing unknown" in result.output

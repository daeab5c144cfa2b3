"""The etcd store on a real etcd: a watch wakes on a change, and closing the store while its
watches sit idle returns at once (the watch threads are blocked reading their streams)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

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

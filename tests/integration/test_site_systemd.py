"""`ooda site run` as systemd runs it (deploy/systemd/ooda-site.service, Type=notify), on a real
etcd: it says READY with its role once it has tried a round, feeds the watchdog between rounds,
re-reads its schedule on SIGHUP without stopping, and on SIGTERM says STOPPING, gives the leader
key up and exits 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.site.store import EtcdStore
from tests.daemon_helpers import REPO, write
from tests.integration.site_services import Etcd

pytestmark = [pytest.mark.integration]


def site_toml(etcd: Etcd) -> str:
    return f"""
[site]
name = "hall"
limit_w = 3000
interval_s = 1.0

[etcd]
endpoints = ["{etcd.url}"]
timeout_s = 1.0

[clusters.c1]
safe_share_w = 1000

[demand_response]
ramp_w_per_s = 100
schedule_file = "dr.toml"
"""


class Notifications:
    """systemd's side of the notify socket: a Unix datagram socket the service writes to."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def until(self, text: str, timeout_s: float = 20.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            if text in self.messages[-1]:
                return self.messages[-1]
        raise AssertionError(f"no {text!r} in {self.messages}")


def test_site_run_under_systemds_notify_protocol(tmp_path: Path) -> None:
    if Etcd.binary() is None:
        pytest.skip("etcd not installed (make test installs it)")
    (tmp_path / "etcd").mkdir()
    etcd = Etcd(tmp_path / "etcd").start()
    write(tmp_path / "dr.toml", "")  # no events yet
    config = write(tmp_path / "site.toml", site_toml(etcd))
    notify = Notifications(tmp_path / "notify.sock")
    env = {**os.environ, "OODA_LOG_LEVEL": "info", "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
           "WATCHDOG_USEC": "400000"}  # fmt: skip
    log = tmp_path / "site.log"
    store = EtcdStore([etcd.url])
    with log.open("ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "site", "run", "--config", str(config)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, env=env,
        )  # fmt: skip
    try:
        ready = notify.until("READY=1")
        assert "STATUS=site hall, leader: round " in ready, ready
        assert store.get("/ooda/sites/hall/coordinator/leader") is not None
        notify.until("WATCHDOG=1")
        started = len(notify.messages)
        time.sleep(1.5)
        notify.until("STATUS=site hall, leader: round ")  # a later round
        # Fed every 0.2 s (half of WATCHDOG_USEC), not once a round.
        assert sum(m == "WATCHDOG=1" for m in notify.messages[started:]) >= 4, notify.messages
        write(tmp_path / "dr.toml", "this is not TOML")
        proc.send_signal(signal.SIGHUP)  # a bad schedule is refused, the service runs on
        deadline = time.monotonic() + 10
        while '"site_schedule_refused"' not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert '"site_schedule_refused"' in log.read_text(), log.read_text()[-2000:]
        notify.until("WATCHDOG=1")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        notify.until("STOPPING=1")
        assert proc.wait(timeout=10) == 0, log.read_text()[-2000:]
        assert store.get("/ooda/sites/hall/coordinator/leader") is None  # given up at once
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.sock.close()
        store.close()
        etcd.stop()

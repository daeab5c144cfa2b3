"""`ooda run` against real parts: `ooda sim serve` (dcgm-style exporters and a node daemon per
node, on Unix sockets), a real Prometheus scraping them, and the node client applying caps
under leases. Live, then a restart (the leases it set are renewed by the new run: the node
client's memory came back with the state), then a stop with on_exit = release (every cap back to
the default limit)."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import last_json
from tests.daemon_helpers import DaemonProcess, write
from tests.integration.conftest import PrometheusFactory
from tests.node_helpers import node_gpus, sim_serve_line

pytestmark = pytest.mark.integration


def _config(prom_url: str, sockets: dict[str, str], token: Path, on_exit: str) -> str:
    endpoints = ", ".join(f'{node} = "{url}"' for node, url in sorted(sockets.items()))
    return f"""
dry_run = false

[cluster]
name = "real"
budget_w = 2400

[source]
kind = "prometheus"

[source.prometheus]
url = "{prom_url}"
scrape_interval_s = 1

[actuators]
caps = "node"
placement = "none"
lease_s = 30

[actuators.node]
endpoints = {{ {endpoints} }}
token_file = "{token}"
renew_min_age_s = 0

[policies.power_budget]

[daemon]
interval_s = 1
on_exit = "{on_exit}"

[audit]
path = "audit.jsonl"
"""


def _wait_for_leases(sockets: dict[str, str], token: str, timeout_s: float) -> list[dict[str, Any]]:
    """The node daemons' GPUs with a lease, once some have one (or none after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        leased = [
            g for url in sockets.values() for g in node_gpus(url, token)
            if g["lease_remaining_s"] is not None
        ]  # fmt: skip
        if leased or time.monotonic() >= deadline:
            return leased
        time.sleep(0.3)


def _lease_remaining(sockets: dict[str, str], token: str) -> dict[tuple[str, int], Any]:
    return {
        (node, g["index"]): g["lease_remaining_s"]
        for node, url in sockets.items()
        for g in node_gpus(url, token)
    }


def _caps_owned(state_file: Path) -> set[str]:
    """node/gpu of every cap the saved state says the agent owns."""
    caps = json.loads(state_file.read_text())["parts"]["caps"]
    return {
        f"{n}/{g}"
        for n, g, active in zip(caps["node"], caps["gpu"], caps["active"], strict=True)
        if active
    }


def _assert_all_released(sockets: dict[str, str], token: str, audit: Path) -> None:
    """Every cap back at its default limit, no lease left, and the daemon's releases applied."""
    gpus = [g for url in sockets.values() for g in node_gpus(url, token)]
    assert all(g["lease_remaining_s"] is None for g in gpus), gpus
    assert all(g["power_limit_w"] == g["default_w"] for g in gpus), gpus
    released = [
        json.loads(line)
        for line in audit.read_text().splitlines()
        if '"ooda-daemon"' in line and '"action"' in line
    ]
    assert released and all(r["outcome"] == "applied" for r in released)


def _token_file(tmp_path: Path) -> tuple[str, Path]:
    token = secrets.token_urlsafe(24)
    token_file = tmp_path / "node.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    return token, token_file


def _serve_twin(token_file: Path, sockets_dir: Path) -> subprocess.Popen[str]:
    """`ooda sim serve`: two nodes of four GPUs, with node daemons on sockets in `sockets_dir`."""
    sockets_dir.mkdir()
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "sim", "serve", "--nodes", "2", "--gpus-per-node", "4",
         "--port-base", "0", "--json", "--node-token-file", str(token_file),
         "--node-socket-dir", str(sockets_dir), "--fallback-cap-w", "300"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def test_ooda_run_live_on_prometheus_and_node_daemons_restart_and_release(
    tmp_path: Path, prometheus_factory: PrometheusFactory
) -> None:
    token, token_file = _token_file(tmp_path)
    serve = _serve_twin(token_file, tmp_path / "sock")
    try:
        info = last_json(sim_serve_line(serve, 30))
        sockets: dict[str, str] = info["node_api"]
        prom = prometheus_factory({"dcgm": info["targets"]})
        prom.wait_for_gpus(8)
        state = tmp_path / "state"
        cfg = write(tmp_path / "agent.toml", _config(prom.url, sockets, token_file, "renew"))

        # 1. Live: the budget (2400 W for 8 H100s) needs caps; the node daemons hold them.
        first = DaemonProcess(cfg, state, tmp_path / "first.log").started()
        try:
            leased = _wait_for_leases(sockets, token, 30)
            assert leased, first.log_path.read_text()[-3000:]
            assert all(g["power_limit_w"] < 700 for g in leased)
            # Leases land during act; the cycle's metrics are set when the cycle ends.
            first.wait_cycles(1)
            assert first.value("ooda_gpus_seen") == 8
            assert httpx.get(f"{first.url}/readyz", timeout=5).status_code == 200
            code, took_s = first.stop()
        finally:
            first.kill()
        assert code == 0 and took_s < 5
        ours = _caps_owned(state / "real.state.json")
        assert ours  # the node client's leases are in the state

        # 2. Restart: the new run knows those leases and keeps renewing them.
        before = _lease_remaining(sockets, token)
        second = DaemonProcess(cfg, state, tmp_path / "second.log").started()
        try:
            assert second.wait_event("state_restored")["caps_owned"] >= len(ours)
            time.sleep(3)  # a few cycles: renewals push every lease back towards 30 s
            after = _lease_remaining(sockets, token)
            for key in ours:  # not renewed, it would be down to about 25 s by now
                node, gpu = key.split("/")
                was, now = before[(node, int(gpu))], after[(node, int(gpu))]
                assert was is not None and now is not None and now >= 27.0, (key, was, now)
            # 3. Stop releasing: every cap back to its default limit, the leases ended.
            write(cfg, _config(prom.url, sockets, token_file, "release"))
            seen = len(second.events())
            second.proc.send_signal(1)  # SIGHUP
            second.wait_event("config_reloaded", after=seen)
            code, _ = second.stop()
        finally:
            second.kill()
        assert code == 0
        _assert_all_released(sockets, token, state / "audit.jsonl")
    finally:
        serve.terminate()
        serve.wait(timeout=10)

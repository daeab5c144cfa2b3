"""The twin's dcgm-exporter endpoints, over real sockets."""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.core.dcgm import DCGM_FIELDS
from agent.sim.exporter import SimServer, exported_values, scrape_config, served_fields
from agent.sim.faults import parse_fault
from agent.sim.twin import TwinSpec


def _get(target: str, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://{target}{path}", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(response.read().decode())


def test_metrics_text_is_dcgm_exporter_shaped() -> None:
    spec = TwinSpec(nodes=2, gpus_per_node=3, seed=2)
    with SimServer(spec, port_base=0, speed=0) as server:
        text = _get(server.targets()[1])
        twin = server.twin
        served = exported_values(twin, served_fields("all"))
    # The real dcgm-exporter's counters have no _total suffix: neither do ours.
    assert "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter" in text
    assert "_total{" not in text
    names = {ln.split("{", 1)[0] for ln in text.splitlines() if not ln.startswith("#")}
    assert names == {f.name for f in DCGM_FIELDS}
    # prometheus-client's own parser reads it (it renames counters with _total, as it always does)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    power = [s for f in families.values() for s in f.samples if s.name == "DCGM_FI_DEV_POWER_USAGE"]
    assert len(power) == 3
    for s in power:
        labels = s.labels
        assert labels["Hostname"] == "node2"
        row = 3 + int(labels["gpu"])
        assert labels["UUID"] == twin.uuid[row]
        assert labels["device"] == f"nvidia{labels['gpu']}"
        assert labels["modelName"] == "NVIDIA H100 80GB HBM3"
        assert labels["pci_bus_id"].startswith("00000000:")
        assert labels["DCGM_FI_DRIVER_VERSION"]
        assert labels.get("hpc_job", "") == twin.job_labels()[row]
        assert s.value == pytest.approx(served["DCGM_FI_DEV_POWER_USAGE"][row], abs=1e-9)
    temps = [ln for ln in text.splitlines() if ln.startswith("DCGM_FI_DEV_GPU_TEMP{")]
    assert all(ln.rsplit(" ", 1)[1].isdigit() for ln in temps)  # integer fields print as such


def test_default_counters_leave_out_power_limits() -> None:
    with SimServer(
        TwinSpec(nodes=1, gpus_per_node=1), port_base=0, speed=0, counters="default"
    ) as s:
        text = _get(s.targets()[0])
    assert "DCGM_FI_DEV_POWER_USAGE{" in text
    assert "DCGM_FI_DEV_POWER_MGMT_LIMIT" not in text
    assert "DCGM_FI_DEV_ENFORCED_POWER_LIMIT" not in text


def test_dropout_stops_answering_for_its_duration() -> None:
    spec = TwinSpec(nodes=2, gpus_per_node=1, faults=(parse_fault("dropout:node2@10+5"),))
    with SimServer(spec, port_base=0, speed=0) as server:
        node1, node2 = server.targets()
        assert _get(node2)
        server.advance(10)
        with pytest.raises((http.client.RemoteDisconnected, urllib.error.URLError)):
            _get(node2)
        assert _get(node1)  # the others answer
        server.advance(5)
        assert _get(node2)


def test_unknown_path_is_404_and_port_conflicts_are_named() -> None:
    with SimServer(TwinSpec(nodes=1, gpus_per_node=1), port_base=0, speed=0) as server:
        with pytest.raises(urllib.error.HTTPError) as exc:
            _get(server.targets()[0], "/nope")
        assert exc.value.code == 404
        port = int(server.targets()[0].rsplit(":", 1)[1])
        clash = SimServer(TwinSpec(nodes=1, gpus_per_node=1), port_base=port, speed=0)
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port} for node1"):
            clash.start()


def test_stepping_follows_speed_and_pauses() -> None:
    with SimServer(TwinSpec(nodes=1, gpus_per_node=1), port_base=0, speed=20) as server:
        deadline = time.monotonic() + 5
        while server.twin.t_s < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.twin.t_s >= 5  # 20x real time: 5 twin seconds in about 0.25 s
        server.pause()
        t = server.twin.t_s
        time.sleep(0.2)
        assert server.twin.t_s == t
        server.resume()
        time.sleep(0.3)
        assert server.twin.t_s > t


def test_scrape_config() -> None:
    text = scrape_config(["127.0.0.1:19400", "127.0.0.1:19401"], "dcgm", 1.0)
    assert "scrape_interval: 1s" in text
    assert "- '127.0.0.1:19401'" in text


@pytest.mark.integration
def test_sim_serve_hosts_a_node_daemon_per_node(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The twin's nodes also answer the node daemon's cap API; a cap set through the real node
    actuator shows on the twin and in its exporter."""
    import numpy as np

    from agent.act.node_client import NodeCapActuator, NodeClientSettings
    from agent.core.intents import GpuTargets
    from agent.sim.exporter import NodeApiOptions

    token = tmp_path / "token"
    token.write_text("sim-serve-test-token-0123456789\n")
    token.chmod(0o600)  # others may not read a node daemon's tokens (issue 28)
    sockets = tmp_path / "run"
    sockets.mkdir()
    api = NodeApiOptions(token_file=token, socket_dir=sockets, fallback_cap_w=300.0)
    with SimServer(
        TwinSpec(nodes=2, gpus_per_node=2, seed=1), port_base=0, speed=0, node_api=api
    ) as server:
        endpoints = server.node_api_endpoints()
        assert set(endpoints) == {"node1", "node2"} and endpoints["node2"].startswith("unix://")
        caps = NodeCapActuator(NodeClientSettings(endpoints=endpoints, token_file=token))
        try:
            targets = GpuTargets(
                np.array(["node2"]), np.array([1]), np.array([str(server.twin.uuid[3])])
            )
            result = caps.set_caps(targets, np.array([450.0]), lease_s=60)
            assert result.ok.tolist() == [True], result.errors
            assert server.twin.cap_w[3] == 450.0
            text = _get(server.targets()[1])
            assert 'DCGM_FI_DEV_POWER_MGMT_LIMIT{gpu="1"' in text and " 450" in text
        finally:
            caps.close()

"""The node actuator against several real node daemons on the twin's GPUs: parallel, bounded,
per-target results (one node down, one slow, one without an endpoint), lease renewal, TLS."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.act.node_client import NodeCapActuator, NodeClientSettings
from agent.assembly import assemble
from agent.config import parse_config
from agent.core.clock import FakeClock
from agent.core.errors import ConfigError
from agent.core.intents import GpuTargets
from agent.core.protocols import (
    CapActuator,
    CapLeaseAdopter,
    CapLeaseRenewer,
    GpuLimitsSource,
)
from agent.node.server import NodeDaemon, NodeSettings
from agent.sim.devices import TwinNodeBackend
from agent.sim.twin import Twin, TwinSpec
from tests.conftest import free_port
from tests.http_helpers import LoopbackServer
from tests.node_helpers import FakeBackend, SlowGpu, make_pki, write_token

pytestmark = pytest.mark.integration

FALLBACK_W = 300.0


class Cluster:
    """node1, node2: healthy daemons; node3: a daemon whose GPU 0 answers in 1 s; node4: its
    socket has no daemon; node5: no endpoint configured."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token = write_token(root / "token")
        self.twin = Twin(TwinSpec(nodes=5, gpus_per_node=2, seed=3, initial_jobs=False))
        self.lock = threading.RLock()
        self.daemons: list[NodeDaemon] = []
        for k in (1, 2, 3):
            backend = TwinNodeBackend(self.twin, k)
            if k == 3:
                devices = list(backend.devices())
                backend = FakeBackend([SlowGpu(devices[0], 1.0), devices[1]])  # type: ignore[assignment]
            daemon = NodeDaemon(
                backend,
                NodeSettings(
                    token_file=root / "token",
                    socket_path=root / f"node{k}.sock",
                    fallback_cap_w=FALLBACK_W,
                    check_interval_s=0.05,
                ),
                # The slow node must not hold up the others (each real node is its own machine).
                lock=self.lock if k != 3 else threading.RLock(),
            )
            self.daemons.append(daemon.start())

    def settings(self, **changes: object) -> NodeClientSettings:
        values: dict[str, object] = {
            "endpoints": {f"node{k}": f"unix://{self.root}/node{k}.sock" for k in (1, 2, 3, 4)},
            "token_file": self.root / "token",
            "timeout_s": 0.3,
            "retries": 1,
            "retry_backoff_s": 0.05,
            "max_parallel": 4,
            "renew_min_age_s": 0.0,
        }
        return NodeClientSettings.model_validate(values | changes)

    def targets(self, nodes: list[int], gpus: list[int]) -> GpuTargets:
        rows = [(n - 1) * 2 + g for n, g in zip(nodes, gpus, strict=True)]
        return GpuTargets(
            node=np.array([f"node{n}" for n in nodes], dtype=np.str_),
            gpu=np.array(gpus, dtype=np.int64),
            uuid=np.array([self.twin.uuid[r] for r in rows], dtype=np.str_),
        )

    def cap(self, node: int, gpu: int) -> float:
        with self.lock:
            return float(self.twin.cap_w[(node - 1) * 2 + gpu])

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="ooda-nc-"))
    c = Cluster(root)
    try:
        yield c
    finally:
        c.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def actuator(cluster: Cluster) -> Iterator[NodeCapActuator]:
    a = NodeCapActuator(cluster.settings())
    try:
        yield a
    finally:
        # Leave the twin as found for the next test.
        healthy = cluster.targets([1, 1, 2, 2], [0, 1, 0, 1])
        a.release_caps(healthy)
        a.close()


def test_protocols(actuator: NodeCapActuator) -> None:
    assert isinstance(actuator, CapActuator)
    assert isinstance(actuator, CapLeaseRenewer)
    assert isinstance(actuator, GpuLimitsSource)


def test_caps_across_nodes_with_one_down_one_slow_one_unknown(
    cluster: Cluster, actuator: NodeCapActuator
) -> None:
    targets = cluster.targets([1, 1, 2, 2, 3, 3, 4, 5], [0, 1, 0, 1, 0, 1, 0, 0])
    watts = np.array([400.0, 450.0, 500.0, 9999.0, 400.0, 400.0, 400.0, 400.0])
    t0 = time.monotonic()
    result = actuator.set_caps(targets, watts, lease_s=60.0)
    elapsed = time.monotonic() - t0
    assert elapsed < actuator.settings.call_deadline_s()
    assert elapsed < 2.0, elapsed  # the slow and down nodes cost their timeouts, in parallel
    assert result.ok.tolist() == [True, True, True, False, False, False, False, False]
    assert result.before_w[:3].tolist() == [700.0, 700.0, 700.0]
    assert np.isnan(result.before_w[3:]).all()
    assert (cluster.cap(1, 0), cluster.cap(1, 1), cluster.cap(2, 0)) == (400.0, 450.0, 500.0)
    assert cluster.cap(2, 1) == 700.0  # out of range: refused, nothing changed
    e = result.errors
    assert "node2/gpu1" in e[3] and "[200, 700] W" in e[3] and "HTTP 400" in e[3]
    assert e[4].startswith("node3: timed out after 0.3 s (2 tries)")
    assert e[5] == e[4]  # one request per node: the whole node timed out
    assert e[6].startswith("node4: unreachable") and "2 tries" in e[6]
    assert e[7] == "node5: no endpoint configured for this node"
    assert set(e) == {3, 4, 5, 6, 7}


def test_renewal_keeps_leases_alive_and_stopping_lets_them_fall_back(
    cluster: Cluster, actuator: NodeCapActuator
) -> None:
    targets = cluster.targets([1, 2], [1, 0])
    result = actuator.set_caps(targets, np.array([420.0, 440.0]), lease_s=0.5)
    assert result.ok.all()
    for _ in range(6):  # 1.2 s: well past the first lease
        time.sleep(0.2)
        renewed, res = actuator.renew_leases(0.5)
        assert len(renewed) == 2 and res.ok.all()
    assert (cluster.cap(1, 1), cluster.cap(2, 0)) == (420.0, 440.0)
    deadline = time.monotonic() + 3.0  # the agent stops renewing
    # Each node daemon expires its own leases on its own timer: wait for both.
    while (cluster.cap(1, 1), cluster.cap(2, 0)) != (FALLBACK_W, FALLBACK_W):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (cluster.cap(1, 1), cluster.cap(2, 0)) == (FALLBACK_W, FALLBACK_W)


def test_renewal_skips_fresh_caps_and_forgets_released_ones(cluster: Cluster) -> None:
    clock = FakeClock(100.0)
    a = NodeCapActuator(cluster.settings(renew_min_age_s=10.0), clock=clock)
    try:
        targets = cluster.targets([1, 1, 2], [0, 1, 0])
        assert a.set_caps(targets, np.array([300.0, 310.0, 320.0]), 60.0).ok.all()
        renewed, _ = a.renew_leases(60.0)
        assert len(renewed) == 0  # just set
        clock.advance(10.0)
        a.release_caps(targets.subset([1]))
        renewed, res = a.renew_leases(60.0)
        assert sorted(renewed.names()) == ["node1/gpu0", "node2/gpu0"] and res.ok.all()
        leased, watts = a.leased()
        assert dict(zip(leased.names(), watts.tolist(), strict=True)) == {
            "node1/gpu0": 300.0,
            "node2/gpu0": 320.0,
        }
        assert cluster.cap(1, 1) == 700.0
        a.release_caps(targets)
        assert len(a.leased()[0]) == 0
    finally:
        a.close()


def test_caps_adopted_after_a_restart_are_renewed_at_once(cluster: Cluster) -> None:
    # A restarted agent found these caps of its own in force (agent.act.recovery): a fresh
    # client never set them, and their leases were granted before the restart.
    clock = FakeClock(100.0)
    first = NodeCapActuator(cluster.settings(renew_min_age_s=10.0), clock=clock)
    restarted = NodeCapActuator(cluster.settings(renew_min_age_s=10.0), clock=clock)
    try:
        targets = cluster.targets([1, 2], [0, 1])
        assert first.set_caps(targets, np.array([300.0, 320.0]), 60.0).ok.all()
        assert isinstance(restarted, CapLeaseAdopter)
        restarted.adopt_leases(targets, np.array([300.0, 320.0]))
        renewed, result = restarted.renew_leases(60.0)  # at once, not renew_min_age_s later
        assert sorted(renewed.names()) == ["node1/gpu0", "node2/gpu1"] and result.ok.all()
        assert (cluster.cap(1, 0), cluster.cap(2, 1)) == (300.0, 320.0)
        assert len(restarted.renew_leases(60.0)[0]) == 0  # then on the usual schedule
        assert restarted.release_caps(targets).ok.all()  # the cluster is shared by the module
    finally:
        first.close()
        restarted.close()


def test_gpu_limits_as_telemetry(cluster: Cluster, actuator: NodeCapActuator) -> None:
    actuator.set_caps(cluster.targets([2], [1]), np.array([350.0]), 60.0)
    limits = actuator.gpu_limits(["node1", "node2", "node4"])
    assert limits.node.tolist() == ["node1", "node1", "node2", "node2"]
    assert limits.gpu.tolist() == [0, 1, 0, 1]
    assert limits.min_w.tolist() == [200.0] * 4 and limits.max_w.tolist() == [700.0] * 4
    assert limits.power_limit_w.tolist() == [700.0, 700.0, 700.0, 350.0]
    assert np.isnan(limits.lease_remaining_s[:3]).all() and limits.lease_remaining_s[3] > 50
    assert list(limits.errors) == ["node4"] and "unreachable" in limits.errors["node4"]


def test_wrong_token_is_explained_per_target(cluster: Cluster, tmp_path: Path) -> None:
    write_token(tmp_path / "bad", "a-token-the-nodes-do-not-know")
    a = NodeCapActuator(cluster.settings(token_file=tmp_path / "bad"))
    try:
        result = a.set_caps(cluster.targets([1], [0]), np.array([300.0]), 60.0)
        assert not result.ok.any()
        assert result.errors[0] == "node1: HTTP 403: the bearer token is not accepted"
        assert cluster.cap(1, 0) == 700.0
    finally:
        a.close()


def test_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    write_token(tmp_path / "token")
    twin = Twin(TwinSpec(nodes=1, gpus_per_node=2, seed=1, initial_jobs=False))
    settings = NodeSettings(
        token_file=tmp_path / "token",
        listen="127.0.0.1:0",
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
    )
    with NodeDaemon(TwinNodeBackend(twin, 1), settings) as daemon:
        targets = GpuTargets(
            np.array(["node1"], dtype=np.str_), np.array([1]), np.array([twin.uuid[1]])
        )
        common = {
            "endpoints": {"node1": daemon.address},
            "token_file": tmp_path / "token",
            "tls_ca": pki.ca,
            "timeout_s": 2.0,
            "retries": 0,
        }
        with_cert = NodeCapActuator(
            NodeClientSettings.model_validate(
                common | {"tls_client_cert": pki.client_cert, "tls_client_key": pki.client_key}
            )
        )
        without = NodeCapActuator(NodeClientSettings.model_validate(common))
        try:
            assert with_cert.set_caps(targets, np.array([333.0]), 60.0).ok.all()
            assert twin.cap_w[1] == 333.0
            refused = without.set_caps(targets, np.array([444.0]), 60.0)
            assert not refused.ok.any() and "node1: unreachable" in refused.errors[0]
            assert twin.cap_w[1] == 333.0
        finally:
            with_cert.close()
            without.close()


# -- configuration ---------------------------------------------------------------------------


def test_config_wires_the_node_actuator(tmp_path: Path) -> None:
    write_token(tmp_path / "token")
    config = parse_config(
        {
            "actuators": {
                "caps": "node",
                "node": {
                    "endpoint_template": "unix:///run/ooda/{node}.sock",
                    "token_file": str(tmp_path / "token"),
                },
            }
        }
    )
    runtime = assemble(config)
    try:
        caps = runtime.actuators.caps
        assert isinstance(caps, NodeCapActuator)
        assert caps.endpoint("node7") == "unix:///run/ooda/node7.sock"
    finally:
        runtime.close()


@pytest.mark.parametrize(
    ("actuators", "message"),
    [
        ({"caps": "node"}, "actuators: caps = 'node' needs an [actuators.node] section"),
        (
            {"caps": "node", "node": {"token_file": "/t"}},
            "actuators.node: give endpoints (node -> URL) or an endpoint_template",
        ),
        (
            {"node": {"token_file": "/t", "endpoints": {"n1": "ftp://x"}}},
            "actuators.node.endpoints: endpoint of 'n1': expected unix:///path",
        ),
        (
            {"node": {"token_file": "/t", "endpoint_template": "https://node:9440"}},
            "actuators.node.endpoint_template: must contain {node}",
        ),
        (
            {"node": {"token_file": "/t", "endpoint_template": "https://{node}", "retries": 9}},
            "actuators.node.retries: Input should be less than or equal to 5",
        ),
        (
            {
                "node": {
                    "token_file": "/t",
                    "endpoint_template": "https://{node}",
                    "tls_client_cert": "/c.pem",
                }
            },
            "tls_client_cert and tls_client_key go together",
        ),
    ],
)
def test_config_errors_name_the_key(actuators: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"actuators": actuators})
    assert message in str(exc.value), str(exc.value)


def _misbehaving(body: bytes, listing: bytes, port: int = 0) -> LoopbackServer:
    """A 'node daemon' on loopback that answers 200 with `listing` to a GET, `body` otherwise."""
    return LoopbackServer(
        lambda method, *_: (200, "application/json", listing if method == "GET" else body), port
    )


@pytest.mark.parametrize("index", ["null", '"0"', "true", "-1", "1.5"])
def test_a_node_answer_without_a_gpu_index_fails_that_node_only(
    cluster: Cluster, index: str
) -> None:
    """A node whose answer names no integer GPU index is that node's per-target error: the
    healthy node's cap is still set and reported, and nothing raises."""
    bad = _misbehaving(
        b'{"results": [{"index": %s, "ok": true, "before_w": 700}]}' % index.encode(),
        b'[{"index": %s, "uuid": "GPU-x", "max_w": 700}]' % index.encode(),
    )
    endpoints = {"node1": f"unix://{cluster.root}/node1.sock", "node9": bad.url}
    actuator = NodeCapActuator(cluster.settings(endpoints=endpoints))
    try:
        targets = GpuTargets(
            node=np.array(["node1", "node9"], dtype=np.str_),
            gpu=np.array([0, 0], dtype=np.int64),
            uuid=np.array([cluster.twin.uuid[0], "GPU-x"], dtype=np.str_),
        )
        result = actuator.set_caps(targets, np.array([450.0, 450.0]), 60.0)
        assert result.ok.tolist() == [True, False]
        assert "no result in the node's answer" in result.errors[1]
        limits = actuator.gpu_limits(["node1", "node9"])
        assert limits.node.tolist() == ["node1", "node1"] and not limits.errors
    finally:
        actuator.release_caps(cluster.targets([1], [0]))
        actuator.close()
        bad.close()


def test_an_unreachable_node_is_backed_off_then_asked_again(cluster: Cluster) -> None:
    """A node that does not answer is not asked again for `unreachable_backoff_s` (its timeouts
    would hold the workers and the deadline from the nodes that answer); the error says so. Once
    the back-off has passed it is asked again, and a node that answers is forgotten as down."""
    port = free_port()  # nothing listens there now: connections are refused
    clock = FakeClock(1000.0)
    settings = cluster.settings(endpoints={"node9": f"http://127.0.0.1:{port}"}, retries=0)
    actuator = NodeCapActuator(settings, clock=clock)
    targets = GpuTargets(
        node=np.array(["node9"], dtype=np.str_),
        gpu=np.array([0], dtype=np.int64),
        uuid=np.array(["GPU-x"], dtype=np.str_),
    )
    try:
        first = actuator.set_caps(targets, np.array([450.0]), 60.0)
        assert not first.ok[0] and "unreachable" in first.errors[0]
        again = actuator.set_caps(targets, np.array([450.0]), 60.0)
        assert "1 times in a row" in again.errors[0]
        assert "not asked again for 30 s" in again.errors[0]
        clock.advance(31.0)
        node = _misbehaving(
            b'{"results": [{"index": 0, "ok": true, "before_w": 700}]}', b"[]", port
        )
        try:
            assert actuator.set_caps(targets, np.array([450.0]), 60.0).ok.tolist() == [True]
        finally:
            node.close()
        # Down again: asked at once (answered last time), then backed off afresh.
        down = actuator.set_caps(targets, np.array([450.0]), 60.0)
        assert "not asked again" not in down.errors[0]
        assert "not asked again" in actuator.set_caps(targets, np.array([450.0]), 60.0).errors[0]
    finally:
        actuator.close()

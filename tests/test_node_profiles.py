"""Workload power profiles through the node daemon, as leases beside the caps and clock locks:
names checked against NVML's and the GPU's own list, cleared when the lease lapses (also after a
restart), and the HTTP API (token, 400 for an unknown profile, 501 without the lever)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from agent.core.clock import FakeClock
from agent.node.lease_file import LeaseFile
from agent.node.leases import CapRequestError, LeaseManager, OnExit, OnStart
from agent.node.server import NodeDaemon, NodeSettings
from agent.sim.devices import TwinNodeBackend
from agent.sim.twin import Twin, TwinSpec
from tests.node_helpers import FakeBackend, FakeGpu, unix_client, write_token

MEMORY_BOUND, BALANCED = 3, 5  # nvml.h's NVML_POWER_PROFILE_*


def _requested(gpu: FakeGpu) -> frozenset[int]:
    """What NVML holds as requested (a call, so that mypy does not narrow it across changes)."""
    return gpu.requested


def _manager(
    lease_file: LeaseFile | None = None,
) -> tuple[LeaseManager, list[FakeGpu], FakeClock]:
    gpus = [FakeGpu(0), FakeGpu(1)]
    clock = FakeClock(1000.0)
    manager = LeaseManager(FakeBackend(gpus), clock, max_lease_s=600.0, lease_file=lease_file)
    return manager, gpus, clock


def test_a_profile_holds_under_its_lease_and_is_cleared_when_it_lapses() -> None:
    manager, gpus, clock = _manager()
    gpu = manager.request_profile(0, "memory_bound", 60.0)
    assert _requested(gpus[0]) == {MEMORY_BOUND}
    assert gpu["power_profile"] == {"profile": "memory_bound", "lease_remaining_s": 60.0}
    assert gpu["power_profiles"] == ["balanced", "llm_inference", "memory_bound"]
    clock.advance(30.0)
    manager.request_profile(0, "balanced", 60.0)  # another profile replaces the first
    assert _requested(gpus[0]) == {BALANCED}
    clock.advance(59.0)
    manager.enforce()
    assert _requested(gpus[0]) == {BALANCED}
    clock.advance(1.0)
    manager.enforce()
    assert _requested(gpus[0]) == frozenset()  # lapsed: cleared, back to the default
    assert manager.gpu(0)["power_profile"] is None and manager.next_expiry_s() is None


@pytest.mark.parametrize(
    ("profile", "lease_s", "status", "text"),
    [
        ("turbo", 60.0, 400, "unknown profile 'turbo'"),
        ("hpc", 60.0, 400, "does not support profile 'hpc'"),
        ("balanced", 0.0, 400, "lease_s"),
        ("balanced", math.nan, 400, "lease_s"),
    ],
)
def test_refused_profiles_change_nothing(
    profile: str, lease_s: float, status: int, text: str
) -> None:
    manager, gpus, _clock = _manager()
    with pytest.raises(CapRequestError) as exc:
        manager.request_profile(0, profile, lease_s)
    assert exc.value.status == status and text in exc.value.message
    assert _requested(gpus[0]) == frozenset() and manager.next_expiry_s() is None


def test_the_twin_has_no_profiles_and_says_so() -> None:
    twin = Twin(TwinSpec(nodes=1, gpus_per_node=1, seed=1))
    manager = LeaseManager(TwinNodeBackend(twin, 1), FakeClock(0.0))
    with pytest.raises(CapRequestError) as exc:
        manager.request_profile(0, "balanced", 10.0)
    assert exc.value.status == 501 and "not supported" in exc.value.message
    assert manager.gpu(0)["power_profiles"] is None


def test_a_restart_clears_a_profile_whose_lease_lapsed(tmp_path: Path) -> None:
    table = LeaseFile(tmp_path / "leases.json", boot="boot-a")
    manager, gpus, clock = _manager(lease_file=table)
    manager.on_start(OnStart.KEEP)
    manager.request_profile(0, "memory_bound", 30.0)
    manager.request_profile(1, "balanced", 300.0)
    saved = json.loads((tmp_path / "leases.json").read_text())
    assert [p["profile"] for p in saved["power_profiles"]] == ["memory_bound", "balanced"]
    clock.advance(60.0)  # the daemon died; another starts after the first lease lapsed
    again = LeaseManager(FakeBackend(gpus), clock, lease_file=table)
    again.on_start(OnStart.KEEP)
    assert _requested(gpus[0]) == frozenset()
    assert _requested(gpus[1]) == {BALANCED}
    assert again.gpu(1)["power_profile"]["lease_remaining_s"] == pytest.approx(240.0)
    again.on_exit(OnExit.FALLBACK)  # the exit clears what the daemon requested
    assert _requested(gpus[1]) == frozenset()


@pytest.mark.integration
def test_the_profile_endpoints_need_a_token_and_refuse_unknown_profiles(tmp_path: Path) -> None:
    token = write_token(tmp_path / "token")
    gpus = [FakeGpu(0)]
    settings = NodeSettings(
        token_file=tmp_path / "token", socket_path=tmp_path / "node.sock", check_interval_s=0.05
    )
    body = {"profile": "memory_bound", "lease_s": 30.0}
    with (
        NodeDaemon(FakeBackend(gpus), settings) as d,
        unix_client(d.address) as anonymous,
        unix_client(d.address, token) as c,
    ):
        assert anonymous.put("/v1/gpus/0/profile", json=body).status_code == 401
        assert anonymous.delete("/v1/gpus/0/profile").status_code == 401
        for bad in ({**body, "profile": "turbo"}, {**body, "profile": "x" * 65}, {"profile": 3}):
            assert c.put("/v1/gpus/0/profile", json=bad).status_code == 400, bad
        assert _requested(gpus[0]) == frozenset()
        answer = c.put("/v1/gpus/0/profile", json=body)
        assert answer.status_code == 200 and _requested(gpus[0]) == {MEMORY_BOUND}
        assert c.get("/v1/gpus").json()[0]["power_profile"]["profile"] == "memory_bound"
        assert c.delete("/v1/gpus/0/profile").json()["gpu"]["power_profile"] is None
        assert _requested(gpus[0]) == frozenset()
        assert 'kind="profile_clear"' in c.get("/metrics").text

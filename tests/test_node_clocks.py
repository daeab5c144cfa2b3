"""SM clock locks through the node daemon, as leases beside the caps: validation against the GPU's
supported clocks, the reset when a lease lapses (also after a restart), and the HTTP API (token,
4xx/501 answers) over fake GPUs and the twin's."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from agent.core.clock import FakeClock
from agent.core.protocols import ClockLocker
from agent.node.lease_file import LeaseFile
from agent.node.leases import CapRequestError, LeaseManager, OnExit, OnStart
from agent.node.server import NodeDaemon, NodeSettings
from agent.sim.devices import TwinNodeBackend
from agent.sim.twin import Twin, TwinSpec
from tests.node_helpers import FakeBackend, FakeGpu, unix_client, write_token


class NoClockGpu:
    """A GPU whose device has no clock lever at all (a backend without it): the fake's cap
    methods only."""

    _LEVER = frozenset({"supported_sm_clock_range_mhz", "lock_sm_clocks_mhz", "reset_sm_clocks"})

    def __init__(self, index: int) -> None:
        self._inner = FakeGpu(index)

    def __getattr__(self, name: str) -> object:
        if name in self._LEVER:
            raise AttributeError(name)
        return getattr(self._inner, name)


def _locked(gpu: FakeGpu) -> tuple[float, float] | None:
    """The fake's locked range (a call, so that mypy does not narrow it across changes)."""
    return gpu.locked_mhz


def _manager(
    n: int = 2, lease_file: LeaseFile | None = None, clock: FakeClock | None = None
) -> tuple[LeaseManager, list[FakeGpu], FakeClock]:
    gpus = [FakeGpu(i) for i in range(n)]
    clock = clock or FakeClock(1000.0)
    manager = LeaseManager(
        FakeBackend(gpus), clock, fallback_cap_w=400.0, max_lease_s=600.0, lease_file=lease_file
    )
    return manager, gpus, clock


def test_a_lock_holds_under_its_lease_and_is_reset_when_it_lapses() -> None:
    manager, gpus, clock = _manager()
    gpu = manager.lock_clocks(1, 900.0, 1200.0, 60.0)
    assert _locked(gpus[1]) == (900.0, 1200.0)
    assert gpu["clock_lock"] == {"min_mhz": 900.0, "max_mhz": 1200.0, "lease_remaining_s": 60.0}
    assert gpu["sm_clock_range_mhz"] == [210.0, 1980.0]
    assert manager.gpu(0)["clock_lock"] is None and _locked(gpus[0]) is None
    clock.advance(40.0)
    gpus[1].locked_mhz = None  # reset behind the daemon's back (nvidia-smi -rgc)
    manager.lock_clocks(1, 900.0, 1200.0, 60.0)  # a renewal: the lease starts again, re-applied
    assert _locked(gpus[1]) == (900.0, 1200.0)
    clock.advance(40.0)
    assert manager.enforce() == [] and _locked(gpus[1]) == (900.0, 1200.0)
    assert manager.next_expiry_s() == pytest.approx(clock.now() + 20.0)
    clock.advance(20.0)
    manager.enforce()
    assert _locked(gpus[1]) is None  # lapsed: reset
    assert manager.gpu(1)["clock_lock"] is None and manager.next_expiry_s() is None
    assert gpus[1].limit_w == 700.0  # the cap is its own lever: untouched


def test_a_cap_and_a_lock_on_one_gpu_lapse_each_on_their_own_lease() -> None:
    manager, gpus, clock = _manager()
    manager.set_cap(0, 500.0, 30.0)
    manager.lock_clocks(0, 1000.0, 1000.0, 90.0)
    clock.advance(30.0)
    manager.enforce()
    assert gpus[0].limit_w == 400.0 and _locked(gpus[0]) == (1000.0, 1000.0)
    clock.advance(60.0)
    manager.enforce()
    assert _locked(gpus[0]) is None


@pytest.mark.parametrize(
    ("index", "lo", "hi", "lease_s", "status", "text"),
    [
        (0, 100.0, 1200.0, 60.0, 400, "[210, 1980] MHz"),
        (0, 900.0, 2100.0, 60.0, 400, "[210, 1980] MHz"),
        (0, 1300.0, 1200.0, 60.0, 400, "min_mhz must be at most max_mhz"),
        (0, math.nan, 1200.0, 60.0, 400, "min_mhz"),
        (0, 900.0, 1200.0, 0.0, 400, "lease_s"),
        (0, 900.0, 1200.0, 601.0, 400, "lease_s"),
        (0, 900.0, 1200.0, math.inf, 400, "lease_s"),
        (5, 900.0, 1200.0, 60.0, 404, "no GPU with index 5"),
    ],
)
def test_refused_locks_change_nothing(
    index: int, lo: float, hi: float, lease_s: float, status: int, text: str
) -> None:
    manager, gpus, _clock = _manager()
    with pytest.raises(CapRequestError) as exc:
        manager.lock_clocks(index, lo, hi, lease_s)
    assert exc.value.status == status and text in exc.value.message
    assert [g.locked_mhz for g in gpus] == [None, None]
    assert manager.next_expiry_s() is None


def test_a_gpu_without_the_lever_says_so() -> None:
    gpu = NoClockGpu(0)
    assert not isinstance(gpu, ClockLocker)
    manager = LeaseManager(FakeBackend([gpu]), FakeClock(0.0))  # type: ignore[list-item]
    with pytest.raises(CapRequestError) as exc:
        manager.lock_clocks(0, 900.0, 1200.0, 60.0)
    assert exc.value.status == 501 and "not supported" in exc.value.message
    assert manager.gpu(0)["sm_clock_range_mhz"] is None


def test_a_lost_gpu_keeps_its_lapsed_lock_until_a_reset_succeeds() -> None:
    manager, gpus, clock = _manager()
    manager.lock_clocks(0, 900.0, 900.0, 10.0)
    gpus[0].lost = True
    clock.advance(10.0)
    assert manager.enforce() == []
    assert _locked(gpus[0]) == (900.0, 900.0)  # the reset failed: retried
    gpus[0].lost = False
    manager.enforce()
    assert _locked(gpus[0]) is None


def test_the_lock_is_recorded_and_a_restart_resets_one_that_lapsed(tmp_path: Path) -> None:
    table = LeaseFile(tmp_path / "leases.json", boot="boot-a")
    manager, gpus, clock = _manager(lease_file=table)
    manager.on_start(OnStart.KEEP)
    manager.lock_clocks(0, 900.0, 1100.0, 30.0)
    manager.lock_clocks(1, 1200.0, 1500.0, 300.0)
    saved = json.loads((tmp_path / "leases.json").read_text())
    assert [(c["index"], c["min_mhz"], c["lease_s"]) for c in saved["clock_locks"]] == [
        (0, 900.0, 30.0),
        (1, 1200.0, 300.0),
    ]
    # The daemon dies; 60 s later another one starts on the same GPUs.
    clock.advance(60.0)
    again = LeaseManager(FakeBackend(gpus), clock, fallback_cap_w=400.0, lease_file=table)
    again.on_start(OnStart.KEEP)
    assert _locked(gpus[0]) is None  # lapsed while no daemon ran: reset at start
    assert _locked(gpus[1]) == (1200.0, 1500.0)  # still leased: carries on
    assert again.gpu(1)["clock_lock"]["lease_remaining_s"] == pytest.approx(240.0)
    saved = json.loads((tmp_path / "leases.json").read_text())
    assert [c["index"] for c in saved["clock_locks"]] == [1]
    clock.advance(240.0)
    again.enforce()
    assert _locked(gpus[1]) is None
    assert "clock_locks" not in json.loads((tmp_path / "leases.json").read_text())


def test_a_recorded_lock_for_another_gpu_is_not_resumed(tmp_path: Path) -> None:
    table = LeaseFile(tmp_path / "leases.json", boot="boot-a")
    manager, _gpus, clock = _manager(lease_file=table)
    manager.lock_clocks(0, 900.0, 1100.0, 300.0)
    others = [FakeGpu(10), FakeGpu(11)]  # other UUIDs at other indices
    again = LeaseManager(FakeBackend(others), clock, lease_file=table)
    again.on_start(OnStart.KEEP)
    assert [g["clock_lock"] for g in again.gpus()] == [None, None]


@pytest.mark.parametrize(
    ("mode", "locked"), [(OnExit.FALLBACK, None), (OnExit.KEEP, (900.0, 900.0))]
)
def test_on_exit_resets_our_locks_unless_kept(mode: OnExit, locked: object) -> None:
    manager, gpus, _clock = _manager()
    manager.lock_clocks(0, 900.0, 900.0, 60.0)
    manager.on_exit(mode)
    assert _locked(gpus[0]) == locked


def test_the_twins_clocks_follow_a_lock_through_the_sim_backend() -> None:
    twin = Twin(TwinSpec(nodes=1, gpus_per_node=2, seed=3))
    manager = LeaseManager(TwinNodeBackend(twin, 1), FakeClock(0.0), max_lease_s=600.0)
    lo, hi = manager.gpu(1)["sm_clock_range_mhz"]
    assert lo < hi
    manager.lock_clocks(1, lo, lo + 100.0, 5.0)
    assert twin.clock_lock_max_mhz[1] == lo + 100.0 and math.isnan(twin.clock_lock_max_mhz[0])
    with pytest.raises(CapRequestError) as exc:
        manager.lock_clocks(0, lo, hi + 1.0, 5.0)
    assert exc.value.status == 400
    manager.reset_clocks(1)
    assert math.isnan(twin.clock_lock_max_mhz[1])


@pytest.mark.integration
def test_the_clocks_endpoints_need_a_token_and_refuse_outside_the_range(tmp_path: Path) -> None:
    token = write_token(tmp_path / "token")
    gpus = [FakeGpu(0)]
    daemon = NodeDaemon(
        FakeBackend([gpus[0], NoClockGpu(1)]),  # type: ignore[list-item]
        NodeSettings(
            token_file=tmp_path / "token",
            socket_path=tmp_path / "node.sock",
            max_lease_s=600.0,
            check_interval_s=0.05,
        ),
    )
    body = {"min_mhz": 900.0, "max_mhz": 1200.0, "lease_s": 0.5}
    with daemon as d, unix_client(d.address) as anonymous, unix_client(d.address, token) as c:
        assert anonymous.put("/v1/gpus/0/clocks", json=body).status_code == 401
        assert anonymous.delete("/v1/gpus/0/clocks").status_code == 401
        assert _locked(gpus[0]) is None
        for bad in (
            {**body, "max_mhz": 5000.0},
            {**body, "min_mhz": 1300.0},
            {**body, "watts": 300},
            {"min_mhz": "900", "max_mhz": 1200.0, "lease_s": 1.0},
        ):
            answer = c.put("/v1/gpus/0/clocks", json=bad)
            assert answer.status_code == 400, bad
            assert answer.json()["ok"] is False
        assert c.put("/v1/gpus/1/clocks", json=body).status_code == 501
        assert _locked(gpus[0]) is None
        answer = c.put("/v1/gpus/0/clocks", json=body)
        assert answer.status_code == 200 and _locked(gpus[0]) == (900.0, 1200.0)
        listed = c.get("/v1/gpus").json()
        assert listed[0]["clock_lock"]["max_mhz"] == 1200.0 and listed[1]["clock_lock"] is None
        deadline = time.monotonic() + 5.0
        while _locked(gpus[0]) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _locked(gpus[0]) is None  # the 0.5 s lease lapsed: reset by the daemon
        assert c.put("/v1/gpus/0/clocks", json=body).status_code == 200
        assert c.delete("/v1/gpus/0/clocks").json()["gpu"]["clock_lock"] is None
        assert _locked(gpus[0]) is None
        assert 'kind="clock_expired"' in c.get("/metrics").text


@pytest.mark.integration
def test_a_restarted_daemon_resets_the_lock_whose_lease_lapsed_meanwhile(tmp_path: Path) -> None:
    """Two locks, the daemon dies leaving them (on_exit keep, as a SIGKILL would), another daemon
    starts after the shorter lease ran out: that lock is reset at once, the other one holds."""
    token = write_token(tmp_path / "token")
    gpus = [FakeGpu(0), FakeGpu(1)]

    def daemon() -> NodeDaemon:
        settings = NodeSettings(
            token_file=tmp_path / "token",
            socket_path=tmp_path / "node.sock",
            max_lease_s=600.0,
            check_interval_s=0.05,
            lease_file=tmp_path / "leases.json",
            on_exit=OnExit.KEEP,
        )
        return NodeDaemon(FakeBackend(gpus), settings)

    with daemon() as first, unix_client(first.address, token) as c:
        short = {"min_mhz": 900.0, "max_mhz": 900.0, "lease_s": 0.3}
        assert c.put("/v1/gpus/0/clocks", json=short).status_code == 200
        long = {"min_mhz": 1200.0, "max_mhz": 1500.0, "lease_s": 600.0}
        assert c.put("/v1/gpus/1/clocks", json=long).status_code == 200
    assert [_locked(g) for g in gpus] == [(900.0, 900.0), (1200.0, 1500.0)]
    time.sleep(0.5)  # no daemon runs while the 0.3 s lease lapses
    with daemon() as second, unix_client(second.address, token) as c:
        assert _locked(gpus[0]) is None  # reset when the second daemon started
        listed = c.get("/v1/gpus").json()
        assert listed[0]["clock_lock"] is None
        assert 590.0 < listed[1]["clock_lock"]["lease_remaining_s"] <= 600.0
    assert _locked(gpus[1]) == (1200.0, 1500.0)  # kept by on_exit keep

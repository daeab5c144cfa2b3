"""The lease manager on a FakeClock: validation, expiry to the fallback cap, release, exit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from agent.core.clock import FakeClock
from agent.node.leases import CapRequestError, CapState, LeaseManager, OnExit, OnStart
from tests.node_helpers import FakeBackend, FakeGpu, unix_node_daemon, write_token


def _manager(
    fallback_cap_w: float | None = 400.0, n: int = 2, max_lease_s: float = 600.0
) -> tuple[LeaseManager, list[FakeGpu], FakeClock]:
    gpus = [FakeGpu(i) for i in range(n)]
    clock = FakeClock(1000.0)
    manager = LeaseManager(
        FakeBackend(gpus), clock, fallback_cap_w=fallback_cap_w, max_lease_s=max_lease_s
    )
    return manager, gpus, clock


def test_set_cap_under_a_lease_counts_down() -> None:
    manager, gpus, clock = _manager()
    outcome = manager.set_cap(1, 450.0, 60.0)
    assert outcome.before_w == 700.0 and gpus[1].limit_w == 450.0
    assert outcome.gpu["state"] == "leased" and outcome.gpu["lease_remaining_s"] == 60.0
    clock.advance(20.0)
    gpu = manager.gpu(1)
    assert gpu["lease_remaining_s"] == pytest.approx(40.0)
    assert (gpu["min_w"], gpu["max_w"], gpu["default_w"]) == (200.0, 700.0, 700.0)
    assert gpu["power_limit_w"] == gpu["enforced_limit_w"] == 450.0
    assert manager.gpu(0)["lease_remaining_s"] is None
    assert manager.gpu(0)["state"] == "unmanaged"


@pytest.mark.parametrize(
    ("index", "watts", "lease_s", "status", "text"),
    [
        (0, 150.0, 60.0, 400, "[200, 700] W"),
        (0, 701.0, 60.0, 400, "[200, 700] W"),
        (0, math.nan, 60.0, 400, "constraints"),
        (0, math.inf, 60.0, 400, "constraints"),
        (0, 300.0, 0.0, 400, "lease_s"),
        (0, 300.0, -1.0, 400, "lease_s"),
        (0, 300.0, 601.0, 400, "lease_s"),
        (0, 300.0, math.nan, 400, "lease_s"),
        (7, 300.0, 60.0, 404, "no GPU with index 7"),
    ],
)
def test_refused_requests_change_nothing(
    index: int, watts: float, lease_s: float, status: int, text: str
) -> None:
    manager, gpus, _clock = _manager()
    with pytest.raises(CapRequestError) as exc:
        manager.set_cap(index, watts, lease_s)
    assert exc.value.status == status and text in exc.value.message
    assert [g.limit_w for g in gpus] == [700.0, 700.0] and not any(g.sets for g in gpus)
    assert manager.next_expiry_s() is None


def test_a_uuid_that_is_not_the_gpu_at_that_index_is_refused() -> None:
    manager, gpus, _clock = _manager()
    with pytest.raises(CapRequestError) as exc:
        manager.set_cap(0, 300.0, 60.0, uuid="GPU-fake-0001")
    assert exc.value.status == 409 and gpus[0].limit_w == 700.0
    manager.set_cap(0, 300.0, 60.0, uuid="GPU-fake-0000")
    assert gpus[0].limit_w == 300.0


def test_expired_lease_goes_to_fallback_never_to_max() -> None:
    manager, gpus, clock = _manager(fallback_cap_w=400.0)
    manager.set_cap(0, 250.0, 30.0)
    manager.set_cap(1, 650.0, 90.0)
    clock.advance(29.9)
    assert manager.enforce() == []
    clock.advance(0.1)
    assert manager.enforce() == [0]
    # Under the fallback already: left at 250 W (a fallback never raises a cap, issue 28).
    assert gpus[0].limit_w == 250.0
    assert manager.gpu(0)["state"] == "fallback" and manager.gpu(0)["lease_remaining_s"] is None
    assert gpus[1].limit_w == 650.0
    clock.advance(60.0)
    assert manager.enforce() == [1] and gpus[1].limit_w == 400.0
    assert manager.enforce() == []  # once


def test_renewal_extends_the_lease() -> None:
    manager, gpus, clock = _manager()
    manager.set_cap(0, 300.0, 30.0)
    for _ in range(5):
        clock.advance(20.0)
        manager.set_cap(0, 300.0, 30.0)
        assert manager.enforce() == []
    assert gpus[0].sets == [300.0]  # a renewal at the same cap does not write the GPU again
    clock.advance(30.0)
    assert manager.enforce() == [0]


@pytest.mark.parametrize(
    ("fallback", "expected"), [(None, 200.0), (50.0, 200.0), (5000.0, 700.0), (333.0, 333.0)]
)
def test_fallback_is_clipped_into_the_constraints(fallback: float | None, expected: float) -> None:
    manager, gpus, clock = _manager(fallback_cap_w=fallback)
    manager.set_cap(0, 700.0, 10.0)  # at the top: every clipped fallback is at or below it
    clock.advance(10.0)
    manager.enforce()
    assert gpus[0].limit_w == expected


def test_reading_enforces_expired_leases_too() -> None:
    manager, _gpus, clock = _manager()
    manager.set_cap(0, 600.0, 10.0)
    clock.advance(11.0)
    listed = manager.gpus()
    assert listed[0]["state"] == "fallback" and listed[0]["power_limit_w"] == 400.0


def test_release_goes_to_default_and_ends_the_lease() -> None:
    manager, gpus, clock = _manager()
    manager.set_cap(0, 300.0, 10.0)
    outcome = manager.release(0)
    assert outcome.before_w == 300.0 and gpus[0].limit_w == 700.0
    assert outcome.gpu["state"] == "default"
    clock.advance(100.0)
    assert manager.enforce() == [] and gpus[0].limit_w == 700.0


def test_a_lost_gpu_is_explicit_and_its_fallback_is_retried() -> None:
    manager, gpus, clock = _manager()
    manager.set_cap(0, 600.0, 10.0)
    gpus[0].lost = True
    listed = manager.gpus()
    assert listed[0]["power_limit_w"] is None and "GpuLostError" in listed[0]["error"]
    assert listed[1]["power_limit_w"] == 700.0
    with pytest.raises(CapRequestError) as exc:
        manager.set_cap(0, 350.0, 10.0)
    assert exc.value.status == 503
    clock.advance(20.0)
    assert manager.enforce() == []  # could not apply: still due
    gpus[0].lost = False
    assert manager.enforce() == [0] and gpus[0].limit_w == 400.0


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (OnExit.FALLBACK, [400.0, 700.0, 700.0]),
        (OnExit.DEFAULT, [700.0, 700.0, 700.0]),
        (OnExit.KEEP, [600.0, 700.0, 700.0]),
    ],
)
def test_on_exit(mode: OnExit, expected: list[float]) -> None:
    manager, gpus, _clock = _manager(n=3)
    manager.set_cap(0, 600.0, 60.0)
    manager.set_cap(1, 500.0, 60.0)
    manager.release(1)
    gpus[2].limit_w = 650.0  # set by someone else: never touched on exit
    expected = [*expected[:2], 650.0]
    manager.on_exit(mode)
    assert [g.limit_w for g in gpus] == expected


def test_on_start_fallback() -> None:
    manager, gpus, _clock = _manager()
    manager.on_start(OnStart.FALLBACK)
    assert [g.limit_w for g in gpus] == [400.0, 400.0]
    assert {g["state"] for g in manager.gpus()} == {str(CapState.FALLBACK)}


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match="fallback"):
        LeaseManager(FakeBackend([FakeGpu(0)]), FakeClock(), fallback_cap_w=-1.0)
    with pytest.raises(ValueError, match="same index"):
        LeaseManager(FakeBackend([FakeGpu(0), FakeGpu(0)]), FakeClock())


def test_a_lease_lasts_no_longer_than_granted_when_the_clock_steps_back() -> None:
    """A wall clock stepped back 9,000 s must not stretch a 60 s lease by as much: at the next
    check the lease is cut to its length from now, then falls back as usual."""
    manager, gpus, clock = _manager()
    manager.set_cap(0, 450.0, 60.0)
    clock.set(1000.0 - 9000.0)
    assert manager.gpu(0)["lease_remaining_s"] == pytest.approx(60.0)
    clock.advance(61.0)
    assert manager.enforce() == [0]
    assert gpus[0].limit_w == 400.0 and manager.gpu(0)["state"] == "fallback"


def test_the_node_daemon_times_leases_on_a_monotonic_clock(tmp_path: Path) -> None:
    from agent.core.clock import MonotonicClock

    write_token(tmp_path / "token")
    daemon = unix_node_daemon(tmp_path, [FakeGpu(0)])
    assert isinstance(daemon.manager.clock, MonotonicClock)

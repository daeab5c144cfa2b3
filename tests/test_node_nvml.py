"""The NVML backend against a hand-written fake of the pynvml module (injected, not patched)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from agent.core.clock import FakeClock
from agent.core.errors import (
    GpuError,
    GpuInvalidArgumentError,
    GpuLostError,
    GpuNoPermissionError,
    GpuNotSupportedError,
)
from agent.core.protocols import GpuBackend, GpuDevice, HealthReporter
from agent.node.leases import CapRequestError, LeaseManager
from agent.node.nvml import NvmlBackend


class FakeNvmlError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {
            2: "Invalid Argument",
            3: "Not Supported",
            4: "Insufficient Permissions",
            10: "Timeout",
            15: "GPU is lost",
            12: "NVML Shared Library Not Found",
        }.get(self.value, "Unknown")


class FakeNvml:
    """What pynvml exposes, in milliwatts, over a few fake H100s. `fail[name] = code` makes that
    call raise NVMLError(code). `raise_xid` queues an XID event as the driver would."""

    NVMLError = FakeNvmlError

    def __init__(self, gpus: int = 2, init_error: int | None = None) -> None:
        self.limits_mw = [700_000] * gpus
        self.fail: dict[str, int] = {}
        self.init_error = init_error
        self.initialised = False
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.events: list[SimpleNamespace] = []  # the event set's queue
        self.watched: dict[int, int] = {}  # handle -> event types registered
        self.event_sets_open = 0
        self.ecc_dbe = [0] * gpus
        self.remapped_rows = [(0, 0, 0, 0)] * gpus  # correctable, uncorrectable, pending, failed
        self.locked_mhz: list[tuple[int, int] | None] = [None] * gpus
        self.requested_masks = [[0] * 8 for _ in range(gpus)]

    def raise_xid(self, h: int, xid: int, event_type: int = 0x8) -> None:
        if self.watched.get(h, 0) & event_type:
            self.events.append(SimpleNamespace(device=h, eventType=event_type, eventData=xid))

    def _maybe_fail(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if name in self.fail:
            raise FakeNvmlError(self.fail[name])

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise FakeNvmlError(self.init_error)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.limits_mw)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> bytes:
        return f"GPU-nvml-{h}".encode()  # old pynvml answers bytes

    def nvmlDeviceGetName(self, h: int) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetPowerManagementLimitConstraints(self, h: int) -> tuple[int, int]:
        self._maybe_fail("constraints", h)
        return 200_000, 700_000

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h: int) -> int:
        return 700_000

    def nvmlDeviceGetPowerManagementLimit(self, h: int) -> int:
        self._maybe_fail("limit", h)
        return self.limits_mw[h]

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        return self.limits_mw[h]

    def nvmlDeviceSetPowerManagementLimit(self, h: int, mw: int) -> None:
        self._maybe_fail("set", h, mw)
        self.limits_mw[h] = mw

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return 312_500

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        assert sensor == 0
        return 61

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=97, memory=40)

    def nvmlDeviceGetClockInfo(self, h: int, clock: int) -> int:
        assert clock == 1
        return 1755

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        return 123_456_789

    # An H100 SXM's supported clocks: graphics 210-1980 MHz at its 2619 MHz memory clock (a
    # lower memory clock, as some GPUs list, allows fewer).
    def nvmlDeviceGetSupportedMemoryClocks(self, h: int) -> list[int]:
        self._maybe_fail("memory clocks", h)
        return [1593, 2619]

    def nvmlDeviceGetSupportedGraphicsClocks(self, h: int, memory_mhz: int) -> list[int]:
        self._maybe_fail("graphics clocks", h, memory_mhz)
        return list(range(1980, 209, -15)) if memory_mhz == 2619 else [1005, 990]

    def nvmlDeviceSetGpuLockedClocks(self, h: int, min_mhz: int, max_mhz: int) -> None:
        self._maybe_fail("lock clocks", h, min_mhz, max_mhz)
        self.locked_mhz[h] = (min_mhz, max_mhz)

    def nvmlDeviceResetGpuLockedClocks(self, h: int) -> None:
        self._maybe_fail("reset clocks", h)
        self.locked_mhz[h] = None

    # Workload power profiles: nvidia-ml-py's own structures, passed by reference as the C API
    # takes them; the GPU supports profiles 3, 5 and 33 (33: a bit in the mask's second word).
    # (N815: pynvml's own names)
    c_nvmlWorkloadPowerProfileProfilesInfo_v1_t = (  # noqa: N815
        pynvml.c_nvmlWorkloadPowerProfileProfilesInfo_v1_t
    )
    c_nvmlWorkloadPowerProfileRequestedProfiles_v1_t = (  # noqa: N815
        pynvml.c_nvmlWorkloadPowerProfileRequestedProfiles_v1_t
    )
    requested_masks: list[list[int]]

    def nvmlDeviceWorkloadPowerProfileGetProfilesInfo(self, h: int, info: Any) -> None:
        self._maybe_fail("profiles", h)
        mask = info._obj.perfProfilesMask.mask
        mask[0] = (1 << 3) | (1 << 5)
        mask[1] = 1 << 1

    def nvmlDeviceWorkloadPowerProfileSetRequestedProfiles(self, h: int, request: Any) -> None:
        self._maybe_fail("request profile", h)
        self.requested_masks[h] = [
            a | b
            for a, b in zip(
                self.requested_masks[h], request._obj.requestedProfilesMask.mask, strict=True
            )
        ]

    def nvmlDeviceWorkloadPowerProfileClearRequestedProfiles(self, h: int, request: Any) -> None:
        self._maybe_fail("clear profile", h)
        self.requested_masks[h] = [
            a & ~b
            for a, b in zip(
                self.requested_masks[h], request._obj.requestedProfilesMask.mask, strict=True
            )
        ]

    def nvmlEventSetCreate(self) -> str:
        self._maybe_fail("event set")
        self.event_sets_open += 1
        return "event-set"

    def nvmlEventSetFree(self, event_set: str) -> None:
        self.event_sets_open -= 1

    def nvmlDeviceRegisterEvents(self, h: int, event_types: int, event_set: str) -> None:
        self._maybe_fail("register", h)
        self.watched[h] = event_types

    def nvmlEventSetWait_v2(self, event_set: str, timeout_ms: int) -> SimpleNamespace:
        assert timeout_ms == 0  # the loop must never wait for an XID
        self._maybe_fail("wait")
        if not self.events:
            raise FakeNvmlError(10)
        return self.events.pop(0)

    def nvmlDeviceGetTotalEccErrors(self, h: int, error_type: int, counter_type: int) -> int:
        assert (error_type, counter_type) == (1, 0)  # uncorrected, volatile
        return self.ecc_dbe[h]

    def nvmlDeviceGetRemappedRows(self, h: int) -> tuple[int, int, int, int]:
        self._maybe_fail("remapped rows", h)
        return self.remapped_rows[h]

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: int) -> int:
        return 0x4  # the power cap holds the clocks


class OldFakeNvml(FakeNvml):
    """nvidia-ml-py before 12.535: clock event reasons only under their older name."""

    def __getattribute__(self, name: str) -> Any:
        if name == "nvmlDeviceGetCurrentClocksEventReasons":
            raise AttributeError(name)
        return super().__getattribute__(name)

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h: int) -> int:
        return 0x20


def test_units_and_identity() -> None:
    nvml = FakeNvml()
    backend = NvmlBackend(nvml)
    assert isinstance(backend, GpuBackend)
    gpu = backend.devices()[1]
    assert isinstance(gpu, GpuDevice)
    assert (gpu.index, gpu.uuid, gpu.model_name) == (1, "GPU-nvml-1", "NVIDIA H100 80GB HBM3")
    c = gpu.power_constraints()
    assert (c.min_w, c.max_w, c.default_w) == (200.0, 700.0, 700.0)
    assert gpu.power_usage_w() == 312.5
    assert gpu.total_energy_j() == pytest.approx(123_456.789)
    assert gpu.utilization_pct() == (97.0, 40.0)
    assert (gpu.temperature_c(), gpu.sm_clock_mhz()) == (61.0, 1755.0)
    gpu.set_power_limit_w(412.5)
    assert nvml.limits_mw[1] == 412_500  # watts to milliwatts
    assert gpu.power_limit_w() == gpu.enforced_power_limit_w() == 412.5
    backend.close()
    assert not nvml.initialised


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (2, GpuInvalidArgumentError),
        (3, GpuNotSupportedError),
        (4, GpuNoPermissionError),
        (13, GpuNotSupportedError),
        (15, GpuLostError),
        (16, GpuLostError),
        (28, GpuLostError),
        (999, GpuError),
    ],
)
def test_nvml_errors_map_to_domain_errors(code: int, kind: type[GpuError]) -> None:
    nvml = FakeNvml()
    gpu = NvmlBackend(nvml).devices()[0]
    nvml.fail["set"] = code
    with pytest.raises(kind) as exc:
        gpu.set_power_limit_w(300.0)
    assert type(exc.value) is kind
    assert "GPU 0 (GPU-nvml-0)" in str(exc.value) and f"NVML error {code}" in str(exc.value)
    assert isinstance(exc.value.__cause__, FakeNvmlError)


def test_out_of_range_is_refused_before_nvml_is_asked() -> None:
    nvml = FakeNvml()
    gpu = NvmlBackend(nvml).devices()[0]
    with pytest.raises(GpuInvalidArgumentError, match=r"\[200, 700\] W"):
        gpu.set_power_limit_w(150.0)
    assert not [c for c in nvml.calls if c[0] == "set"]


def test_init_failure_is_a_gpu_error_naming_nvml() -> None:
    with pytest.raises(GpuError, match="NVML could not initialise NVML"):
        NvmlBackend(FakeNvml(init_error=12))


def test_lease_manager_over_nvml_maps_errors_to_http_statuses() -> None:
    nvml = FakeNvml()
    manager = LeaseManager(NvmlBackend(nvml), FakeClock(), fallback_cap_w=350.0)
    manager.set_cap(0, 300.0, 10.0)
    assert nvml.limits_mw[0] == 300_000
    nvml.fail["set"] = 4
    with pytest.raises(CapRequestError) as exc:
        manager.set_cap(1, 300.0, 10.0)
    assert exc.value.status == 500 and "Insufficient Permissions" in exc.value.message
    nvml.fail = {"limit": 15}
    listed = manager.gpus()
    assert listed[0]["power_limit_w"] is None and "GpuLostError" in listed[0]["error"]


def test_xids_arrive_as_events_and_the_last_one_stays() -> None:
    nvml = FakeNvml(gpus=2)
    backend = NvmlBackend(nvml)
    gpu0, gpu1 = backend.devices()
    assert not nvml.watched and not nvml.event_sets_open  # nothing until XIDs are read
    assert (gpu0.last_xid(), gpu1.last_xid()) == (0, 0)  # none yet
    assert nvml.watched == {0: 0x8, 1: 0x8} and nvml.event_sets_open == 1  # every GPU, once
    nvml.raise_xid(1, 48)
    nvml.raise_xid(1, 63)
    nvml.raise_xid(0, 31, event_type=0x8 | 0x1)  # a mask that includes XIDs
    assert (gpu0.last_xid(), gpu1.last_xid()) == (31, 63)  # both drained, the last one kept
    assert gpu1.last_xid() == 63  # and kept, as DCGM's XID field holds it
    nvml.raise_xid(1, 79)  # fell off the bus: its readings fail until it is reset
    nvml.fail["limit"] = 15
    with pytest.raises(GpuLostError):
        gpu1.power_limit_w()
    assert gpu1.last_xid() == 79
    nvml.raise_xid(1, 79)  # again, and not drained before the reset
    del nvml.fail["limit"]
    assert gpu1.power_limit_w() == 700.0  # it answers again: it was reset
    assert (gpu0.last_xid(), gpu1.last_xid()) == (31, 0)  # which clears its XID, not others'
    assert not nvml.events
    backend.close()
    assert nvml.event_sets_open == 0 and not nvml.initialised


def test_xids_not_watched_are_not_supported_and_other_readings_go_on() -> None:
    nvml = FakeNvml(gpus=2)
    nvml.fail["register"] = 3  # the driver refuses (a virtualized GPU)
    gpu0, _gpu1 = NvmlBackend(nvml).devices()
    with pytest.raises(GpuNotSupportedError, match=r"GPU 0 .*watch XID events"):
        gpu0.last_xid()
    assert gpu0.power_usage_w() == 312.5
    nvml = FakeNvml(gpus=1)
    nvml.fail["event set"] = 4
    (gpu,) = NvmlBackend(nvml).devices()
    with pytest.raises(GpuNoPermissionError, match="event set"):
        gpu.last_xid()


def test_an_event_read_that_fails_is_a_gpu_error_not_a_zero() -> None:
    nvml = FakeNvml(gpus=1)
    (gpu,) = NvmlBackend(nvml).devices()
    nvml.fail["wait"] = 999
    with pytest.raises(GpuError, match="read XID events"):
        gpu.last_xid()


def test_health_counters_and_clock_event_reasons() -> None:
    nvml = FakeNvml(gpus=2)
    nvml.ecc_dbe[1] = 3
    nvml.remapped_rows[1] = (5, 2, 0, 1)
    gpu0, gpu1 = NvmlBackend(nvml).devices()
    assert isinstance(gpu1, HealthReporter)
    assert (gpu0.ecc_dbe_volatile(), gpu0.remapped_rows()) == (0, (0, False))
    assert (gpu1.ecc_dbe_volatile(), gpu1.remapped_rows()) == (3, (2, True))
    assert gpu1.clocks_event_reasons() == 0x4
    (old,) = NvmlBackend(OldFakeNvml(gpus=1)).devices()
    assert old.clocks_event_reasons() == 0x20
    nvml.fail["remapped rows"] = 3  # no row remapping before Ampere
    with pytest.raises(GpuNotSupportedError, match="remapped rows"):
        gpu0.remapped_rows()


def test_sm_clock_locks_in_mhz_validated_before_nvml_is_asked() -> None:
    nvml = FakeNvml()
    gpu = NvmlBackend(nvml).devices()[1]
    assert gpu.supported_sm_clock_range_mhz() == (210.0, 1980.0)
    gpu.lock_sm_clocks_mhz(1095.4, 1410.0)
    assert nvml.locked_mhz == [None, (1095, 1410)]
    with pytest.raises(GpuInvalidArgumentError, match=r"outside \[210, 1980\] MHz"):
        gpu.lock_sm_clocks_mhz(900.0, 2000.0)
    with pytest.raises(GpuInvalidArgumentError):
        gpu.lock_sm_clocks_mhz(1400.0, 1200.0)
    assert len([c for c in nvml.calls if c[0] == "lock clocks"]) == 1
    gpu.reset_sm_clocks()
    assert nvml.locked_mhz == [None, None]


def test_sm_clock_locks_the_gpu_or_the_library_lacks_are_not_supported() -> None:
    nvml = FakeNvml()
    manager = LeaseManager(NvmlBackend(nvml), FakeClock(), max_lease_s=600.0)
    nvml.fail["lock clocks"] = 3  # NVML_ERROR_NOT_SUPPORTED: a GPU without locked clocks
    with pytest.raises(CapRequestError) as exc:
        manager.lock_clocks(0, 900.0, 1200.0, 60.0)
    assert exc.value.status == 501 and "NVML could not lock the SM clocks" in exc.value.message
    assert manager.gpu(0)["clock_lock"] is None
    nvml.fail = {"lock clocks": 4}  # not root
    with pytest.raises(CapRequestError) as exc:
        manager.lock_clocks(0, 900.0, 1200.0, 60.0)
    assert exc.value.status == 500

    class OldNvml(FakeNvml):  # an nvidia-ml-py without the locked-clock calls
        def __getattribute__(self, name: str) -> Any:
            if name == "nvmlDeviceSetGpuLockedClocks":
                raise AttributeError(name)
            return super().__getattribute__(name)

    old = OldNvml()
    old_manager = LeaseManager(NvmlBackend(old), FakeClock(), max_lease_s=600.0)
    with pytest.raises(CapRequestError) as exc:
        old_manager.lock_clocks(0, 900.0, 1200.0, 60.0)
    assert exc.value.status == 501 and "no nvmlDeviceSetGpuLockedClocks" in exc.value.message


def test_workload_power_profiles_through_nvml_structures() -> None:
    nvml = FakeNvml()
    gpu = NvmlBackend(nvml).devices()[0]
    assert gpu.supported_power_profiles() == {3, 5, 33}
    gpu.request_power_profile(33)
    gpu.request_power_profile(3)
    assert nvml.requested_masks[0][:2] == [1 << 3, 1 << 1]
    gpu.clear_power_profile(33)
    assert nvml.requested_masks[0][:2] == [1 << 3, 0]
    manager = LeaseManager(NvmlBackend(nvml), FakeClock(), max_lease_s=600.0)
    assert manager.gpu(1)["power_profiles"] == ["balanced", "memory_bound", "profile_33"]
    nvml.fail["request profile"] = 3  # NVML_ERROR_NOT_SUPPORTED
    with pytest.raises(CapRequestError) as exc:
        manager.request_profile(1, "balanced", 60.0)
    assert exc.value.status == 501 and manager.gpu(1)["power_profile"] is None


def test_an_nvidia_ml_py_without_profiles_says_not_supported() -> None:
    class OldNvml(FakeNvml):
        def __getattribute__(self, name: str) -> Any:
            if "WorkloadPowerProfile" in name:
                raise AttributeError(name)
            return super().__getattribute__(name)

    manager = LeaseManager(NvmlBackend(OldNvml()), FakeClock(), max_lease_s=600.0)
    assert manager.gpu(0)["power_profiles"] is None
    with pytest.raises(CapRequestError) as exc:
        manager.request_profile(0, "balanced", 60.0)
    assert exc.value.status == 501 and "nvidia-ml-py" in exc.value.message

"""The NVML backend against a hand-written fake of the pynvml module (injected, not patched)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from agent.core.clock import FakeClock
from agent.core.errors import (
    GpuError,
    GpuInvalidArgumentError,
    GpuLostError,
    GpuNoPermissionError,
    GpuNotSupportedError,
)
from agent.core.protocols import GpuBackend, GpuDevice
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
            15: "GPU is lost",
            12: "NVML Shared Library Not Found",
        }.get(self.value, "Unknown")


class FakeNvml:
    """What pynvml exposes, in milliwatts, over a few fake H100s. `fail[name] = code` makes that
    call raise NVMLError(code)."""

    NVMLError = FakeNvmlError

    def __init__(self, gpus: int = 2, init_error: int | None = None) -> None:
        self.limits_mw = [700_000] * gpus
        self.fail: dict[str, int] = {}
        self.init_error = init_error
        self.initialised = False
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

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

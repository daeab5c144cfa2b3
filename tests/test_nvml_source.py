"""NvmlSource over the GpuDevice protocol: the twin's devices, and a hand-written fake backend
whose GPUs fail the way NVML does (lost, not supported, no permission)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest

from agent.core.errors import (
    GpuLostError,
    GpuNoPermissionError,
    GpuNotSupportedError,
    TelemetryError,
)
from agent.core.protocols import GpuBackend, PowerConstraints
from agent.core.snapshot import Metric
from agent.observe.nvml import NvmlSource
from agent.sim.devices import TwinNodeBackend
from agent.sim.faults import parse_fault
from agent.sim.twin import Twin, TwinSpec


class FakeGpu:
    """A GPU whose calls answer, or raise what the test says."""

    def __init__(self, index: int, failures: dict[str, Exception] | None = None) -> None:
        self._index = index
        self.failures = failures or {}

    def _call(self, name: str, value: float) -> float:
        if name in self.failures:
            raise self.failures[name]
        return value

    @property
    def index(self) -> int:
        return self._index

    @property
    def uuid(self) -> str:
        return f"GPU-fake-{self._index}"

    @property
    def model_name(self) -> str:
        return "NVIDIA H100 80GB HBM3"

    def power_constraints(self) -> PowerConstraints:
        self._call("power_constraints", 0)
        return PowerConstraints(200.0, 700.0, 700.0)

    def power_limit_w(self) -> float:
        return self._call("power_limit_w", 650.0)

    def enforced_power_limit_w(self) -> float:
        return self._call("enforced_power_limit_w", 640.0)

    def set_power_limit_w(self, watts: float) -> None:
        self._call("set_power_limit_w", watts)

    def power_usage_w(self) -> float:
        return self._call("power_usage_w", 300.0 + self._index)

    def temperature_c(self) -> float:
        return self._call("temperature_c", 55.0)

    def utilization_pct(self) -> tuple[float, float]:
        return self._call("utilization_pct", 90.0), 40.0

    def sm_clock_mhz(self) -> float:
        return self._call("sm_clock_mhz", 1800.0)

    def total_energy_j(self) -> float:
        return self._call("total_energy_j", 1234.5)


class FakeBackend:
    def __init__(self, devices: Sequence[FakeGpu]) -> None:
        self._devices = list(devices)
        self.fail: Exception | None = None

    def devices(self) -> Sequence[FakeGpu]:
        if self.fail is not None:
            raise self.fail
        return self._devices


def test_twin_devices() -> None:
    twin = Twin(TwinSpec(nodes=2, gpus_per_node=4, seed=3))
    backend = TwinNodeBackend(twin, 2)
    assert isinstance(backend, GpuBackend)
    snap = NvmlSource(backend, "node2").observe(100.0)
    assert snap.n_gpus == 4 and list(snap.node_names) == ["node2"]
    assert list(snap.uuid) == list(twin.uuid[4:8])
    np.testing.assert_array_equal(snap.column(Metric.POWER_W)[0], twin.power_w[4:8])
    np.testing.assert_array_equal(snap.column(Metric.MIN_LIMIT_W)[0], twin.min_w[4:8])
    np.testing.assert_array_equal(snap.column(Metric.XID)[0], 0.0)  # the twin reports XIDs
    assert not snap.stale.any() and not snap.errors and (snap.age_s == 0).all()


def test_a_gpu_that_fell_off_the_bus_is_stale_with_its_age() -> None:
    twin = Twin(TwinSpec(nodes=1, gpus_per_node=2, faults=(parse_fault("xid=79:node1/gpu1@5"),)))
    source = NvmlSource(TwinNodeBackend(twin, 1), "node1")
    assert not source.observe(0.0).stale.any()
    twin.run_until(10)
    snap = source.observe(10.0)
    assert list(snap.stale) == [False, True]
    assert snap.age_s[1] == 10.0  # since the last good reading
    assert all(math.isnan(snap.values[m][1]) for m in snap.values)
    assert any("node1/gpu1" in e and "GPU lost" in e for e in snap.errors)


def test_errors_are_missing_fields_never_zeros() -> None:
    backend = FakeBackend(
        [
            FakeGpu(0),
            FakeGpu(
                1,
                {
                    "enforced_power_limit_w": GpuNotSupportedError("not on this board"),
                    "power_constraints": GpuNoPermissionError("needs root"),
                },
            ),
            FakeGpu(2, {"power_usage_w": GpuLostError("fell off the bus")}),
        ]
    )
    snap = NvmlSource(backend, "n1").observe(50.0)
    power, power_ok = snap.column(Metric.POWER_W)
    assert list(power_ok) == [True, True, False] and power[1] == 301.0
    enforced, enforced_ok = snap.column(Metric.ENFORCED_LIMIT_W)
    assert list(enforced_ok) == [True, False, False] and math.isnan(enforced[1])
    assert not snap.column(Metric.MIN_LIMIT_W)[1][1]
    assert snap.column(Metric.POWER_LIMIT_W)[0][1] == 650.0  # other fields still read
    assert list(snap.stale) == [False, False, True]
    assert math.isnan(snap.age_s[2])  # never read successfully
    assert not snap.column(Metric.XID)[1].any()  # the fake has no XIDs: missing
    assert not snap.column(Metric.ECC_DBE_TOTAL)[1].any()  # nor health counters
    text = "\n".join(snap.errors)
    assert "n1/gpu1: not supported: enforced_limit_w" in text
    assert "n1/gpu1: no permission: min_limit_w, max_limit_w, default_limit_w" in text
    assert "n1/gpu2 (GPU-fake-2): GPU lost: fell off the bus" in text
    assert "n1/gpu0: not supported: xid, ecc_dbe_total, remapped_rows_uncorrectable, " in text


def test_a_backend_that_cannot_list_gpus_is_an_outage() -> None:
    backend = FakeBackend([])
    backend.fail = GpuNoPermissionError("NVML not initialised")
    with pytest.raises(TelemetryError, match="nvml on n1: cannot list GPUs"):
        NvmlSource(backend, "n1").observe(0.0)


def test_over_the_nvml_backend_and_a_fake_pynvml() -> None:
    """The whole node-local path: pynvml (a hand-written fake of the module, from the node
    daemon's tests) -> agent.node.nvml's backend -> NvmlSource."""
    from agent.node.nvml import NvmlBackend
    from tests.test_node_nvml import FakeNvml

    nvml = FakeNvml(gpus=2)
    source = NvmlSource(NvmlBackend(nvml), "node7")
    snap = source.observe(10.0)
    assert list(snap.uuid) == ["GPU-nvml-0", "GPU-nvml-1"] and not snap.stale.any()
    assert snap.column(Metric.POWER_W)[0][0] == 312.5  # milliwatts -> watts
    assert snap.column(Metric.MAX_LIMIT_W)[0][1] == 700.0
    assert snap.column(Metric.ENERGY_J)[0][0] == 123_456.789
    assert not snap.errors  # XIDs and the health counters are read too
    nvml.raise_xid(1, 48)
    nvml.ecc_dbe[1] = 2
    nvml.remapped_rows[1] = (0, 1, 0, 1)
    snap = source.observe(12.0)
    expected = {
        Metric.XID: [0.0, 48.0],
        Metric.ECC_DBE_TOTAL: [0.0, 2.0],
        Metric.REMAPPED_ROWS_UNCORRECTABLE: [0.0, 1.0],
        Metric.ROW_REMAP_FAILURE: [0.0, 1.0],
        Metric.CLOCKS_EVENT_REASONS: [4.0, 4.0],
    }
    assert {m: list(snap.column(m)[0]) for m in expected} == expected
    nvml.fail["limit"] = 15  # NVML_ERROR_GPU_IS_LOST
    snap = source.observe(25.0)
    assert list(snap.stale) == [True, True] and list(snap.age_s) == [13.0, 13.0]
    assert all("GPU lost" in e for e in snap.errors)

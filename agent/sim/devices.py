"""The twin's GPUs behind the GpuDevice protocol (what NVML gives on a real node), so the node
daemon's sim backend and the NVML source run against the twin exactly as against hardware."""

from __future__ import annotations

from collections.abc import Sequence

from agent.core.errors import GpuInvalidArgumentError, GpuLostError
from agent.core.protocols import PowerConstraints
from agent.sim.twin import Twin


class TwinGpu:
    """One twin GPU. A GPU that fell off the bus (XID 79) answers like NVML does: GPU lost."""

    def __init__(self, twin: Twin, row: int) -> None:
        self._twin = twin
        self._row = row

    def _check(self) -> None:
        if int(self._twin.xid[self._row]) == 79:
            raise GpuLostError(f"GPU {self.uuid} has fallen off the bus")

    @property
    def index(self) -> int:
        return int(self._twin.gpu_idx[self._row])

    @property
    def uuid(self) -> str:
        return str(self._twin.uuid[self._row])

    @property
    def model_name(self) -> str:
        return self._twin.spec.model.model_name

    def power_constraints(self) -> PowerConstraints:
        self._check()
        tw = self._twin
        return PowerConstraints(
            float(tw.min_w[self._row]), float(tw.max_w[self._row]), float(tw.default_w[self._row])
        )

    def power_limit_w(self) -> float:
        self._check()
        return float(self._twin.cap_w[self._row])

    def enforced_power_limit_w(self) -> float:
        self._check()
        return float(self._twin.enforced_w[self._row])

    def set_power_limit_w(self, watts: float) -> None:
        self._check()
        c = self.power_constraints()
        if not c.contains(watts):
            raise GpuInvalidArgumentError(f"{watts:g} W outside [{c.min_w:g}, {c.max_w:g}] W")
        self._twin.set_caps([self._row], [watts])

    def power_usage_w(self) -> float:
        self._check()
        return float(self._twin.power_w[self._row])

    def temperature_c(self) -> float:
        self._check()
        return float(self._twin.temp_c[self._row])

    def utilization_pct(self) -> tuple[float, float]:
        self._check()
        return float(self._twin.util_pct[self._row]), float(self._twin.mem_util_pct[self._row])

    def sm_clock_mhz(self) -> float:
        self._check()
        return float(self._twin.sm_clock_mhz[self._row])

    def total_energy_j(self) -> float:
        self._check()
        return float(self._twin.energy_j[self._row])

    def last_xid(self) -> int:
        """The last XID the GPU raised (0: none), as DCGM reports it."""
        return int(self._twin.xid[self._row])

    def ecc_dbe_volatile(self) -> int:
        self._check()
        return int(self._twin.ecc_dbe[self._row])

    def remapped_rows(self) -> tuple[int, bool]:
        self._check()
        row = self._row
        return int(self._twin.remapped_uncorrectable[row]), bool(self._twin.row_remap_failure[row])

    def clocks_event_reasons(self) -> int:
        self._check()
        return int(self._twin.clocks_event_reasons[self._row])

    def supported_sm_clock_range_mhz(self) -> tuple[float, float]:
        self._check()
        tw = self._twin
        return float(tw.min_clock_mhz[self._row]), float(tw.max_clock_mhz[self._row])

    def lock_sm_clocks_mhz(self, min_mhz: float, max_mhz: float) -> None:
        self._check()
        try:
            self._twin.lock_clocks([self._row], [min_mhz], [max_mhz])
        except ValueError as exc:
            raise GpuInvalidArgumentError(f"[{min_mhz:g}, {max_mhz:g}] MHz: {exc}") from exc

    def reset_sm_clocks(self) -> None:
        self._check()
        self._twin.reset_clocks([self._row])


class TwinNodeBackend:
    """The GPUs of one twin node (`node` is 1-based, as in `node2`)."""

    def __init__(self, twin: Twin, node: int) -> None:
        if not 1 <= node <= twin.spec.nodes:
            raise ValueError(f"the twin has nodes node1..node{twin.spec.nodes}, not node{node}")
        g = twin.spec.gpus_per_node
        self._devices = [TwinGpu(twin, (node - 1) * g + i) for i in range(g)]

    def devices(self) -> Sequence[TwinGpu]:
        return self._devices

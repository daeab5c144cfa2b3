"""The NVML backend: a node's GPUs through nvidia-ml-py (the `pynvml` module), in watts.

NVML speaks milliwatts and raises `NVMLError` with a numeric code; this module converts units at
the edge and maps every NVML error to the domain's GpuError family in one place (`_mapped`), as
zeus does. The module object is injected (`NvmlBackend(nvml=...)`): tests pass a hand-written fake
of pynvml, production passes nothing and gets the real one.

Setting a power limit needs root (or CAP_SYS_ADMIN); reading does not.

XIDs reach NVML as events, not as a value to read: at the first XID reading the backend registers
every GPU for critical XID events, and `last_xid()` drains what arrived since (never waiting) and
answers the last XID each GPU raised, 0 before any, as DCGM's XID field does. A GPU that was lost
(fell off the bus, needed a reset) and answers again was reset, which clears its XID back to 0, as
health expects; a reset between two readings that no reading saw is not noticed. XIDs raised before
the first reading are not seen. Where the driver refuses the registration (some virtualized GPUs),
the GPU reports XIDs as not supported.

Checked on a real H100 (driver 580.159.04, nvidia-ml-py 13.610): see docs/node-daemon.md.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from agent.core.errors import (
    GpuError,
    GpuInvalidArgumentError,
    GpuLostError,
    GpuNoPermissionError,
    GpuNotSupportedError,
)
from agent.core.protocols import PowerConstraints

# NVML error codes (nvml.h) and the domain error each maps to.
_NVML_ERROR_INVALID_ARGUMENT = 2
_NVML_ERROR_NOT_SUPPORTED = 3
_NVML_ERROR_NO_PERMISSION = 4
_NVML_ERROR_TIMEOUT = 10  # an event set with nothing in it
_NVML_ERROR_FUNCTION_NOT_FOUND = 13
_NVML_ERROR_GPU_IS_LOST = 15
_NVML_ERROR_RESET_REQUIRED = 16
_NVML_ERROR_GPU_NOT_FOUND = 28

_ERROR_MAP: dict[int, type[GpuError]] = {
    _NVML_ERROR_INVALID_ARGUMENT: GpuInvalidArgumentError,
    _NVML_ERROR_NOT_SUPPORTED: GpuNotSupportedError,
    _NVML_ERROR_FUNCTION_NOT_FOUND: GpuNotSupportedError,
    _NVML_ERROR_NO_PERMISSION: GpuNoPermissionError,
    _NVML_ERROR_GPU_IS_LOST: GpuLostError,
    _NVML_ERROR_RESET_REQUIRED: GpuLostError,
    _NVML_ERROR_GPU_NOT_FOUND: GpuLostError,
}

_NVML_TEMPERATURE_GPU = 0
_NVML_CLOCK_SM = 1
_NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
_NVML_VOLATILE_ECC = 0
_NVML_EVENT_TYPE_XID_CRITICAL_ERROR = 0x8  # nvmlEventTypeXidCriticalError
_MAX_EVENTS_PER_DRAIN = 10_000  # a storm of XIDs cannot hold a reading up for long


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _code(exc: BaseException) -> int:
    return int(getattr(exc, "value", -1))


def _domain_error(exc: BaseException, what: str, gpu: str = "") -> GpuError:
    """An NVML error as the domain's: the one place where that mapping lives."""
    code = _code(exc)
    kind = _ERROR_MAP.get(code, GpuError)
    where = f"{gpu}: " if gpu else ""
    return kind(f"{where}NVML could not {what}: {exc} (NVML error {code})")


class NvmlBackend:
    """The GPUs NVML sees on this node. `close()` shuts NVML down."""

    def __init__(self, nvml: Any = None) -> None:
        if nvml is None:
            import pynvml  # noqa: PLC0415  (only the NVML backend needs the library)

            nvml = pynvml
        self._nvml = nvml
        with self._mapped("initialise NVML"):
            nvml.nvmlInit()
        self._open = True
        self._events: Any = None  # NVML's event set for XIDs, once registered
        self._xid_problems: dict[str, GpuError] | None = None  # None: not registered yet
        self._last_xid: dict[str, int] = {}  # UUID -> the last XID it raised
        # The clock event reasons' call: "throttle" is the older name (nvidia-ml-py before
        # 12.535 has only it).
        self._reasons_fn = (
            "nvmlDeviceGetCurrentClocksEventReasons"
            if hasattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons")
            else "nvmlDeviceGetCurrentClocksThrottleReasons"
        )
        try:
            with self._mapped("count GPUs"):
                count = int(nvml.nvmlDeviceGetCount())
            self._devices = [NvmlGpu(self, i) for i in range(count)]
        except GpuError:
            self.close()
            raise

    def last_xid(self, gpu: NvmlGpu) -> int:
        """The last XID `gpu` raised (0: none). The first call registers every GPU for XID
        events, so the node daemon, which reads none, holds no event set."""
        problems = self._xid_problems
        if problems is None:
            problems = self._xid_problems = self._watch_xids()
        if gpu.uuid in problems:
            raise problems[gpu.uuid]
        self._drain_xids()
        return self._last_xid.get(gpu.uuid, 0)

    def _watch_xids(self) -> dict[str, GpuError]:
        """Register every GPU for critical XID events; why each GPU the driver refused is not
        watched (it reports XIDs as not supported)."""
        try:
            with self._mapped("create an event set for XIDs"):
                self._events = self._nvml.nvmlEventSetCreate()
        except GpuError as exc:
            return {gpu.uuid: exc for gpu in self._devices}
        problems: dict[str, GpuError] = {}
        for gpu in self._devices:
            try:
                with self._mapped("watch XID events", gpu.label):
                    self._nvml.nvmlDeviceRegisterEvents(
                        gpu._handle, _NVML_EVENT_TYPE_XID_CRITICAL_ERROR, self._events
                    )
            except GpuError as exc:
                problems[gpu.uuid] = exc
        return problems

    def was_reset(self, uuid: str) -> None:
        """The GPU was reset: its last XID goes back to 0, as DCGM's field does. The events
        raised before (the one that lost it, often) are drained first, so none outlives it."""
        self._drain_xids()
        self._last_xid.pop(uuid, None)

    def _drain_xids(self) -> None:
        """Take the XID events that arrived since the last drain, without waiting."""
        if self._events is None:
            return
        nvml = self._nvml
        for _ in range(_MAX_EVENTS_PER_DRAIN):
            try:
                event = nvml.nvmlEventSetWait_v2(self._events, 0)
            except nvml.NVMLError as exc:
                if _code(exc) == _NVML_ERROR_TIMEOUT:
                    break  # nothing more arrived
                raise _domain_error(exc, "read XID events") from exc
            if int(event.eventType) & _NVML_EVENT_TYPE_XID_CRITICAL_ERROR:
                with self._mapped("name the GPU of an XID event"):
                    uuid = _text(nvml.nvmlDeviceGetUUID(event.device))
                self._last_xid[uuid] = int(event.eventData)

    @contextmanager
    def _mapped(self, what: str, gpu: str = "") -> Iterator[None]:
        """NVML errors raised inside, as domain errors."""
        try:
            yield
        except self._nvml.NVMLError as exc:
            raise _domain_error(exc, what, gpu) from exc

    def devices(self) -> Sequence[NvmlGpu]:
        return self._devices

    def close(self) -> None:
        if self._open:
            self._open = False
            events, self._events = self._events, None
            try:
                if events is not None:
                    with self._mapped("free the XID event set"):
                        self._nvml.nvmlEventSetFree(events)
            finally:
                with self._mapped("shut down"):
                    self._nvml.nvmlShutdown()


class NvmlGpu:
    """One GPU through NVML. Identity (index, UUID, name) is read once at start."""

    def __init__(self, backend: NvmlBackend, index: int) -> None:
        self._backend = backend
        self._nvml = backend._nvml
        self._index = index
        self._lost = False  # the last call found the GPU lost
        with backend._mapped("open the GPU", f"GPU {index}"):
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
            self._uuid = _text(self._nvml.nvmlDeviceGetUUID(self._handle))
            self._name = _text(self._nvml.nvmlDeviceGetName(self._handle))

    @property
    def label(self) -> str:
        """How errors name this GPU."""
        return f"GPU {self._index} ({self._uuid})"

    def _call(self, what: str, fn: str, *args: Any) -> Any:
        if not hasattr(self._nvml, fn):  # an nvidia-ml-py older than the call
            raise GpuNotSupportedError(f"{self.label}: NVML could not {what}: no {fn} here")
        try:
            with self._backend._mapped(what, self.label):
                answer = getattr(self._nvml, fn)(self._handle, *args)
        except GpuLostError:
            self._lost = True
            raise
        if self._lost:  # it answers again: it was reset (or the driver reloaded)
            self._lost = False
            self._backend.was_reset(self._uuid)
        return answer

    @property
    def index(self) -> int:
        return self._index

    @property
    def uuid(self) -> str:
        return self._uuid

    @property
    def model_name(self) -> str:
        return self._name

    def power_constraints(self) -> PowerConstraints:
        min_mw, max_mw = self._call(
            "read the power limit constraints", "nvmlDeviceGetPowerManagementLimitConstraints"
        )
        default_mw = self._call(
            "read the default power limit", "nvmlDeviceGetPowerManagementDefaultLimit"
        )
        return PowerConstraints(min_mw / 1000.0, max_mw / 1000.0, default_mw / 1000.0)

    def power_limit_w(self) -> float:
        mw = self._call("read the power limit", "nvmlDeviceGetPowerManagementLimit")
        return float(mw) / 1000.0

    def enforced_power_limit_w(self) -> float:
        mw = self._call("read the enforced power limit", "nvmlDeviceGetEnforcedPowerLimit")
        return float(mw) / 1000.0

    def set_power_limit_w(self, watts: float) -> None:
        c = self.power_constraints()
        if not c.contains(watts):
            # NVML would say only "Invalid Argument": say what the bounds are.
            raise GpuInvalidArgumentError(
                f"{self.label}: {watts:g} W outside [{c.min_w:g}, {c.max_w:g}] W"
            )
        self._call(
            f"set the power limit to {watts:g} W",
            "nvmlDeviceSetPowerManagementLimit",
            round(watts * 1000.0),
        )

    def power_usage_w(self) -> float:
        return float(self._call("read the power draw", "nvmlDeviceGetPowerUsage")) / 1000.0

    def temperature_c(self) -> float:
        return float(
            self._call("read the temperature", "nvmlDeviceGetTemperature", _NVML_TEMPERATURE_GPU)
        )

    def utilization_pct(self) -> tuple[float, float]:
        rates = self._call("read the utilization", "nvmlDeviceGetUtilizationRates")
        return float(rates.gpu), float(rates.memory)

    def sm_clock_mhz(self) -> float:
        return float(self._call("read the SM clock", "nvmlDeviceGetClockInfo", _NVML_CLOCK_SM))

    def total_energy_j(self) -> float:
        mj = self._call("read the energy counter", "nvmlDeviceGetTotalEnergyConsumption")
        return float(mj) / 1000.0

    def last_xid(self) -> int:
        return self._backend.last_xid(self)

    def ecc_dbe_volatile(self) -> int:
        return int(
            self._call(
                "read the double-bit ECC errors",
                "nvmlDeviceGetTotalEccErrors",
                _NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                _NVML_VOLATILE_ECC,
            )
        )

    def remapped_rows(self) -> tuple[int, bool]:
        _correctable, uncorrectable, _pending, failed = self._call(
            "read the remapped rows", "nvmlDeviceGetRemappedRows"
        )
        return int(uncorrectable), bool(failed)

    def clocks_event_reasons(self) -> int:
        return int(self._call("read the clock event reasons", self._backend._reasons_fn))

    def supported_sm_clock_range_mhz(self) -> tuple[float, float]:
        """The graphics clocks the GPU supports at its highest memory clock (what
        `nvidia-smi -q -d SUPPORTED_CLOCKS` lists first)."""
        memory_mhz = self._call(
            "read the supported memory clocks", "nvmlDeviceGetSupportedMemoryClocks"
        )
        if not memory_mhz:
            raise GpuNotSupportedError(f"{self.label}: NVML lists no supported memory clocks")
        graphics_mhz = self._call(
            "read the supported graphics clocks",
            "nvmlDeviceGetSupportedGraphicsClocks",
            max(memory_mhz),
        )
        if not graphics_mhz:
            raise GpuNotSupportedError(f"{self.label}: NVML lists no supported graphics clocks")
        return float(min(graphics_mhz)), float(max(graphics_mhz))

    def lock_sm_clocks_mhz(self, min_mhz: float, max_mhz: float) -> None:
        lo, hi = self.supported_sm_clock_range_mhz()
        if not lo <= min_mhz <= max_mhz <= hi:
            # NVML would say only "Invalid Argument": say what the bounds are.
            raise GpuInvalidArgumentError(
                f"{self.label}: [{min_mhz:g}, {max_mhz:g}] MHz outside [{lo:g}, {hi:g}] MHz"
            )
        self._call(
            f"lock the SM clocks to [{min_mhz:g}, {max_mhz:g}] MHz",
            "nvmlDeviceSetGpuLockedClocks",
            round(min_mhz),
            round(max_mhz),
        )

    def reset_sm_clocks(self) -> None:
        self._call("reset the locked SM clocks", "nvmlDeviceResetGpuLockedClocks")

    def _struct(self, name: str) -> Any:
        """A fresh versioned NVML structure; not supported where nvidia-ml-py lacks it."""
        cls = getattr(self._nvml, name, None)
        if cls is None:
            raise GpuNotSupportedError(f"{self.label}: no {name} in this nvidia-ml-py")
        return cls()

    def supported_power_profiles(self) -> frozenset[int]:
        info = self._struct("c_nvmlWorkloadPowerProfileProfilesInfo_v1_t")
        self._call(
            "read the workload power profiles",
            "nvmlDeviceWorkloadPowerProfileGetProfilesInfo",
            ctypes.byref(info),
        )
        words = info.perfProfilesMask.mask
        return frozenset(
            32 * w + bit for w in range(len(words)) for bit in range(32) if words[w] >> bit & 1
        )

    def _requested(self, profile: int) -> Any:
        request = self._struct("c_nvmlWorkloadPowerProfileRequestedProfiles_v1_t")
        request.requestedProfilesMask.mask[profile // 32] = 1 << (profile % 32)
        return request

    def request_power_profile(self, profile: int) -> None:
        self._call(
            f"request workload power profile {profile}",
            "nvmlDeviceWorkloadPowerProfileSetRequestedProfiles",
            ctypes.byref(self._requested(profile)),
        )

    def clear_power_profile(self, profile: int) -> None:
        self._call(
            f"clear workload power profile {profile}",
            "nvmlDeviceWorkloadPowerProfileClearRequestedProfiles",
            ctypes.byref(self._requested(profile)),
        )

"""The protocols at the edges. Real parts (Prometheus, NVML, the node daemon, Slurm) and the twin
implement them; tests use hand-written fakes of the same shape."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from agent.core.intents import GpuTargets, Notify
from agent.core.jobs import JobRecord, JobTable
from agent.core.situation import NodeStates
from agent.core.snapshot import Snapshot

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


# -- telemetry ----------------------------------------------------------------------------------


@runtime_checkable
class TelemetrySource(Protocol):
    """Reads the fleet. Raises TelemetryError when it cannot (the loop turns that into an explicit
    outage: an empty Snapshot with the error, never zeros)."""

    def observe(self, now_s: float) -> Snapshot: ...


# -- one GPU (NVML, the node daemon's backends, the twin) ----------------------------------------


@dataclass(frozen=True, slots=True)
class PowerConstraints:
    min_w: float
    max_w: float
    default_w: float

    def contains(self, watts: float) -> bool:
        return self.min_w <= watts <= self.max_w


@runtime_checkable
class GpuDevice(Protocol):
    """One GPU, in watts and degrees. Errors are agent.core.errors.GpuError subclasses."""

    @property
    def index(self) -> int: ...

    @property
    def uuid(self) -> str: ...

    @property
    def model_name(self) -> str: ...

    def power_constraints(self) -> PowerConstraints: ...

    def power_limit_w(self) -> float: ...

    def enforced_power_limit_w(self) -> float: ...

    def set_power_limit_w(self, watts: float) -> None: ...

    def power_usage_w(self) -> float: ...

    def temperature_c(self) -> float: ...

    def utilization_pct(self) -> tuple[float, float]:
        """(GPU, memory) utilization in percent."""
        ...

    def sm_clock_mhz(self) -> float: ...

    def total_energy_j(self) -> float: ...


@runtime_checkable
class XidReporter(Protocol):
    """A GPU device that also knows the last XID error it raised (0: none), as DCGM reports."""

    def last_xid(self) -> int: ...


@runtime_checkable
class HealthReporter(Protocol):
    """A GPU device that also reads the health counters and the throttle mask DCGM exports."""

    def ecc_dbe_volatile(self) -> int:
        """Double-bit ECC errors since the driver loaded (DCGM_FI_DEV_ECC_DBE_VOL_TOTAL)."""
        ...

    def remapped_rows(self) -> tuple[int, bool]:
        """(rows remapped for uncorrectable errors, a remap failed), as DCGM's
        DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS and DCGM_FI_DEV_ROW_REMAP_FAILURE."""
        ...

    def clocks_event_reasons(self) -> int:
        """Why the clocks are held down: the NVML/DCGM bitmask (CLOCK_EVENT_* in snapshot)."""
        ...


@runtime_checkable
class ClockLocker(Protocol):
    """A GPU device whose SM clocks can be locked to a range (NVML's locked clocks). A device
    without these methods does not support the lever; one whose driver refuses raises
    GpuNotSupportedError."""

    def supported_sm_clock_range_mhz(self) -> tuple[float, float]:
        """(lowest, highest) SM clock the GPU supports, in MHz."""
        ...

    def lock_sm_clocks_mhz(self, min_mhz: float, max_mhz: float) -> None: ...

    def reset_sm_clocks(self) -> None:
        """Unlock the SM clocks (the driver's default boost behaviour)."""
        ...


@runtime_checkable
class PowerProfiler(Protocol):
    """A GPU device with NVML's workload power profiles (ids as nvml.h's NVML_POWER_PROFILE_*).
    A device without these methods does not support the lever."""

    def supported_power_profiles(self) -> frozenset[int]: ...

    def request_power_profile(self, profile: int) -> None: ...

    def clear_power_profile(self, profile: int) -> None:
        """Withdraw a request made with `request_power_profile` (back to the default)."""
        ...


@runtime_checkable
class GpuBackend(Protocol):
    """The GPUs of one node."""

    def devices(self) -> Sequence[GpuDevice]: ...


# -- actuators ------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CapResult:
    """Per target (aligned with the request): applied or not, and why not."""

    ok: BoolArray
    before_w: FloatArray  # the limit before the change (NaN if unknown)
    errors: Mapping[int, str] = field(default_factory=dict)  # target position -> error

    @staticmethod
    def all_ok(n: int, before_w: FloatArray | None = None) -> CapResult:
        return CapResult(
            np.ones(n, dtype=bool), np.full(n, np.nan) if before_w is None else before_w
        )


@runtime_checkable
class CapActuator(Protocol):
    """Applies GPU power caps. A cap is a lease: unless renewed within `lease_s` the node falls back
    to its configured safe cap."""

    def set_caps(self, targets: GpuTargets, watts: FloatArray, lease_s: float) -> CapResult: ...

    def release_caps(self, targets: GpuTargets) -> CapResult: ...


@runtime_checkable
class CapLeaseRenewer(Protocol):
    """A CapActuator whose caps are leases it renews: the loop calls `renew_leases` once per
    cycle (live caps only), so caps the agent set stay in force while the agent runs and fall
    back on the node when it stops. Returns the GPUs renewed and a result aligned with them."""

    def renew_leases(self, lease_s: float) -> tuple[GpuTargets, CapResult]: ...


@runtime_checkable
class CapLeaseAdopter(Protocol):
    """A CapLeaseRenewer told of caps of ours it does not know as set: found in force after a
    restart (agent.act.recovery) or after a call that failed. It renews them from its next
    renewal on."""

    def adopt_leases(self, targets: GpuTargets, watts: FloatArray) -> None: ...


@dataclass(frozen=True, eq=False)
class GpuLimits:
    """Per GPU, as the node daemons report them (watts; NaN where unknown): constraints, the
    current and enforced limits, and the lease left (NaN: no lease). `errors`: node -> why
    that node could not be read (its GPUs are absent, not zero)."""

    node: npt.NDArray[np.str_]
    gpu: npt.NDArray[np.int64]
    uuid: npt.NDArray[np.str_]
    min_w: FloatArray
    max_w: FloatArray
    default_w: FloatArray
    power_limit_w: FloatArray
    enforced_limit_w: FloatArray
    lease_remaining_s: FloatArray
    errors: Mapping[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.uuid.shape[0])


@runtime_checkable
class GpuLimitsSource(Protocol):
    """Reads GPU limits from the nodes (for telemetry setups whose exporter lacks them)."""

    def gpu_limits(self, node_names: Sequence[str]) -> GpuLimits: ...


@runtime_checkable
class PlacementActuator(Protocol):
    """Job placement (Slurm now; Kubernetes later behind the same interface). Methods raise
    ActuatorError on failure."""

    def node_states(self, node_names: Sequence[str]) -> NodeStates: ...

    def drain(self, node: str, reason: str) -> None: ...

    def resume(self, node: str) -> None: ...

    def set_weight(self, node: str, weight: int) -> None: ...

    def set_features(self, node: str, add: frozenset[str], remove: frozenset[str]) -> None: ...

    def requeue(self, job: str) -> None: ...


@runtime_checkable
class JobInventory(Protocol):
    """The placement system's jobs (Slurm jobs now; Kubernetes pods later): states, priority
    classes and the GPUs each running job holds. Raises ActuatorError when it cannot read them."""

    def jobs(self) -> JobTable: ...


@runtime_checkable
class JobAccounting(Protocol):
    """Who ran each job: user, account, partition, QoS (Slurm: `squeue` while a job runs,
    `sacct` once it ended). Jobs it does not know are left out of the answer; raises
    ActuatorError when it cannot read at all."""

    def job_records(self, job_ids: Sequence[str]) -> Mapping[str, JobRecord]: ...


@runtime_checkable
class AccountShares(Protocol):
    """The scheduler's share of the cluster per account (Slurm: the fairshare tree, `sshare`),
    normalized to sum to 1; empty where it keeps none. Raises ActuatorError when it cannot read."""

    def account_shares(self) -> Mapping[str, float]: ...


@runtime_checkable
class NodeLister(Protocol):
    """A placement system that can list every node it manages (so `ooda rollback` finds every
    node the agent drained, not only those its audit log names)."""

    def all_nodes(self) -> list[str]: ...


@runtime_checkable
class Notifier(Protocol):
    def notify(self, intent: Notify) -> None: ...


# -- state that survives restarts ---------------------------------------------------------------


@runtime_checkable
class Persistent(Protocol):
    """A part whose memory must survive a restart (ownership, cooldowns, leases, learned models):
    the daemon saves `to_dict()` (JSON-ready) atomically and hands it back to `load_dict`."""

    def to_dict(self) -> dict[str, Any]: ...

    def load_dict(self, data: Mapping[str, Any]) -> None: ...

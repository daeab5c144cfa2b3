"""Workload power profiles as leases over one node's GPUs: a profile requested through the API
holds for its lease unless renewed; when the lease runs out the request is cleared
(nvmlDeviceWorkloadPowerProfileClearRequestedProfiles: the GPU back to its default), a clear that
fails being retried at the next check. One requested profile per GPU: a new one clears the old.

Profiles are named as NVML names them (nvml.h's NVML_POWER_PROFILE_*, lower-cased without the
prefix: `llm_inference`, `memory_bound`, ...); a name NVML does not define, or one the GPU does
not list as supported, is refused (400); a GPU, driver or nvidia-ml-py without profiles answers
501. Only the LeaseManager (agent/node/leases.py) uses this class, under its lock; the requests are
written to the same lease table as the caps (`power_profiles`), so a restarted daemon clears one
whose lease lapsed while it was down.

Loops here run over one node's GPUs (at most a few dozen): this is not a fleet-wide hot path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from agent.core.errors import GpuError
from agent.core.protocols import GpuDevice, PowerProfiler
from agent.node.clock_leases import LeverRequestError
from agent.node.lease_file import ProfileRecord

log = structlog.get_logger("ooda.node")

# nvml.h's nvmlPowerProfileType_t (nvidia-ml-py 13.615's NVML_POWER_PROFILE_*).
PROFILE_IDS: Mapping[str, int] = {
    "max_p": 0,
    "max_q": 1,
    "compute": 2,
    "memory_bound": 3,
    "network": 4,
    "balanced": 5,
    "llm_inference": 6,
    "llm_training": 7,
    "rbm": 8,
    "dcpcie": 9,
    "hmma_sparse": 10,
    "hmma_dense": 11,
    "sync_balanced": 12,
    "hpc": 13,
    "mig": 14,
    "max_q_1": 15,
    "network_bound": 16,
    "high_throughput_inference": 17,
    "medium_throughput_inference": 18,
    "low_latency_inference": 19,
    "training": 20,
    "inference": 21,
    "max_q_2": 22,
    "max_q_3": 23,
    "low_priority_background": 24,
}
PROFILE_NAMES: Mapping[int, str] = {v: k for k, v in PROFILE_IDS.items()}


@dataclass(frozen=True, slots=True)
class ProfileRequest:
    profile: str
    expires_s: float
    lease_s: float


class ProfileLeases:
    """The requested workload power profile of each GPU, under a lease."""

    def __init__(self, devices: Mapping[int, GpuDevice]) -> None:
        self._devices = devices
        self._held: dict[int, ProfileRequest] = {}

    def _profiler(self, index: int) -> PowerProfiler:
        device = self._devices[index]
        if not isinstance(device, PowerProfiler):
            raise LeverRequestError(
                501, f"GPU {index}: workload power profiles are not supported here"
            )
        return device

    def supported(self, index: int) -> list[str]:
        ids = self._profiler(index).supported_power_profiles()
        return sorted(PROFILE_NAMES.get(i, f"profile_{i}") for i in ids)

    def request(self, index: int, profile: str, lease_s: float, now: float) -> bool:
        """Request (or renew) `profile` under a lease; True for a renewal. Refuses (400) a name
        NVML does not define or the GPU does not support, before anything changes."""
        profiler = self._profiler(index)
        wanted = PROFILE_IDS.get(profile)
        if wanted is None:
            raise LeverRequestError(
                400,
                f"GPU {index}: unknown profile {profile[:40]!r} (NVML's: {', '.join(PROFILE_IDS)})",
            )
        supported = profiler.supported_power_profiles()
        if wanted not in supported:
            names = ", ".join(PROFILE_NAMES.get(i, str(i)) for i in sorted(supported)) or "none"
            raise LeverRequestError(
                400, f"GPU {index} does not support profile {profile!r} (it supports: {names})"
            )
        held = self._held.get(index)
        if held is not None and held.profile != profile:
            profiler.clear_power_profile(PROFILE_IDS[held.profile])
        profiler.request_power_profile(wanted)  # on a renewal too: NVML is the truth
        self._held[index] = ProfileRequest(profile, now + lease_s, lease_s)
        return held is not None and held.profile == profile

    def clear(self, index: int) -> None:
        """Clear the profile this daemon requested on the GPU (none: nothing to do). A GpuError
        propagates and the lease stays."""
        profiler = self._profiler(index)
        held = self._held.get(index)
        if held is not None:
            profiler.clear_power_profile(PROFILE_IDS[held.profile])
            del self._held[index]

    def expire(self, now: float) -> list[int]:
        """Clear every request whose lease ran out (a lease further off than its length, the
        clock having gone back, is cut to its length from now first)."""
        done: list[int] = []
        for index, held in sorted(self._held.items()):
            if held.expires_s - now > held.lease_s:
                self._held[index] = ProfileRequest(held.profile, now + held.lease_s, held.lease_s)
            elif held.expires_s <= now:
                try:
                    self.clear(index)
                except GpuError as exc:
                    log.error("profile_clear_failed", gpu=index, error=str(exc))
                    continue
                log.warning("profile_lease_expired", gpu=index, profile=held.profile)
                done.append(index)
        return done

    def held(self) -> list[int]:
        return sorted(self._held)

    def next_expiry_s(self) -> float | None:
        return min((held.expires_s for held in self._held.values()), default=None)

    def describe(self, index: int, now: float) -> dict[str, Any]:
        """`power_profiles` (supported names; null where not supported or unreadable) and
        `power_profile` (null when this daemon requested none)."""
        out: dict[str, Any] = {"power_profiles": None, "power_profile": None}
        if isinstance(self._devices[index], PowerProfiler):
            # A GPU that cannot be read: the cap's own reading reports its error.
            with contextlib.suppress(GpuError):
                out["power_profiles"] = self.supported(index)
        held = self._held.get(index)
        if held is not None:
            out["power_profile"] = {
                "profile": held.profile,
                "lease_remaining_s": max(0.0, held.expires_s - now),
            }
        return out

    def records(self) -> list[ProfileRecord]:
        return [
            ProfileRecord(index, self._devices[index].uuid, h.profile, h.expires_s, h.lease_s)
            for index, h in sorted(self._held.items())
        ]

    def resume(self, records: Mapping[int, ProfileRecord], now: float) -> None:
        """The requests a previous daemon recorded, on the GPUs they name (one whose lease lapsed
        is cleared by the next `expire`)."""
        for index, record in records.items():
            device = self._devices.get(index)
            if device is None or device.uuid != record.uuid or record.profile not in PROFILE_IDS:
                continue
            expires_s = min(record.expires_s, now + record.lease_s)
            self._held[index] = ProfileRequest(record.profile, expires_s, record.lease_s)

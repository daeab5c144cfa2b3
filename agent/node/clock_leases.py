"""SM clock locks as leases over one node's GPUs: validation against the GPU's supported clocks,
and the reset when a lease lapses.

A lock set through the API holds for its lease unless renewed; when the lease runs out the GPU's
clocks are reset (nvmlDeviceResetGpuLockedClocks: the driver's own boost behaviour), so an agent
that dies cannot leave a GPU locked low (slow) or pinned high. A reset that fails is retried at
the next check. Only the LeaseManager (agent/node/leases.py) uses this class, under its lock; the
locks are written to the same lease table as the caps, so a restarted daemon resets a lock whose
lease lapsed while it was down and resumes one still running.

NVML cannot read a GPU's locked range back, so a lock with no record (set by hand with
`nvidia-smi -lgc`, or by a daemon whose table was lost) is not seen: it is left as found.

Loops here run over one node's GPUs (at most a few dozen): this is not a fleet-wide hot path.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from agent.core.errors import GpuError
from agent.core.protocols import ClockLocker, GpuDevice
from agent.node.lease_file import ClockLockRecord

log = structlog.get_logger("ooda.node")


class LeverRequestError(Exception):
    """A clock lock or power profile request the daemon refuses; `status` is the HTTP status it
    answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class ClockLock:
    """A running lock: the range, and its lease on the daemon's clock."""

    min_mhz: float
    max_mhz: float
    expires_s: float
    lease_s: float


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


class ClockLeases:
    """The SM clock locks of one node's GPUs, each under a lease (see the module docstring)."""

    def __init__(self, devices: Mapping[int, GpuDevice]) -> None:
        self._devices = devices
        self._locks: dict[int, ClockLock] = {}

    def _locker(self, index: int) -> ClockLocker:
        device = self._devices[index]
        if not isinstance(device, ClockLocker):
            raise LeverRequestError(501, f"GPU {index}: SM clock locks are not supported here")
        return device

    def supported_mhz(self, index: int) -> tuple[float, float]:
        """The GPU's supported SM clock range (GpuError where it cannot be read)."""
        return self._locker(index).supported_sm_clock_range_mhz()

    def lock(self, index: int, min_mhz: float, max_mhz: float, lease_s: float, now: float) -> bool:
        """Lock (or renew) under a lease; True for a renewal of the same range. Validates before
        touching the GPU: LeverRequestError (400) for a range the GPU does not support; a
        GpuError from the GPU itself propagates."""
        locker = self._locker(index)
        if not (_finite(min_mhz) and _finite(max_mhz)) or min_mhz > max_mhz:
            raise LeverRequestError(
                400, f"GPU {index}: min_mhz must be at most max_mhz (got {min_mhz}, {max_mhz})"
            )
        lo, hi = locker.supported_sm_clock_range_mhz()
        if not lo <= min_mhz <= max_mhz <= hi:
            raise LeverRequestError(
                400,
                f"GPU {index}: [{min_mhz:g}, {max_mhz:g}] MHz outside its supported SM clocks "
                f"[{lo:g}, {hi:g}] MHz",
            )
        held = self._locks.get(index)
        renew = held is not None and (held.min_mhz, held.max_mhz) == (min_mhz, max_mhz)
        # Applied on a renewal too: NVML cannot read a lock back, so a lock reset behind the
        # daemon's back (nvidia-smi -rgc, a GPU reset) is put back by the next renewal.
        locker.lock_sm_clocks_mhz(float(min_mhz), float(max_mhz))
        self._locks[index] = ClockLock(float(min_mhz), float(max_mhz), now + lease_s, lease_s)
        return renew

    def reset(self, index: int) -> None:
        """Unlock the GPU's clocks (also when this daemon holds no lock on it: a reset is always
        safe); the lease ends. A GpuError propagates and the lease stays."""
        self._locker(index).reset_sm_clocks()
        self._locks.pop(index, None)

    def lapsed(self, now: float) -> list[int]:
        """The GPUs whose lock's lease ran out (a lease whose expiry is further off than its
        length, the clock having gone back, is cut to its length from now first)."""
        for index, held in list(self._locks.items()):
            if held.expires_s - now > held.lease_s:
                self._locks[index] = ClockLock(
                    held.min_mhz, held.max_mhz, now + held.lease_s, held.lease_s
                )
        return sorted(i for i, held in self._locks.items() if held.expires_s <= now)

    def expire(self, now: float) -> list[int]:
        """Reset every lock whose lease ran out; returns the GPUs reset (a failure is logged and
        retried at the next check)."""
        done: list[int] = []
        for index in self.lapsed(now):
            try:
                self.reset(index)
            except GpuError as exc:
                log.error("clock_reset_failed", gpu=index, error=str(exc))
                continue
            log.warning("clock_lease_expired", gpu=index)
            done.append(index)
        return done

    def held(self) -> list[int]:
        return sorted(self._locks)

    def next_expiry_s(self) -> float | None:
        return min((held.expires_s for held in self._locks.values()), default=None)

    def describe(self, index: int, now: float) -> dict[str, Any]:
        """`sm_clock_range_mhz` (null where not supported or unreadable) and `clock_lock` (null
        when this daemon holds no lock on the GPU)."""
        out: dict[str, Any] = {"sm_clock_range_mhz": None, "clock_lock": None}
        device = self._devices[index]
        if isinstance(device, ClockLocker):
            # A GPU that cannot be read: the cap's own reading reports its error.
            with contextlib.suppress(GpuError):
                out["sm_clock_range_mhz"] = list(device.supported_sm_clock_range_mhz())
        held = self._locks.get(index)
        if held is not None:
            out["clock_lock"] = {
                "min_mhz": held.min_mhz,
                "max_mhz": held.max_mhz,
                "lease_remaining_s": max(0.0, held.expires_s - now),
            }
        return out

    def records(self) -> list[ClockLockRecord]:
        return [
            ClockLockRecord(
                index, self._devices[index].uuid, h.min_mhz, h.max_mhz, h.expires_s, h.lease_s
            )
            for index, h in sorted(self._locks.items())
        ]

    def resume(self, records: Mapping[int, ClockLockRecord], now: float) -> None:
        """The locks a previous daemon recorded, on the GPUs they name: each carries on, its
        lease running out when it would have (one already lapsed is reset at the next check)."""
        for index, record in records.items():
            device = self._devices.get(index)
            if device is None or device.uuid != record.uuid:
                continue
            expires_s = min(record.expires_s, now + record.lease_s)
            self._locks[index] = ClockLock(
                record.min_mhz, record.max_mhz, expires_s, record.lease_s
            )
            log.info("clock_lock_resumed", gpu=index, min_mhz=record.min_mhz)

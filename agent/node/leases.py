"""Caps as leases over one node's GPUs: validation, the fallback cap, and expiry.

A cap set through the API holds for `lease_s` seconds unless renewed; when a lease runs out the
GPU goes to the fallback cap (never back to its maximum), so an agent that dies or loses the node
cannot leave a GPU uncapped above what the budget allowed. Time comes from the injected Clock:
expiry is tested on a FakeClock by calling `enforce()` directly.

Going to the fallback never raises a GPU's limit: a lease at 250 W that lapses under a 400 W
fallback stays at 250 W (in state `fallback`). The fallback is a ceiling that a cap nobody renews
ends under, not a value to go back to; the same holds on exit and with `--on-start fallback`.

Across restarts (a daemon killed and started again by systemd): with a lease table
(agent/node/lease_file.py) each GPU the table describes, at the limit it says, carries on in its
state, a lease running out when it would have. Any other GPU found at a limit other than its
default (no table, an unreadable one, a crash between a change and its record, someone else's
cap) is treated as a lease about to lapse: it gets a lease of `adopt_lease_s`, which the agent
renews with its next cycle, or which runs out to the fallback. A GPU at its default limit is
`unmanaged`, as before.

SM clock locks (agent/node/clock_leases.py) and workload power profiles
(agent/node/profile_leases.py) are levers of their own, each under its own lease kept here beside
the cap's, in the same lease table: a lapsed lock is reset, a lapsed profile cleared.

Loops here run over one node's GPUs (at most a few dozen): this is not a fleet-wide hot path.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog

from agent.core.clock import Clock
from agent.core.errors import (
    GpuError,
    GpuInvalidArgumentError,
    GpuLostError,
    GpuNoPermissionError,
    GpuNotSupportedError,
)
from agent.core.protocols import GpuBackend, GpuDevice, PowerConstraints
from agent.node.clock_leases import ClockLeases, LeverRequestError
from agent.node.lease_file import LeaseFile, LeaseRecord, Levers, State
from agent.node.profile_leases import ProfileLeases

log = structlog.get_logger("ooda.node")


class CapState(StrEnum):
    UNMANAGED = "unmanaged"  # the daemon has not touched it since it started
    LEASED = "leased"  # a cap under a running lease
    FALLBACK = "fallback"  # a lease ran out: the fallback cap holds until a new lease
    DEFAULT = "default"  # released: back at the GPU's default limit


class OnExit(StrEnum):
    """What the daemon leaves on each GPU it managed when it stops."""

    FALLBACK = "fallback"  # leased GPUs go to the fallback cap (the safe default)
    DEFAULT = "default"  # every managed GPU goes back to its default limit
    KEEP = "keep"  # leave caps as they are (a restart in place)


class OnStart(StrEnum):
    KEEP = "keep"  # leave every GPU as found
    FALLBACK = "fallback"  # put every GPU at the fallback cap until the agent leases it


class CapRequestError(Exception):
    """A request the daemon refuses; `status` is the HTTP status it answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def gpu_error_status(exc: GpuError) -> int:
    """The HTTP status for a GPU error (one place for the mapping)."""
    if isinstance(exc, GpuInvalidArgumentError):
        return 400
    if isinstance(exc, GpuNotSupportedError):
        return 501
    if isinstance(exc, GpuLostError):
        return 503
    if isinstance(exc, GpuNoPermissionError):
        return 500
    return 500


@dataclass(frozen=True, slots=True)
class CapOutcome:
    """A cap applied: the GPU's limit before, and its state after."""

    index: int
    before_w: float
    gpu: dict[str, Any]


class LeaseEvents:
    """Hooks the daemon's metrics attach to (no-ops by default)."""

    def cap_changed(self, index: int, kind: str) -> None:
        """kind: set, renew, release, fallback, on_exit, on_start, adopt, resume; for SM clock
        locks clock_lock, clock_renew, clock_reset, clock_expired; for power profiles
        profile_set, profile_renew, profile_clear, profile_expired."""

    def lease_expired(self, index: int) -> None: ...

    def gpu_error(self, index: int, exc: GpuError) -> None: ...


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


# A recorded limit and the one read back agree within this (NVML counts milliwatts).
_SAME_W = 0.5
DEFAULT_ADOPT_LEASE_S = 60.0


class LeaseManager:
    """The caps of one node's GPUs, each a lease. Thread-safe: every backend call runs under
    `lock` (pass a shared lock when something else, such as the twin's stepper, writes the same
    GPUs)."""

    def __init__(
        self,
        backend: GpuBackend,
        clock: Clock,
        *,
        fallback_cap_w: float | None = None,
        max_lease_s: float = 3600.0,
        lock: threading.RLock | None = None,
        events: LeaseEvents | None = None,
        lease_file: LeaseFile | None = None,
        adopt_lease_s: float = DEFAULT_ADOPT_LEASE_S,
    ) -> None:
        if fallback_cap_w is not None and not (_finite(fallback_cap_w) and fallback_cap_w > 0):
            raise ValueError(
                f"fallback cap must be a positive number of watts, not {fallback_cap_w}"
            )
        if not (_finite(max_lease_s) and max_lease_s > 0):
            raise ValueError(f"max lease must be a positive number of seconds, not {max_lease_s}")
        if not (_finite(adopt_lease_s) and adopt_lease_s > 0):
            raise ValueError(f"adopt lease must be a positive number of seconds: {adopt_lease_s}")
        self.clock = clock
        self.lease_file = lease_file
        self.adopt_lease_s = float(adopt_lease_s)
        self.fallback_cap_w = fallback_cap_w
        self.max_lease_s = float(max_lease_s)
        self.lock = lock or threading.RLock()
        self.events = events or LeaseEvents()
        devices: Sequence[GpuDevice] = backend.devices()
        self._devices: dict[int, GpuDevice] = {d.index: d for d in devices}
        if len(self._devices) != len(devices):
            raise ValueError("the backend lists two GPUs with the same index")
        self._state: dict[int, CapState] = dict.fromkeys(self._devices, CapState.UNMANAGED)
        self._expires_s: dict[int, float] = {}
        self._lease_s: dict[int, float] = {}  # each running lease's length as granted
        self._left_w: dict[int, float] = {}  # the limit the daemon left each managed GPU at
        self._batch = 0  # inside `batch()`: the lease table is written once, at its end
        self._dirty = False
        self.clocks = ClockLeases(self._devices)  # SM clock locks, each its own lease
        self.profiles = ProfileLeases(self._devices)  # workload power profiles, likewise

    @property
    def indices(self) -> list[int]:
        return sorted(self._devices)

    def _device(self, index: int) -> GpuDevice:
        device = self._devices.get(index)
        if device is None:
            known = ", ".join(str(i) for i in self.indices) or "none"
            raise CapRequestError(404, f"no GPU with index {index} on this node (GPUs: {known})")
        return device

    def fallback_for(self, constraints: PowerConstraints) -> float:
        """The fallback cap clipped into the GPU's constraints (its minimum when none is set)."""
        if self.fallback_cap_w is None:
            return constraints.min_w
        return min(max(self.fallback_cap_w, constraints.min_w), constraints.max_w)

    # -- reading --------------------------------------------------------------------------------

    def _describe(self, index: int, now_s: float) -> dict[str, Any]:
        device = self._devices[index]
        state = self._state[index]
        out: dict[str, Any] = {
            "index": index,
            "uuid": device.uuid,
            "model": None,
            "min_w": None,
            "max_w": None,
            "default_w": None,
            "power_limit_w": None,
            "enforced_limit_w": None,
            "lease_remaining_s": None,
            "state": str(state),
        }
        if state is CapState.LEASED:
            out["lease_remaining_s"] = max(0.0, self._expires_s[index] - now_s)
        try:
            out["model"] = device.model_name
            c = device.power_constraints()
            out |= {"min_w": c.min_w, "max_w": c.max_w, "default_w": c.default_w}
            out["power_limit_w"] = device.power_limit_w()
            out["enforced_limit_w"] = device.enforced_power_limit_w()
        except GpuError as exc:
            self.events.gpu_error(index, exc)
            out["error"] = f"{type(exc).__name__}: {exc}"
        return out | self.clocks.describe(index, now_s) | self.profiles.describe(index, now_s)

    def gpus(self) -> list[dict[str, Any]]:
        """Every GPU with its constraints, limits and lease; a GPU that cannot be read carries
        `error` and nulls (never zeros)."""
        with self.lock:
            self._enforce_locked()
            now = self.clock.now()
            return [self._describe(i, now) for i in self.indices]

    def gpu(self, index: int) -> dict[str, Any]:
        with self.lock:
            self._device(index)
            self._enforce_locked()
            return self._describe(index, self.clock.now())

    # -- changing -------------------------------------------------------------------------------

    def set_cap(
        self, index: int, watts: float, lease_s: float, uuid: str | None = None
    ) -> CapOutcome:
        """Set or renew a cap under a lease. Validates everything before touching the GPU;
        raises CapRequestError (with the HTTP status) and changes nothing when refused."""
        with self.lock:
            device = self._device(index)
            self._check_uuid(index, device, uuid)
            self._check_lease(lease_s)
            try:
                c = device.power_constraints()
                if not _finite(watts) or not c.contains(watts):
                    raise CapRequestError(
                        400,
                        f"watts must be within GPU {index}'s constraints "
                        f"[{c.min_w:g}, {c.max_w:g}] W (got {watts})",
                    )
                before = device.power_limit_w()
                renew = self._state[index] is CapState.LEASED and before == watts
                if before != watts:
                    device.set_power_limit_w(float(watts))
            except GpuError as exc:
                self.events.gpu_error(index, exc)
                raise CapRequestError(gpu_error_status(exc), f"GPU {index}: {exc}") from exc
            now = self.clock.now()
            self._state[index] = CapState.LEASED
            self._expires_s[index] = now + float(lease_s)
            self._lease_s[index] = float(lease_s)
            self._left_w[index] = float(watts)
            self._changed()
            self.events.cap_changed(index, "renew" if renew else "set")
            return CapOutcome(index, before, self._describe(index, now))

    def _check_uuid(self, index: int, device: GpuDevice, uuid: str | None) -> None:
        if uuid is not None and uuid != device.uuid:
            raise CapRequestError(
                409, f"GPU {index} is {device.uuid}, not {uuid} (the node's GPUs changed?)"
            )

    def release(self, index: int, uuid: str | None = None) -> CapOutcome:
        """Back to the GPU's default limit; the lease ends."""
        with self.lock:
            device = self._device(index)
            self._check_uuid(index, device, uuid)
            try:
                c = device.power_constraints()
                before = device.power_limit_w()
                if before != c.default_w:
                    device.set_power_limit_w(c.default_w)
            except GpuError as exc:
                self.events.gpu_error(index, exc)
                raise CapRequestError(gpu_error_status(exc), f"GPU {index}: {exc}") from exc
            self._state[index] = CapState.DEFAULT
            self._expires_s.pop(index, None)
            self._lease_s.pop(index, None)
            self._left_w[index] = c.default_w
            self._changed()
            self.events.cap_changed(index, "release")
            return CapOutcome(index, before, self._describe(index, self.clock.now()))

    def lock_clocks(
        self, index: int, min_mhz: float, max_mhz: float, lease_s: float, uuid: str | None = None
    ) -> dict[str, Any]:
        """Lock or renew a GPU's SM clocks under a lease; the GPU as described after. Refused
        (CapRequestError) with nothing changed for a range outside the GPU's supported clocks,
        min above max, a lease out of bounds, or a GPU without the lever (501)."""
        return self._lever_lease(
            index,
            uuid,
            lease_s,
            ("clock_lock", "clock_renew"),
            lambda now: self.clocks.lock(index, min_mhz, max_mhz, float(lease_s), now),
        )

    def reset_clocks(self, index: int, uuid: str | None = None) -> dict[str, Any]:
        """Unlock a GPU's SM clocks; its clock lease ends."""
        return self._lever_end(index, uuid, "clock_reset", lambda: self.clocks.reset(index))

    def request_profile(
        self, index: int, profile: str, lease_s: float, uuid: str | None = None
    ) -> dict[str, Any]:
        """Request or renew a workload power profile under a lease; the GPU as described after.
        Refused (CapRequestError) with nothing changed for a profile NVML does not define or the
        GPU does not support, a lease out of bounds, or a GPU without the lever (501)."""
        return self._lever_lease(
            index,
            uuid,
            lease_s,
            ("profile_set", "profile_renew"),
            lambda now: self.profiles.request(index, profile, float(lease_s), now),
        )

    def clear_profile(self, index: int, uuid: str | None = None) -> dict[str, Any]:
        """Withdraw the profile this daemon requested on a GPU; its profile lease ends."""
        return self._lever_end(index, uuid, "profile_clear", lambda: self.profiles.clear(index))

    def _lever_lease(
        self,
        index: int,
        uuid: str | None,
        lease_s: float,
        kinds: tuple[str, str],
        apply: Callable[[float], bool],
    ) -> dict[str, Any]:
        """A lever set or renewed under a lease (`apply(now)`: whether it was a renewal), with
        the cap's checks first; `kinds`: the change's name when set and when renewed."""
        with self.lock:
            self._check_uuid(index, self._device(index), uuid)
            self._check_lease(lease_s)
            now = self.clock.now()
            with self._lever_errors(index):
                renewed = apply(now)
            self._changed()
            self.events.cap_changed(index, kinds[1] if renewed else kinds[0])
            return self._describe(index, now)

    def _lever_end(
        self, index: int, uuid: str | None, kind: str, end: Callable[[], object]
    ) -> dict[str, Any]:
        """A lever's lease ended by request (`end`), with the cap's checks first."""
        with self.lock:
            self._check_uuid(index, self._device(index), uuid)
            with self._lever_errors(index):
                end()
            self._changed()
            self.events.cap_changed(index, kind)
            return self._describe(index, self.clock.now())

    @contextlib.contextmanager
    def _lever_errors(self, index: int) -> Iterator[None]:
        """A lever's refusal or the GPU's error, as the CapRequestError the API answers."""
        try:
            yield
        except LeverRequestError as exc:
            raise CapRequestError(exc.status, exc.message) from exc
        except GpuError as exc:
            self.events.gpu_error(index, exc)
            raise CapRequestError(gpu_error_status(exc), f"GPU {index}: {exc}") from exc

    def _check_lease(self, lease_s: float) -> None:
        if not _finite(lease_s) or not 0 < lease_s <= self.max_lease_s:
            raise CapRequestError(
                400, f"lease_s must be in (0, {self.max_lease_s:g}] seconds (got {lease_s})"
            )

    def _to_fallback(self, index: int, kind: str) -> bool:
        """The GPU under the fallback cap: lowered to it when above, left alone when below
        (a fallback never raises a limit)."""
        device = self._devices[index]
        try:
            ceiling = self.fallback_for(device.power_constraints())
            limit = device.power_limit_w()
            if limit > ceiling:
                device.set_power_limit_w(ceiling)
                limit = ceiling
        except GpuError as exc:
            # The lease stays expired and is retried on the next check.
            self.events.gpu_error(index, exc)
            log.error("fallback_failed", gpu=index, error=str(exc), error_type=type(exc).__name__)
            return False
        self._state[index] = CapState.FALLBACK
        self._expires_s.pop(index, None)
        self._lease_s.pop(index, None)
        self._left_w[index] = limit
        self._changed()
        self.events.cap_changed(index, kind)
        return True

    def _enforce_locked(self) -> list[int]:
        with self.batch():
            return self._expire()

    def _expire(self) -> list[int]:
        now = self.clock.now()
        for index, expires_s in self._expires_s.items():
            # The clock went back (a wall clock stepped by NTP): no lease outlasts its length
            # from now, or an agent gone for good would hold the GPU until the clock caught up.
            if expires_s - now > self._lease_s[index]:
                self._expires_s[index] = now + self._lease_s[index]
                log.warning("lease_clock_went_back", gpu=index, ahead_s=expires_s - now)
        for index in self.clocks.expire(now):
            self._changed()
            self.events.cap_changed(index, "clock_expired")
        for index in self.profiles.expire(now):
            self._changed()
            self.events.cap_changed(index, "profile_expired")
        expired = [i for i, t in self._expires_s.items() if t <= now]
        done: list[int] = []
        for index in sorted(expired):
            if self._to_fallback(index, "fallback"):
                self.events.lease_expired(index)
                log.warning("lease_expired", gpu=index, fallback_cap_w=self._fallback_log(index))
                done.append(index)
        return done

    def _fallback_log(self, index: int) -> float | None:
        try:
            return self.fallback_for(self._devices[index].power_constraints())
        except GpuError:
            return None

    def enforce(self) -> list[int]:
        """Put every GPU whose lease ran out at the fallback cap; returns their indices. The
        daemon calls this from a background task; it also runs before every read."""
        with self.lock:
            return self._enforce_locked()

    def next_expiry_s(self) -> float | None:
        with self.lock:
            caps = min(self._expires_s.values(), default=None)
            levers = (caps, self.clocks.next_expiry_s(), self.profiles.next_expiry_s())
            return min((t for t in levers if t is not None), default=None)

    def on_start(self, mode: OnStart) -> None:
        """Take over the GPUs as a previous daemon left them (`reconcile`), then, with
        `--on-start fallback`, put every GPU under the fallback cap."""
        with self.lock, self.batch():
            self.reconcile()
            if mode is OnStart.FALLBACK:
                for index in self.indices:
                    self._to_fallback(index, "on_start")

    def reconcile(self) -> None:
        """Each GPU's state from the lease table where it matches the GPU, else from the GPU's
        limit: at its default, unmanaged; anything else, a lease about to lapse."""
        table = Levers()
        if self.lease_file is not None:
            table, problem = self.lease_file.load_all()
            if problem is not None:
                log.error("lease_file_not_used", problem=problem)
        records = table.caps
        with self.lock, self.batch():
            now = self.clock.now()
            # Locks carry on; one whose lease lapsed while no daemon ran is reset now.
            self.clocks.resume(table.clock_locks, now)
            self.clocks.expire(now)
            self.profiles.resume(table.power_profiles, now)
            self.profiles.expire(now)
            for index, device in self._devices.items():
                record = records.get(index)
                if record is not None and record.uuid != device.uuid:
                    record = None
                self._take_over(index, device, record, now)
            self._changed()

    def _take_over(
        self, index: int, device: GpuDevice, record: LeaseRecord | None, now: float
    ) -> None:
        try:
            limit = device.power_limit_w()
            default_w = device.power_constraints().default_w
        except GpuError as exc:
            self.events.gpu_error(index, exc)
            limit, default_w = math.nan, math.nan
        if (
            record is not None
            and record.state == "leased"
            and (record.lease_s is None or record.expires_s is None)
        ):
            record = None  # a lease without its times explains nothing
        if record is not None and abs(record.watts - limit) <= _SAME_W:
            state = CapState(record.state)
            self._state[index] = state
            self._left_w[index] = limit
            if record.lease_s is not None and record.expires_s is not None:
                self._lease_s[index] = record.lease_s
                # The clock went back meanwhile? No lease outlasts its length from now.
                self._expires_s[index] = min(record.expires_s, now + record.lease_s)
            log.info("lease_resumed", gpu=index, state=str(state), watts=limit)
            self.events.cap_changed(index, "resume")
            return
        if limit == default_w:
            self._state[index] = CapState.UNMANAGED
            return
        # Capped (or unreadable) with no record that explains it: a lease about to lapse, which
        # the agent renews with its next cycle, or which ends under the fallback.
        self._state[index] = CapState.LEASED
        self._lease_s[index] = self.adopt_lease_s
        self._expires_s[index] = now + self.adopt_lease_s
        self._left_w[index] = limit
        log.warning("cap_adopted", gpu=index, watts=limit, lease_s=self.adopt_lease_s)
        self.events.cap_changed(index, "adopt")

    # -- the lease table ------------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Changes inside are written to the lease table once, at the end (a bulk request)."""
        with self.lock:
            self._batch += 1
            try:
                yield
            finally:
                self._batch -= 1
                if not self._batch and self._dirty:
                    self._save()

    def _changed(self) -> None:
        self._dirty = True
        if not self._batch:
            self._save()

    def _save(self) -> None:
        self._dirty = False
        if self.lease_file is None:
            return
        records = [self._record(index) for index in self.indices]
        try:
            self.lease_file.save(
                [r for r in records if r is not None],
                self.clocks.records(),
                self.profiles.records(),
            )
        except OSError as exc:
            # The daemon goes on from memory; a restart before the next good write reconciles
            # from the GPUs (their caps become leases about to lapse).
            log.error("lease_file_write_failed", path=str(self.lease_file.path), error=str(exc))

    def _record(self, index: int) -> LeaseRecord | None:
        state = self._state[index]
        watts = self._left_w.get(index)
        if state is CapState.UNMANAGED or watts is None or not math.isfinite(watts):
            return None
        uuid = self._devices[index].uuid
        if state is CapState.LEASED:
            return LeaseRecord(
                index, uuid, "leased", watts, self._expires_s[index], self._lease_s[index]
            )
        kind: State = "fallback" if state is CapState.FALLBACK else "default"
        return LeaseRecord(index, uuid, kind, watts)

    def on_exit(self, mode: OnExit) -> None:
        """Leave each GPU as the configuration says (best effort: errors are logged)."""
        with self.lock, self.batch():
            if mode is OnExit.KEEP:
                return
            for index in self.clocks.held():  # a lock never outlives the daemon that leased it
                try:
                    self.reset_clocks(index)
                except CapRequestError as exc:
                    log.error("clock_reset_on_exit_failed", gpu=index, error=exc.message)
            for index in self.profiles.held():
                try:
                    self.clear_profile(index)
                except CapRequestError as exc:
                    log.error("profile_clear_on_exit_failed", gpu=index, error=exc.message)
            for index in self.indices:
                state = self._state[index]
                if mode is OnExit.FALLBACK and state is CapState.LEASED:
                    self._to_fallback(index, "on_exit")
                elif mode is OnExit.DEFAULT and state is not CapState.UNMANAGED:
                    try:
                        self.release(index)
                    except CapRequestError as exc:
                        log.error("release_on_exit_failed", gpu=index, error=exc.message)

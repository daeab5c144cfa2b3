"""Time, injected: every component that waits or compares times takes a Clock."""

from __future__ import annotations

import math
import time
from typing import Protocol, runtime_checkable


def as_time_s(value: object) -> float | None:
    """`value` as seconds when it is a finite number (a boolean is not one), else None: for
    times read back from saved JSON, where anything may stand."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


@runtime_checkable
class Clock(Protocol):
    """Wall time in seconds (Unix epoch for the real clock, twin seconds for the twin's)."""

    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class MonotonicClock(SystemClock):
    """The real clock's seconds that only move forward (never stepped by NTP): for durations
    such as leases, which must not last longer because the wall clock went back. Not a time of
    day."""

    def now(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that only moves when told to: cooldowns, leases and schedules tested without
    sleeping."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._now_s = float(start_s)

    def now(self) -> float:
        return self._now_s

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a fake clock only moves forward (asked to move {seconds} s)")
        self._now_s += seconds

    def set(self, now_s: float) -> None:
        """Jump to an absolute time (also backwards: clock-jump tests need that)."""
        self._now_s = float(now_s)


class FollowingClock:
    """Another clock's time, moved to start at `origin_s` and run `speed` times as fast: a
    recorded trace's time while the agent runs against it (`ooda run` over a trace follows the
    wall clock from the trace's first step)."""

    def __init__(self, wall: Clock, origin_s: float, speed: float = 1.0) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be positive (got {speed!r})")
        self.wall = wall
        self.origin_s = origin_s
        self.speed = speed
        self._wall_origin_s = wall.now()

    def now(self) -> float:
        return self.origin_s + (self.wall.now() - self._wall_origin_s) * self.speed

    def sleep(self, seconds: float) -> None:
        self.wall.sleep(seconds / self.speed)

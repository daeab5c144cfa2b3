"""The twin in step with wall time, for a long-running host (`ooda run`).

`ooda demo` runs the twin on a virtual clock, as fast as it can. A daemon runs on wall time: before
each cycle the pacer advances the twin by the wall time elapsed since it last did, times
`speed` (1: real time). With `speed` 0 the twin stays virtual and moves one control interval per
cycle. The twin's own seconds remain the agent's clock (TwinClock), so its fault and budget
schedules keep their meaning.
"""

from __future__ import annotations

from agent.core.clock import Clock
from agent.sim.twin import Twin


class TwinPacer:
    def __init__(
        self,
        twin: Twin,
        wall: Clock,
        speed: float,
        interval_s: float,
        max_catchup_s: float = 300.0,
    ) -> None:
        """`max_catchup_s`: the most twin time one `sync` steps through; after a longer pause
        (a suspended process) the twin skips the rest rather than stalling the cycle."""
        if speed < 0:
            raise ValueError(f"speed must be >= 0 (got {speed})")
        self.twin = twin
        self.wall = wall
        self.speed = speed
        self.interval_s = interval_s
        self.max_catchup_s = max_catchup_s
        self.skipped_s = 0.0  # twin time given up after long pauses
        self._anchor()

    def _anchor(self) -> None:
        self._wall0_s = self.wall.now()
        self._twin0_s = self.twin.t_s

    def set_speed(self, speed: float, interval_s: float) -> None:
        """A reload may change both; time already run stays run."""
        self.speed, self.interval_s = speed, interval_s
        self._anchor()

    def sync(self) -> float:
        """Advance the twin to where wall time says it should be; returns twin seconds run."""
        twin = self.twin
        start_s = twin.t_s
        if self.speed == 0:
            target_s = start_s + self.interval_s
        else:
            target_s = self._twin0_s + (self.wall.now() - self._wall0_s) * self.speed
        behind_s = target_s - start_s
        if behind_s > self.max_catchup_s:
            self.skipped_s += behind_s - self.max_catchup_s
            target_s = start_s + self.max_catchup_s
        if target_s > start_s:
            twin.run_until(target_s)
        if self.speed != 0 and behind_s > self.max_catchup_s:
            self._anchor()  # from here on, wall time and twin time move together again
        twin.drop_step_log()
        return twin.t_s - start_s

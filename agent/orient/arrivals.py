"""How much power can new work add before the next cycle? Learned from what the fleet has done.

Each cycle this tracker sees which GPUs turned busy since the last one and how much power they
added (jobs start with loading and initialization, so a new job rarely reaches its full draw
within one interval). The reserve the budget keeps for arrivals is the largest such rise seen in
the recent window, times a safety factor; until enough cycles have been seen it is None, and the
budget policy assumes the worst (every idle GPU jumping to its cap). Columnar and O(GPUs) per
cycle; the history is a fixed-length ring of per-cycle totals.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from agent.core.keyed import KeyedColumns

FloatArray = npt.NDArray[np.float64]


class ArrivalTracker:
    def __init__(self, window_cycles: int = 480, min_cycles: int = 40, safety: float = 1.5) -> None:
        self.window_cycles = window_cycles
        self.min_cycles = min_cycles
        self.safety = safety
        self.state = KeyedColumns({"busy": (np.bool_, False), "power": (np.float64, np.nan)})
        self._rises = np.zeros(window_cycles)
        self._seen = 0

    def update(
        self,
        uuid: npt.NDArray[np.str_],
        busy: npt.NDArray[np.bool_],
        fresh: npt.NDArray[np.bool_],
        power_w: FloatArray,
    ) -> float | None:
        """Record this cycle; return the reserve (W) for arrivals until the next one, or None."""
        if uuid.size == 0:
            return None
        slot = self.state.slots(uuid)
        was_busy = self.state["busy"][slot]
        before = self.state["power"][slot]
        turned = fresh & busy & ~was_busy & np.isfinite(before)
        rise = float(np.clip(power_w[turned] - before[turned], 0.0, None).sum())
        self._rises[self._seen % self.window_cycles] = rise
        self._seen += 1
        seen = fresh & np.isfinite(power_w)
        self.state["busy"][slot[seen]] = busy[seen]
        self.state["power"][slot[seen]] = power_w[seen]
        if self._seen < self.min_cycles:
            return None
        return float(self._rises[: min(self._seen, self.window_cycles)].max()) * self.safety

    def to_dict(self) -> dict[str, object]:
        return {"state": self.state.to_dict(), "rises": self._rises.tolist(), "seen": self._seen}

    def load_dict(self, data: dict[str, object]) -> None:
        state = data.get("state")
        if isinstance(state, dict):
            self.state.load_dict(state)
        rises = np.asarray(data.get("rises", []), dtype=np.float64)
        if rises.shape == self._rises.shape:
            self._rises = rises
        seen = data.get("seen", 0)
        self._seen = int(seen) if isinstance(seen, int | float) else 0

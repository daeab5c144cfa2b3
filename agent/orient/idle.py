"""How long each GPU has been idle (columnar, keyed by UUID): policies act on idleness that lasts,
not on the gap between two jobs."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from agent.core.keyed import KeyedColumns

FloatArray = npt.NDArray[np.float64]


class IdleTracker:
    def __init__(self) -> None:
        self.state = KeyedColumns({"idle_since": (np.float64, np.nan)})

    def update(
        self,
        uuid: npt.NDArray[np.str_],
        busy: npt.NDArray[np.bool_],
        fresh: npt.NDArray[np.bool_],
        now_s: float,
    ) -> FloatArray:
        """Seconds idle per GPU (0 when busy; NaN when it cannot be seen)."""
        if uuid.size == 0:
            return np.zeros(0)
        slot = self.state.slots(uuid)
        since = self.state["idle_since"]
        idle = fresh & ~busy
        since[slot[fresh & busy]] = np.nan
        newly = idle & np.isnan(since[slot])
        since[slot[newly]] = now_s
        out = np.where(idle, now_s - since[slot], 0.0)
        return np.where(fresh, out, np.nan)

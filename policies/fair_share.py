"""Weighted max-min fairness: splitting a power budget over accounts by their shares.

Each account has a demand (what its GPUs would draw uncapped), a floor (what they draw at their
lowest caps) and a weight (its share). The budget is split so that every account gets
`clip(lambda * weight, floor, demand)` for one `lambda`: an account that asks for less than its
share gets all it asks (it is capped last: not at all), the share it leaves flows to the others
in proportion to their weights, and no account is cut below its floor. An account with weight 0
gets its floor until every weighted account has its demand, then what is left. Pure numpy over
accounts (tens to hundreds of them), no I/O.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

ITERATIONS = 100
# Weight 0 as a vanishing weight: such accounts get more than their floor only once lambda has
# grown past every weighted account's demand.
VANISHING = 1e-9


def weighted_max_min(
    budget_w: float, demand_w: npt.ArrayLike, floor_w: npt.ArrayLike, weight: npt.ArrayLike
) -> FloatArray:
    """Per account, its part of `budget_w` (sums to the budget, to within a watt, when the
    budget lies between the floors' and the demands' sums)."""
    demand = np.asarray(demand_w, dtype=np.float64)
    floor = np.minimum(np.asarray(floor_w, dtype=np.float64), demand)
    if demand.size == 0 or float(demand.sum()) <= budget_w:
        return demand.copy()
    if float(floor.sum()) >= budget_w:
        return floor.copy()
    raw = np.maximum(np.asarray(weight, dtype=np.float64), 0.0)
    top = float(raw.max()) if raw.size and raw.max() > 0 else 1.0
    w = np.where(raw > 0, raw, VANISHING * top)
    lo, hi = 0.0, float((demand / w).max())
    for _ in range(ITERATIONS):
        mid = 0.5 * (lo + hi)
        if float(np.clip(mid * w, floor, demand).sum()) > budget_w:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * max(hi, 1.0):
            break
    return np.asarray(np.clip(lo * w, floor, demand), dtype=np.float64)

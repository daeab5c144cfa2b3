"""The power-curve family shared by the twin, the learned models and the policies.

A GPU running a job draws `natural_w` when uncapped. Under a binding cap `c` it draws, on average,
`cap_draw_frac * c` (power management keeps a margin under the limit). Its throughput, relative to
uncapped, depends on the fraction of its natural draw it gets, x = power / natural_w:

    T(x) = 1 - a * (1 - x) ** b      for x < 1,   T = 1 for x >= 1,   clipped to [0, 1].

With b >= 1 the curve is concave in power, so the throughput-optimal split of a power budget is the
one that equalizes marginal throughput per watt (water-filling), solved here by bisection on the
Lagrange multiplier, vectorized over every GPU at once.

The family fits the measured Zeus power-limit sweeps (see agent/sim/calibration.py) to within a few
percent of throughput on most workloads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

ALLOCATION_TOLERANCE_W = 0.5  # the split is done once it uses the budget to within this
MIN_EXPONENT = 1.05  # keeps the family strictly concave (and the allocator's inverse finite)
# The most cap-sensitive curve measured (Zeus squad/bert, agent/sim/calibration.py): a cap chosen
# by it loses at most its bound on any job that is no more sensitive.
CONSERVATIVE_A = 1.13
CONSERVATIVE_B = 1.65
LOWEST_CAP_DRAW_FRAC = 0.88  # under a cap a GPU draws at least this share of it (Zeus: >= 0.9)


def _as_f64(value: npt.ArrayLike) -> FloatArray:
    return np.asarray(value, dtype=np.float64)


def slowdown_cap_draw_frac(
    cap_draw_frac: npt.ArrayLike, fallback: npt.ArrayLike = LOWEST_CAP_DRAW_FRAC
) -> FloatArray:
    """Per GPU, the share of its cap to assume when a cap must keep a bound on slowdown: the
    learned share where there is one, else `fallback` (LOWEST_CAP_DRAW_FRAC).

    Where no share is learned, orient hands out 1.0 (a capped GPU draws its whole cap: the safe
    end for a power budget). For a slowdown bound that is the unsafe end: a cap aimed at a draw
    of x would give the GPU only k * x, and the job slows down more than the bound. A share of 1
    or more, or 0.5 or less, is read as not learned (a real GPU draws 0.9-0.95 of a binding cap):
    assuming the lowest share can only raise the cap, which keeps the bound."""
    k = _as_f64(cap_draw_frac)
    with np.errstate(invalid="ignore"):
        learned = np.isfinite(k) & (k > 0.5) & (k < 1.0)
    return np.asarray(np.where(learned, k, fallback), dtype=np.float64)


def known_natural_w(natural_w: npt.ArrayLike, max_cap_w: npt.ArrayLike) -> FloatArray:
    """Per GPU, its natural draw, or where that is unknown (NaN) the most it may draw (its max
    cap): a NaN would make every sum over the fleet NaN, and a budget split end at "no cap"."""
    natural = _as_f64(natural_w)
    return np.asarray(np.where(np.isfinite(natural), natural, max_cap_w), dtype=np.float64)


def throughput_at_power(
    power_w: npt.ArrayLike, natural_w: npt.ArrayLike, a: npt.ArrayLike, b: npt.ArrayLike
) -> FloatArray:
    """Relative throughput (0..1) of a job that gets `power_w` of its `natural_w`."""
    natural = _as_f64(natural_w)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.clip(_as_f64(power_w) / natural, 0.0, 1.0)
    loss = _as_f64(a) * (1.0 - x) ** _as_f64(b)
    return np.asarray(np.clip(1.0 - loss, 0.0, 1.0), dtype=np.float64)


def power_at_cap(
    cap_w: npt.ArrayLike, natural_w: npt.ArrayLike, cap_draw_frac: npt.ArrayLike
) -> FloatArray:
    """Average draw of a busy GPU under a cap: its natural draw, or just under the cap."""
    return np.asarray(
        np.minimum(_as_f64(natural_w), _as_f64(cap_draw_frac) * _as_f64(cap_w)), dtype=np.float64
    )


def throughput_at_cap(
    cap_w: npt.ArrayLike,
    natural_w: npt.ArrayLike,
    a: npt.ArrayLike,
    b: npt.ArrayLike,
    cap_draw_frac: npt.ArrayLike,
) -> FloatArray:
    return throughput_at_power(power_at_cap(cap_w, natural_w, cap_draw_frac), natural_w, a, b)


def power_for_throughput(
    throughput: npt.ArrayLike, natural_w: npt.ArrayLike, a: npt.ArrayLike, b: npt.ArrayLike
) -> FloatArray:
    """The least power that keeps relative throughput at `throughput` (the inverse of T)."""
    loss = np.clip(1.0 - _as_f64(throughput), 0.0, 1.0)
    a_arr = _as_f64(a)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac_lost = np.where(a_arr > 0, (loss / a_arr) ** (1.0 / _as_f64(b)), 1.0)
    x = 1.0 - np.clip(frac_lost, 0.0, 1.0)
    return np.asarray(x * _as_f64(natural_w), dtype=np.float64)


@dataclass(frozen=True, slots=True)
class Allocation:
    """Result of splitting a power budget over busy GPUs."""

    power_w: FloatArray  # planned average draw per GPU
    cap_w: FloatArray  # the cap that yields that draw (max_cap_w where no cap is needed)
    binding: npt.NDArray[np.bool_]  # True where the cap is below the GPU's natural draw
    feasible: bool  # False when even every GPU at its minimum cap exceeds the budget
    marginal_per_w: float  # the equalized marginal (weighted) throughput per watt


def allocate_power(
    budget_w: float,
    natural_w: npt.ArrayLike,
    a: npt.ArrayLike,
    b: npt.ArrayLike,
    cap_draw_frac: npt.ArrayLike,
    min_cap_w: npt.ArrayLike,
    max_cap_w: npt.ArrayLike,
    weight: npt.ArrayLike | None = None,
    iterations: int = 60,
) -> Allocation:
    """Split `budget_w` over busy GPUs to maximize sum(weight * T), each cap within its bounds.

    All arguments are arrays over the same GPUs (or scalars); the cap bounds must be finite. A
    GPU whose natural draw is unknown (NaN) counts as drawing all its maximum cap allows, and is
    capped like the rest. Vectorized: cost is O(iterations * n) numpy work, no Python loop over
    GPUs.
    """
    natural = _as_f64(natural_w)
    n = natural.shape[0] if natural.ndim else 1
    natural = np.broadcast_to(natural, (n,)).astype(np.float64)
    a_arr = np.broadcast_to(_as_f64(a), (n,))
    b_arr = np.maximum(np.broadcast_to(_as_f64(b), (n,)), MIN_EXPONENT)
    k = np.broadcast_to(_as_f64(cap_draw_frac), (n,))
    lo_cap = np.broadcast_to(_as_f64(min_cap_w), (n,))
    hi_cap = np.broadcast_to(_as_f64(max_cap_w), (n,))
    w = np.ones(n) if weight is None else np.broadcast_to(_as_f64(weight), (n,))
    natural = known_natural_w(natural, hi_cap)

    # The natural draw can exceed what the maximum cap allows.
    p_hi = np.minimum(natural, k * hi_cap)
    p_lo = np.minimum(p_hi, k * lo_cap)
    if n == 0:
        empty = np.zeros(0)
        return Allocation(empty, empty, np.zeros(0, dtype=bool), True, 0.0)

    def caps_for(power: FloatArray) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
        binding = power < natural - 1e-9
        cap = np.where(binding, np.clip(power / k, lo_cap, hi_cap), hi_cap)
        return cap, binding

    if float(p_hi.sum()) <= budget_w:
        cap, binding = caps_for(p_hi)
        return Allocation(p_hi.copy(), cap, binding, True, 0.0)
    if float(p_lo.sum()) > budget_w:
        cap, binding = caps_for(p_lo)
        return Allocation(p_lo.copy(), cap, binding, False, float("inf"))

    # dT/dp = w * a * b * (1 - p/natural)^(b-1) / natural, decreasing in p.
    def power_at_multiplier(lam: float) -> FloatArray:
        scale = w * a_arr * b_arr / natural
        with np.errstate(divide="ignore", invalid="ignore"):
            frac_lost = np.where(scale > 0, (lam / scale) ** (1.0 / (b_arr - 1.0)), 1.0)
        p = natural * (1.0 - np.clip(frac_lost, 0.0, 1.0))
        return np.clip(p, p_lo, p_hi)

    with np.errstate(divide="ignore", invalid="ignore"):
        slope_at_lo = w * a_arr * b_arr / natural * (1.0 - p_lo / natural) ** (b_arr - 1.0)
    lam_lo, lam_hi = 0.0, float(np.nanmax(slope_at_lo)) * 1.001 + 1e-12
    for _ in range(iterations):
        lam = 0.5 * (lam_lo + lam_hi)
        total = float(power_at_multiplier(lam).sum())
        if total > budget_w:
            lam_lo = lam
        else:
            lam_hi = lam
            if budget_w - total < ALLOCATION_TOLERANCE_W:  # within half a watt: done
                break
    power = power_at_multiplier(lam_hi)  # lam_hi always satisfies the budget
    cap, binding = caps_for(power)
    return Allocation(power, cap, binding, True, lam_hi)


GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0


def energy_optimal_share(
    natural_w: FloatArray,
    a: FloatArray,
    b: FloatArray,
    x_lo: FloatArray,
    static_w: float,
    objective: str,
    iterations: int = 30,
) -> FloatArray:
    """Per GPU: the share x = power / natural draw in [x_lo, 1] that minimizes energy per unit of
    work, (x N + static_w) / T(x), or energy x delay (that over T again). Both are unimodal in x
    for a concave T, so a vectorized golden-section search finds the optimum."""

    def cost(x: FloatArray) -> FloatArray:
        t = throughput_at_power(x * natural_w, natural_w, a, b)
        t = np.maximum(t, 1e-9)
        e = (x * natural_w + static_w) / t
        return e / t if objective == "energy_delay" else e

    lo = x_lo.copy()
    hi = np.ones_like(lo)
    for _ in range(iterations):
        c = hi - GOLDEN * (hi - lo)
        d = lo + GOLDEN * (hi - lo)
        left = cost(c) < cost(d)
        hi = np.where(left, d, hi)
        lo = np.where(left, lo, c)
    x = 0.5 * (lo + hi)
    # The ends can beat the interior when the cost is monotone.
    candidates = np.stack([x_lo, x, np.ones_like(x)])
    costs = np.stack([cost(candidates[0]), cost(candidates[1]), cost(candidates[2])])
    return np.asarray(candidates[np.argmin(costs, axis=0), np.arange(x.size)], dtype=np.float64)


FIT_X_RANGE = (0.35, 0.97)  # shares of the natural draw whose throughput says something


@dataclass(frozen=True, slots=True)
class FamilyFit:
    """The curve family's least-squares fit to measured (share of natural draw, relative
    throughput) points: T(x) = 1 - a (1 - x)^b."""

    a: float
    b: float
    rms: float  # root-mean-square misfit in relative throughput over every point given
    points: int  # points inside FIT_X_RANGE that the fit used


def fit_family(share: npt.ArrayLike, throughput: npt.ArrayLike) -> FamilyFit:
    """Fit a and b to points (x = power / natural draw, T = throughput / uncapped throughput):
    log(1 - T) = log(a) + b log(1 - x), least squares over the points with x in FIT_X_RANGE and
    T < 1 (the derivation of agent/sim/calibration.py's table). A curve that loses nothing
    anywhere (every T at 1) is insensitive: a = 0."""
    x = _as_f64(share)
    t = _as_f64(throughput)
    use = (x > FIT_X_RANGE[0]) & (x < FIT_X_RANGE[1]) & (t < 0.9995) & (t > 0.0)
    if int(use.sum()) < 2:
        a, b = (0.0, MIN_EXPONENT) if bool(np.all(t >= 0.995)) else (CONSERVATIVE_A, CONSERVATIVE_B)
    else:
        u = np.log1p(-x[use])
        v = np.log1p(-t[use])
        design = np.stack([np.ones_like(u), u], axis=1)
        (log_a, slope), *_ = np.linalg.lstsq(design, v, rcond=None)
        a, b = float(np.exp(log_a)), max(float(slope), MIN_EXPONENT)
    fitted = throughput_at_power(x, np.ones_like(x), a, b)
    rms = float(np.sqrt(np.mean((fitted - t) ** 2))) if t.size else 0.0
    return FamilyFit(a=a, b=b, rms=rms, points=int(use.sum()))

"""A cluster's demand curve: what each further watt of budget buys it, from its floor to its
ceiling, and how it is built from what the agent's orient learned.

The curve is piecewise linear and concave: breakpoints (budget W, throughput) with throughput in
GPU-equivalents (the sum of each busy GPU's relative throughput, agent.core.curves). Its floor is
the least budget the cluster can live within (every busy GPU at its lowest cap, idle GPUs at
theirs, what cannot be steered at its worst); its ceiling the budget past which nothing more is
bought (every job at its natural draw). Between them the points lie on the cluster's own optimal
frontier: the water-filling split of allocate_power at a sweep of marginal values, so the site's
split over curves is the cluster's own split over GPUs, one level up.

Curves travel as JSON through the coordination store; `DemandCurve.from_json` refuses anything
that is not a finite, increasing, concave curve (a broken agent must not skew the site's split).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.core.curves import MIN_EXPONENT, known_natural_w, throughput_at_power
from agent.core.situation import Situation
from agent.core.snapshot import Metric

FloatArray = npt.NDArray[np.float64]

MERGE_W = 0.5  # breakpoints closer than this are one (a rounding's slope would be huge)
CURVE_POINTS = 24  # breakpoints of a published curve (the sweep of marginal values)
MAX_CURVE_POINTS = 256  # what a curve read from the store may hold
NOISE_Z = 3.0  # as power_budget: the fleet's draw noise kept in hand, in standard deviations
# A budget read as "more than any site": past this a curve from the store is refused (10 GW).
MAX_CURVE_W = 1e10


class CurveError(ValueError):
    """A demand curve that cannot be used (named in the message)."""


@dataclass(frozen=True)
class DemandCurve:
    """Throughput (GPU-equivalents) at each budget (W): concave, from floor to ceiling.

    `power_w` increases strictly (a single point: floor = ceiling), `value` never decreases and
    its slopes never increase. `fleet_power_w` is what the cluster drew when it published (the
    site's status sums it); `grant_epoch` the newest grant it has planned under (the coordinator
    counts an older, larger grant against the limits until then)."""

    power_w: tuple[float, ...]
    value: tuple[float, ...]
    fleet_power_w: float | None = None
    grant_epoch: int = 0
    gpus: int = 0
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        _check_curve(self.power_w, self.value)

    @property
    def floor_w(self) -> float:
        return self.power_w[0]

    @property
    def ceiling_w(self) -> float:
        return self.power_w[-1]

    def value_at(self, budget_w: float) -> float:
        """Throughput under `budget_w` (the floor's below it, the ceiling's above)."""
        return float(np.interp(budget_w, self.power_w, self.value))

    def segments(self) -> list[tuple[float, float]]:
        """(watts, throughput per watt) of each piece past the floor, steepest first."""
        out = []
        for i in range(1, len(self.power_w)):
            width = self.power_w[i] - self.power_w[i - 1]
            out.append((width, (self.value[i] - self.value[i - 1]) / width))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "power_w": [round(p, 3) for p in self.power_w],
            "value": [round(v, 9) for v in self.value],
            "fleet_power_w": None if self.fleet_power_w is None else round(self.fleet_power_w, 1),
            "grant_epoch": self.grant_epoch,
            "gpus": self.gpus,
            "notes": list(self.notes),
        }

    @staticmethod
    def from_json(data: object) -> DemandCurve:
        """A curve read from the store; CurveError names what is wrong."""
        if not isinstance(data, Mapping):
            raise CurveError("not an object")
        power, value = data.get("power_w"), data.get("value")
        if not isinstance(power, list) or not isinstance(value, list):
            raise CurveError("power_w and value must be lists")
        if not 1 <= len(power) <= MAX_CURVE_POINTS or len(power) != len(value):
            raise CurveError(f"power_w and value: 1 to {MAX_CURVE_POINTS} points each, alike")
        fleet = data.get("fleet_power_w")
        epoch = data.get("grant_epoch", 0)
        gpus = data.get("gpus", 0)
        notes = data.get("notes", [])
        if fleet is not None and not _finite_number(fleet):
            raise CurveError("fleet_power_w: not a finite number")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise CurveError("grant_epoch: not a non-negative integer")
        if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
            raise CurveError("gpus: not a non-negative integer")
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise CurveError("notes: not a list of strings")
        if not all(_finite_number(x) for x in (*power, *value)):
            raise CurveError("power_w and value: finite numbers only")
        # Rounding in transit can bend a concave curve by a hair: the concave hull is taken, and
        # a curve it would move by more than a rounding's worth is refused.
        p = np.asarray(power, dtype=np.float64)
        v = np.asarray(value, dtype=np.float64)
        if (np.diff(p) <= 0).any():
            raise CurveError("budgets must increase")
        hull_p, hull_v = concave_hull(p, v)
        if np.abs(np.interp(p, hull_p, hull_v) - v).max() > 1e-6 * max(1.0, float(v.max())):
            raise CurveError("a demand curve must be concave (each further watt buys no more)")
        return DemandCurve(
            power_w=tuple(float(x) for x in hull_p),
            value=tuple(float(y) for y in hull_v),
            fleet_power_w=None if fleet is None else float(fleet),
            grant_epoch=epoch,
            gpus=gpus,
            notes=tuple(notes[:8]),
        )


def _finite_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_curve(power: tuple[float, ...], value: tuple[float, ...]) -> None:
    if not power or len(power) != len(value):
        raise CurveError("a curve needs as many throughputs as budgets, at least one")
    p = np.asarray(power, dtype=np.float64)
    v = np.asarray(value, dtype=np.float64)
    if not (np.isfinite(p).all() and np.isfinite(v).all()):
        raise CurveError("a curve holds finite numbers only")
    if p[0] < 0 or p[-1] > MAX_CURVE_W or v[0] < 0:
        raise CurveError(f"budgets lie in [0, {MAX_CURVE_W:g}] W and throughput is not negative")
    if p.size == 1:
        return
    width = np.diff(p)
    if (width <= 0).any():
        raise CurveError("budgets must increase")
    rise = np.diff(v)
    if (rise < -1e-9).any():
        raise CurveError("throughput must not fall as the budget grows")
    slope = rise / width
    # Concave: each piece buys no more per watt than the one before (a rounding's worth aside).
    if (np.diff(slope) > 1e-6 * float(np.abs(slope).max()) + 1e-12).any():
        raise CurveError("a demand curve must be concave (each further watt buys no more)")


def concave_hull(power_w: FloatArray, value: FloatArray) -> tuple[FloatArray, FloatArray]:
    """The least concave majorant of the points, thinned to a watt apart first: sampling and
    rounding can leave a point a hair under the chord."""
    xs_in, ys_in = _thinned(np.asarray(power_w, np.float64), np.asarray(value, np.float64))
    pts: list[tuple[float, float]] = []
    for x, y in zip(xs_in.tolist(), ys_in.tolist(), strict=True):
        while len(pts) >= 2 and _turns_up(pts[-2], pts[-1], (x, y)):
            pts.pop()
        pts.append((x, y))
    # Throughput never falls: a flat tail replaces any drop.
    xs = np.array([p[0] for p in pts])
    ys = np.maximum.accumulate(np.array([p[1] for p in pts]))
    return xs, ys


def _turns_up(a: tuple[float, float], b: tuple[float, float], c: tuple[float, float]) -> bool:
    """b lies on or under the chord a-c (so it is not a vertex of the upper hull)."""
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]) >= 0


def _thinned(power_w: FloatArray, value: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Points at least MERGE_W (and a thousandth of the span) apart, the best value of each
    bunch kept at its first budget (the curve only moves up), and the last budget kept: a sweep's
    tail crowds points a fraction of a watt apart, where rounding in transit would swamp their
    slopes."""
    order = np.argsort(power_w, kind="stable")
    p, v = power_w[order], value[order]
    if p.size == 0:
        return p, v
    gap = max(MERGE_W, 1e-3 * float(p[-1] - p[0]))
    xs, ys = [float(p[0])], [float(v[0])]
    for x, y in zip(p[1:].tolist(), v[1:].tolist(), strict=True):
        if x - xs[-1] >= gap:
            xs.append(x)
            ys.append(y)
        else:
            ys[-1] = max(ys[-1], y)
    if float(p[-1]) > xs[-1]:  # the ceiling itself, in place of the bunch's first budget
        xs[-1] = float(p[-1]) if len(xs) > 1 else xs[-1]
    return np.array(xs), np.array(ys)


@dataclass(frozen=True)
class CurveInputs:
    """What a cluster's curve is built from, per busy GPU (columnar), plus the fixed draw."""

    natural_w: FloatArray
    a: FloatArray
    b: FloatArray
    cap_draw_frac: FloatArray
    min_cap_w: FloatArray
    max_cap_w: FloatArray
    fixed_w: float  # what no busy GPU's cap changes: overhead, idle and unseen GPUs, noise
    margin_frac: float = 0.01  # the budget share power_budget holds back


def curve_inputs(situation: Situation, margin_frac: float = 0.01) -> CurveInputs:
    """The Situation's controllable GPUs and fixed draw, counted as power_budget counts them:
    unseen GPUs at their maximum limit, idle ones at their lowest cap (or what the learned
    arrival reserve says they add), the draw noise at NOISE_Z standard deviations."""
    snap = situation.snapshot
    fresh = snap.fresh
    bounded = np.isfinite(situation.min_cap_w) & np.isfinite(situation.max_cap_w)
    control = fresh & bounded
    busy = situation.busy & control
    idle = control & ~situation.busy
    power = np.nan_to_num(snap.column(Metric.POWER_W)[0], nan=0.0)
    max_cap = situation.max_cap_w
    stale_w = float(situation.stale_worst_w()[0].sum())
    unbounded_w = float(power[fresh & ~bounded].sum())
    idle_w = float(situation.min_cap_w[idle].sum())
    if situation.arrival_reserve_w is not None:
        idle_w = min(idle_w, float(power[idle].sum()) + situation.arrival_reserve_w)
    curves = situation.curves
    std = np.where(busy, (curves.natural_w_hi - curves.natural_w) / 2.0, 0.0)
    noise_w = NOISE_Z * float(np.sqrt(np.nansum(std**2)))
    natural = known_natural_w(curves.natural_w, max_cap)
    return CurveInputs(
        natural_w=natural[busy],
        a=curves.a[busy],
        b=curves.b[busy],
        cap_draw_frac=curves.cap_draw_frac[busy],
        min_cap_w=situation.min_cap_w[busy],
        max_cap_w=max_cap[busy],
        fixed_w=situation.overhead_w + stale_w + unbounded_w + idle_w + noise_w,
        margin_frac=margin_frac,
    )


def frontier(inputs: CurveInputs, points: int = CURVE_POINTS) -> tuple[FloatArray, FloatArray]:
    """(busy GPUs' total draw, throughput) along the optimal split, at `points` marginal values
    from the steepest slope at the floor down to zero: vectorized, no bisection (each marginal
    value gives every GPU's draw in closed form, as in allocate_power)."""
    natural = inputs.natural_w
    if natural.size == 0:
        return np.zeros(1), np.zeros(1)
    k = inputs.cap_draw_frac
    b = np.maximum(inputs.b, MIN_EXPONENT)
    p_hi = np.minimum(natural, k * inputs.max_cap_w)
    p_lo = np.minimum(p_hi, k * inputs.min_cap_w)
    scale = inputs.a * b / natural  # dT/dp at p = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        slope_lo = scale * (1.0 - p_lo / natural) ** (b - 1.0)
    top = float(np.nanmax(slope_lo, initial=0.0))
    if not top > 0:
        p = np.array([p_lo.sum(), p_hi.sum()])
        t = throughput_at_power(p_hi, natural, inputs.a, b).sum()
        return p, np.array([t, t])
    # Marginal values, densest where the curve bends most (geometric), then exactly zero.
    lams = np.append(top * np.geomspace(1.0, 1e-4, points - 1), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac_lost = np.where(
            scale[None, :] > 0, (lams[:, None] / scale[None, :]) ** (1.0 / (b - 1.0)), 1.0
        )
    draw = np.clip(natural * (1.0 - np.clip(frac_lost, 0.0, 1.0)), p_lo, p_hi)
    tput = throughput_at_power(draw, natural, inputs.a, b).sum(axis=1)
    return draw.sum(axis=1), tput


def build_curve(
    situation: Situation,
    *,
    margin_frac: float = 0.01,
    points: int = CURVE_POINTS,
    grant_epoch: int = 0,
) -> DemandCurve:
    """The cluster's demand curve in budget watts: a budget B leaves B x (1 - margin) - fixed
    for the busy GPUs, so each frontier point at draw P sits at B = (P + fixed) / (1 - margin).
    """
    inputs = curve_inputs(situation, margin_frac)
    draw, tput = frontier(inputs, points)
    budget = (draw + inputs.fixed_w) / (1.0 - inputs.margin_frac)
    power, value = concave_hull(budget, tput)
    return DemandCurve(
        power_w=tuple(float(p) for p in power),
        value=tuple(float(v) for v in value),
        fleet_power_w=situation.fleet_power_w,
        grant_epoch=grant_epoch,
        gpus=situation.snapshot.n_gpus,
    )

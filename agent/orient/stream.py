"""A streaming, causal, bounded-memory anomaly detector for many univariate series at once, that
turns rows into events: an alarm opens once per anomalous episode and closes with hysteresis.

Columnar: every piece of state is a numpy array whose first axis is the series (shape
(n_series, ...)); one `update` advances every series by one row. The same code serves `ooda
detect` (one series, a CSV file) and the live loop (a series per GPU and field).

Per row, per series:

1. Three predictors guess the value from the rows before it, each learned robustly (a residual
   beyond `huber_k` scales moves it by at most `huber_k` scales, so an outlier barely teaches
   it): `local`, a fast level (what the series is doing now); `baseline`, a slow level (what it
   usually does); `rhythm`, a slow level plus a daily profile (`rhythm_bins` bins, each with its
   own scale) and a day-of-week offset. The rhythm speaks only where it predicts clearly better
   than the local level (its recent absolute error below `rhythm_gain` times the local one's):
   where a series has a daily or weekly rhythm.
2. Each predictor's residual, in units of its robust scale (an exponentially weighted mean
   absolute deviation), gives statistics at several time scales: the row itself and
   exponentially weighted means over `average_halflives_rows` (a sustained shift that no single
   row shows), each in both directions.
3. Each statistic is calibrated against its own recent distribution: beyond `tail_from_z` (in
   its own scale units) the tail is modelled as exponential in log(1 + z), i.e. a power law in z
   whose index is learned (a heavy-tailed series learns that big excursions are common). The
   exceedance rate and the mean excess are learned from every row, so the calibration follows
   the series as it is (the rhythm's tails only where its bin has learned). The row's tail
   probability `p` is the smallest over the statistics times their number (Bonferroni: the
   chance that a normal row looks this unusual on any of them): one probability scale, so one
   threshold means the same on every series. With `tail_record`, the fitted tail may not call
   a row rarer than the series' own record says: each statistic also keeps how its
   exceedances were spread over bins of excess (`tail_bin_width` wide, up to
   `TAIL_RECORD_TOP_Z` scales; beyond, everything is a record), and a statistic's probability
   is at least the share of rows that went as far (an empirical, conformal-style floor): a
   series whose big bursts recur (tweets, say) learns that they recur, even where the many
   small exceedances that fit the tail's shape say a burst that big is rare.
4. Events: an alarm opens when p < `alarm_p` (and the series' alarm budget allows: a token
   bucket of `alarm_burst` alarms refilled at `alarms_per_day`); it closes after `calm_rows`
   rows in a row with p above `calm_factor` times `alarm_p` (hysteresis). A level shift (the
   series sat `adopt_rows` rows in a row at a level the slow predictors do not explain, steady
   by the local level's own residuals) becomes the new normal: the slow levels move there,
   reported once as a change, and any alarm closes.

This is the design of HTM's anomaly likelihood (a raw score judged against its own recent
distribution, averaged over a short window) with robust, interpretable predictors in place of
the temporal memory, ARTime's and contextOSE's one-alarm-per-novelty (here: per episode), and
extreme-value tails (as in SPOT) in place of a Gaussian assumption. Nothing looks ahead: the
output for row i uses rows <= i only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.core.keyed import RowIndex, frozen
from agent.orient.stats import MAD_TO_SIGMA, pack, unpack

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

DAY_S = 86_400.0
WEEK_DAYS = 7
LOCAL, BASELINE, RHYTHM = 0, 1, 2
PREDICTORS = ("local", "baseline", "rhythm")
Z_CAP = 1e12  # residuals of a series that never moved (scale ~ 0) stay finite
AVERAGE_CLIP_Z = 10.0  # one wild row moves a mean of z by at most this
EXCESS_CLIP = 10.0  # one wild excess moves the mean excess by at most this many means
TAIL_RECORD_TOP_Z = 1000.0  # the record's bins reach this far; beyond, every excursion is a record
RHYTHM_READY_VISITS = 3  # a bin scores once it has learned from this many rows


def _alpha(halflife: npt.ArrayLike) -> FloatArray:
    """The weight of a new observation for an exponential mean with this half-life (rows)."""
    h = np.maximum(np.asarray(halflife, dtype=np.float64), 1e-9)
    return np.asarray(1.0 - np.exp2(-1.0 / h), dtype=np.float64)


@dataclass(frozen=True, slots=True)
class StreamParams:
    """The detector's settings. The defaults are one configuration for every series; the
    robustness of each is reported by bench/realdata.py --robustness."""

    local_halflife_rows: float = 2.0
    baseline_halflife_rows: float = 400.0
    scale_halflife_rows: float = 500.0
    huber_k: float = 3.0
    rhythm: bool = True
    rhythm_bins: int = 48
    rhythm_halflife_days: float = 3.0  # of each bin's value, in days of visits
    rhythm_level_halflife_days: float = 7.0  # slower than a week: weekends are the rhythm
    week_halflife_weeks: float = 2.0
    rhythm_gain: float = 0.8
    rhythm_error_halflife_rows: float = 2000.0
    average_halflives_rows: tuple[float, ...] = (3.0, 12.0)
    tail_from_z: float = 3.0
    tail_rate_halflife_rows: float = 5000.0
    tail_excess_memory: float = 100.0  # exceedances
    tail_prior_rate: float = 0.01
    tail_prior_rows: float = 300.0
    tail_prior_excess: float = 0.15
    tail_record: bool = True  # the empirical floor (False: the fitted tail alone)
    tail_bin_width: float = 0.5  # in log(1 + z): each bin spans a factor e^0.5 in 1 + z
    warmup_rows: int = 30
    alarm_p: float = 1e-2
    calm_factor: float = 10.0
    calm_rows: int = 24
    adopt_rows: int = 48
    alarms_per_day: float = math.inf
    alarm_burst: float = 3.0

    @property
    def n_predictors(self) -> int:
        return len(PREDICTORS) if self.rhythm else RHYTHM

    @property
    def tail_bins(self) -> int:
        """The empirical floor's bins of excess (0 without it), covering excesses up to
        TAIL_RECORD_TOP_Z scales whatever their width."""
        if not self.tail_record:
            return 0
        top = math.log1p(TAIL_RECORD_TOP_Z) - math.log1p(self.tail_from_z)
        return max(1, math.ceil(top / self.tail_bin_width))

    @property
    def n_stats(self) -> int:
        return 2 * self.n_predictors * (1 + len(self.average_halflives_rows))


@dataclass(frozen=True, slots=True)
class StreamStep:
    """What one row says, per series."""

    p: FloatArray  # calibrated tail probability (1 where not scored)
    expected: FloatArray  # the value the scoring predictor expected (NaN before it knows)
    opened: BoolArray  # an alarm opened on this row
    closed: BoolArray  # an alarm closed on this row (calm again, or a change adopted)
    changed: BoolArray  # a level shift became the new normal on this row
    alarm: BoolArray  # an alarm is open after this row


def _state_spec(p: StreamParams) -> dict[str, tuple[tuple[int, ...], float]]:
    """Name -> (shape after the series axis, fill for a new or reset series)."""
    k, h, s = p.n_predictors, len(p.average_halflives_rows), p.n_stats
    b, w = (p.rhythm_bins, WEEK_DAYS) if p.rhythm else (0, 0)
    return {
        "rows": ((), 0.0),  # rows learned since the last reset
        "last_t": ((), -math.inf),
        "dt": ((), 0.0),  # typical interval (s); 0: not known yet
        "level_local": ((), 0.0),
        "level_baseline": ((), 0.0),
        "level_rhythm": ((), 0.0),  # the rhythm's deseasonalised level
        "scale_local": ((), 0.0),  # mean absolute residual (the rhythm's: per bin, below)
        "scale_baseline": ((), 0.0),
        "profile": ((b,), 0.0),
        "profile_visits": ((b,), 0.0),
        "profile_scale": ((b,), 0.0),
        "week": ((w,), 0.0),
        "err_local": ((), 0.0),
        "err_rhythm": ((), 0.0),
        "mean_z": ((k, h), 0.0),
        "mean_z_scale": ((k, h), 1.0),
        "tail_rate": ((s,), p.tail_prior_rate),
        "tail_excess": ((s,), p.tail_prior_excess),
        "tail_seen": ((s,), 0.0),
        "tail_shares": ((s, p.tail_bins), 0.0),  # the exceedance rate's share per bin of excess
        "open": ((), 0.0),
        "calm": ((), 0.0),
        "shifted": ((), 0.0),  # rows in a row at a level apart from the baseline
        "tokens": ((), p.alarm_burst),
    }


# How state is saved where float32 is not the right size: times need float64; the tails (most of
# the state) are shares, small positive means and counts that half precision holds (counts are
# kept under 2048, where it is exact and where the count no longer changes anything).
_SAVED_AS = {
    "last_t": "float64",
    "tail_rate": "float16",
    "tail_excess": "float16",
    "tail_seen": "float16",
    "tail_shares": "float16",
}
SEEN_CAP = 2048.0

# What `reset` forgets (a new context); timing and the alarm budget outlive a context, and the
# calibration (how the series' residuals are spread, in their own scale units) may too.
_KEPT_BY_RESET = frozenset({"last_t", "dt", "tokens"})
_CALIBRATION = frozenset({"mean_z_scale", "tail_rate", "tail_excess", "tail_seen", "tail_shares"})


@dataclass(frozen=True, slots=True)
class _Row:
    """One row's inputs and what every step derives from them (series axis first)."""

    x: FloatArray
    valid: BoolArray
    learn: BoolArray
    first: BoolArray  # the series' first row since a reset
    scored: BoolArray  # warmed up: scored
    rows_per_day: FloatArray
    bin: IntArray
    dow: IntArray
    idx: IntArray  # 0..n-1


@dataclass(frozen=True, slots=True)
class _Exceedances:
    """The statistics beyond the tail threshold this row (sparse: series, statistic)."""

    rows: IntArray
    stat: IntArray  # index into the statistics (up: predictor x time scale, then down)
    excess: FloatArray  # log(1 + |z|) beyond log(1 + tail_from_z)
    predictor: IntArray


@dataclass(frozen=True, slots=True)
class _Predictions:
    resid: FloatArray  # (k, n)
    sigma: FloatArray  # (k, n)
    z: FloatArray  # (k, n)
    rhythm_on: BoolArray  # (n,): the rhythm predicts better than the local level
    profile_ready: BoolArray  # (n,)
    expected: FloatArray  # (k, n)


class StreamDetector:
    """The detector over a set of series (rows of its state arrays)."""

    def __init__(self, params: StreamParams | None = None, n_series: int = 0) -> None:
        self.params = p = params or StreamParams()
        self._spec = _state_spec(p)
        self.state: dict[str, FloatArray] = {
            name: np.full((n_series, *shape), fill) for name, (shape, fill) in self._spec.items()
        }
        self._keys: npt.NDArray[np.str_] | None = None
        self._u = math.log1p(p.tail_from_z)
        self._per = 1 + len(p.average_halflives_rows)  # statistics per predictor and side
        self._a_avg = _alpha(np.asarray(p.average_halflives_rows, dtype=np.float64))
        self._a_level = _alpha(np.asarray([p.local_halflife_rows, p.baseline_halflife_rows]))
        self._a_scale = float(_alpha(p.scale_halflife_rows))
        self._a_rate = float(_alpha(p.tail_rate_halflife_rows))
        self._a_excess = float(_alpha(p.tail_excess_memory))
        self._a_err = float(_alpha(p.rhythm_error_halflife_rows))
        stats = np.arange(p.n_stats)
        self._rhythm_stats = stats[(stats % (p.n_predictors * self._per)) // self._per == RHYTHM]

    @property
    def n_series(self) -> int:
        return int(self.state["rows"].shape[0])

    @property
    def keys(self) -> npt.NDArray[np.str_] | None:
        """The keys the rows are aligned with (`align`), if any."""
        return self._keys

    # -- which rows are which series ---------------------------------------------------------------

    def align(self, keys: npt.NDArray[np.str_]) -> None:
        """Keep the rows aligned with `keys` (e.g. GPU UUIDs in snapshot order): a series keeps
        its state under its key wherever its row moves; a new key starts fresh. Free while the
        keys stay the same (the same array, or an equal one)."""
        last = self._keys
        if last is not None and (
            (keys is last and frozen(keys))
            or (keys.shape == last.shape and bool(np.array_equal(keys, last)))
        ):
            self._keys = keys if frozen(keys) else last  # a read-only array: known by identity
            return
        old = last if last is not None and last.size == self.n_series else None
        fresh = StreamDetector(self.params, int(keys.size))
        if old is not None and old.size:
            rows, found = RowIndex(old).find(keys)
            for name, arr in self.state.items():
                fresh.state[name][found] = arr[rows[found]]
        self.state = fresh.state
        self._keys = keys if frozen(keys) else keys.copy()

    def reset(self, mask: BoolArray, keep_calibration: bool = False) -> None:
        """Forget what the series in `mask` learned (their context changed: a new job). With
        `keep_calibration` the tails are kept: residuals already judged against a context-aware
        expectation spread alike from one context to the next."""
        if not mask.any():
            return
        kept = _KEPT_BY_RESET | (_CALIBRATION if keep_calibration else frozenset())
        for name, (_shape, fill) in self._spec.items():
            if name not in kept:
                self.state[name][mask] = fill

    # -- one row -----------------------------------------------------------------------------------

    def update(
        self,
        values: FloatArray,
        times_s: FloatArray,
        valid: BoolArray | None = None,
        learn: BoolArray | None = None,
    ) -> StreamStep:
        """Score one row of every series against what was learned before it, then learn it.
        `valid`: the series has a reading this row (else nothing changes for it); `learn`: the
        reading may teach the models (e.g. not while the agent's own cap binds)."""
        row = self._row(values, times_s, valid, learn)
        pred = self._predict(row)
        exc = self._statistics(row, pred)
        p, which = self._tail_p(row, exc, pred)
        opened = self._open(row, p)
        closed = self._close(row, p)
        was_open = self.state["open"] > 0.5
        changed = self._adopt(row, pred)
        self._learn_tails(row, exc, pred)
        self._learn_levels(row, pred)
        if self.params.rhythm:
            self._learn_rhythm(row, pred)
        st = self.state
        st["rows"] += row.valid
        chosen = (np.maximum(which, 0) % (self.params.n_predictors * self._per)) // self._per
        expected = pred.expected[chosen, row.idx]
        return StreamStep(
            p=p,
            expected=np.where(row.valid & ~row.first, expected, np.nan),
            opened=opened,
            closed=closed | (changed & was_open),
            changed=changed,
            alarm=st["open"] > 0.5,
        )

    def _row(
        self,
        values: FloatArray,
        times_s: FloatArray,
        valid: BoolArray | None,
        learn: BoolArray | None,
    ) -> _Row:
        st, p = self.state, self.params
        x = np.asarray(values, dtype=np.float64)
        t = np.asarray(times_s, dtype=np.float64)
        ok = np.isfinite(x) & np.isfinite(t)
        ok = ok if valid is None else ok & valid
        x = np.where(ok, x, 0.0)
        t = np.where(ok, t, 0.0)
        n = x.shape[0]
        bins = dow = np.zeros(n, dtype=np.int64)
        rows_per_day = np.ones(n)
        if p.rhythm or math.isfinite(p.alarms_per_day):  # (only these need the interval)
            rows_per_day = self._interval(t, ok)
        if p.rhythm:
            day = np.floor(t / DAY_S)
            phase = (t / DAY_S - day) * p.rhythm_bins
            bins = np.minimum(phase.astype(np.int64), p.rhythm_bins - 1)
            # 1970-01-01 was a Thursday: day-of-week 0 is a Monday.
            dow = (day.astype(np.int64) + 3) % WEEK_DAYS
        return _Row(
            x=x,
            valid=ok,
            learn=ok if learn is None else ok & learn,
            first=ok & (st["rows"] == 0),
            scored=ok & (st["rows"] >= p.warmup_rows),
            rows_per_day=np.maximum(rows_per_day, 1.0),
            bin=bins,
            dow=dow,
            idx=np.arange(x.shape[0]),
        )

    def _interval(self, t: FloatArray, ok: BoolArray) -> FloatArray:
        """Learn each series' typical interval (it follows slowly and shrugs off one odd
        gap); return its rows per day."""
        st = self.state
        dt = t - st["last_t"]
        known = st["dt"] > 0.0
        step_ok = ok & (dt > 0.0) & np.isfinite(dt)
        clipped = np.clip(dt, st["dt"] / 10.0, st["dt"] * 10.0)
        st["dt"] = np.where(
            step_ok, np.where(known, st["dt"] + 0.05 * (clipped - st["dt"]), dt), st["dt"]
        )
        st["last_t"] = np.where(ok & (t > st["last_t"]), t, st["last_t"])
        return np.asarray(np.where(known | step_ok, DAY_S / np.maximum(st["dt"], 1e-9), 1.0))

    def _predict(self, row: _Row) -> _Predictions:
        st, p = self.state, self.params
        base = st["level_baseline"]
        floor = 1e-6 * np.maximum(np.abs(base), 1e-3)
        scales = [st["scale_local"], st["scale_baseline"]] + ([floor] if p.rhythm else [])
        sigma = np.maximum(np.stack(scales) * MAD_TO_SIGMA, floor)
        n = row.x.shape[0]
        if p.rhythm:
            seasonal = st["profile"][row.idx, row.bin] + st["week"][row.idx, row.dow]
            expected = np.stack([st["level_local"], base, st["level_rhythm"] + seasonal])
            bin_scale = st["profile_scale"][row.idx, row.bin]
            sigma[RHYTHM] = np.maximum(bin_scale * MAD_TO_SIGMA, floor)
            profile_ready = st["profile_visits"][row.idx, row.bin] >= RHYTHM_READY_VISITS
            better = st["err_rhythm"] < p.rhythm_gain * st["err_local"]
            rhythm_on = profile_ready & better
        else:
            expected = np.stack([st["level_local"], base])
            profile_ready = rhythm_on = np.zeros(n, dtype=bool)
        resid = row.x - expected
        z = np.clip(np.where(row.scored, resid / sigma, 0.0), -Z_CAP, Z_CAP)
        return _Predictions(resid, sigma, z, rhythm_on, profile_ready, expected)

    def _statistics(self, row: _Row, pred: _Predictions) -> _Exceedances:
        """The statistics (per series: each predictor's z of the row and of its recent means,
        each in its own scale units) where they pass the tail threshold, in either direction:
        the few entries the tails are about. Advances the means."""
        st = self.state
        zt = np.ascontiguousarray(pred.z.T)  # (n, k)
        clipped = np.clip(zt, -AVERAGE_CLIP_Z, AVERAGE_CLIP_Z)
        means = st["mean_z"] + self._a_avg * (clipped[:, :, None] - st["mean_z"])
        std_means = means / np.maximum(st["mean_z_scale"], 1e-3)
        w = (self._a_scale * row.scored)[:, None, None]
        st["mean_z_scale"] += w * (np.abs(means) * MAD_TO_SIGMA - st["mean_z_scale"])
        st["mean_z"] = np.where(row.valid[:, None, None], means, st["mean_z"])
        signed = np.concatenate([zt[:, :, None], std_means], axis=2)  # (n, k, per)
        flat = signed.reshape(signed.shape[0], -1)  # (n, m): m = k * per
        rows, cols = np.nonzero(np.abs(flat) > self.params.tail_from_z)
        value = flat[rows, cols]
        side = cols + flat.shape[1] * (value < 0.0)  # up statistics first, then down
        excess = np.log1p(np.abs(value)) - self._u
        return _Exceedances(rows, side, excess, cols // self._per)

    def _tail_p(
        self, row: _Row, exc: _Exceedances, pred: _Predictions
    ) -> tuple[FloatArray, IntArray]:
        """The row's tail probability: each statistic judged against its own learned tail
        (its rate beyond the threshold, exponential beyond in log(1 + z)); the smallest, times
        the number of statistics (Bonferroni: calibrated for the row, whichever one spoke)."""
        st = self.state
        n, n_stats = st["tail_rate"].shape
        mean = st["tail_excess"][exc.rows, exc.stat]
        p_each = st["tail_rate"][exc.rows, exc.stat] * np.exp(-exc.excess / mean)
        if self.params.tail_bins:
            p_each = np.maximum(p_each, self._seen_p(exc, mean))
        if self.params.rhythm:  # its statistics count only where the series has a rhythm
            p_each = np.where((exc.predictor != RHYTHM) | pred.rhythm_on[exc.rows], p_each, 1.0)
        # The smallest per series, from the few exceedances (sorted by series, then p).
        order = np.lexsort((p_each, exc.rows))
        rows = exc.rows[order]
        head = np.ones(rows.shape[0], dtype=bool)
        head[1:] = rows[1:] != rows[:-1]
        best = np.ones(n)
        which = np.full(n, -1, dtype=np.int64)
        best[rows[head]] = p_each[order][head]
        which[rows[head]] = exc.stat[order][head]
        scored = row.scored & (best < 1.0)
        best = np.minimum(best * n_stats, 1.0)
        return np.where(scored, best, 1.0), np.where(scored, which, -1)

    def _bin(self, excess: FloatArray) -> IntArray:
        width, bins = self.params.tail_bin_width, self.params.tail_bins
        return np.minimum((excess / width).astype(np.int64), bins - 1)

    def _seen_p(self, exc: _Exceedances, mean: FloatArray) -> FloatArray:
        """The share of rows whose statistic went at least this far: the rate times the shares
        of the bins above this row's, and of its own bin the part above it (the bin's mass
        taken to fall off within it as the fitted tail does, so the bins' width hardly
        matters; the last bin holds everything beyond)."""
        st, width = self.state, self.params.tail_bin_width
        b = self._bin(exc.excess)
        shares = st["tail_shares"][exc.rows, exc.stat]  # (m, bins)
        above = np.cumsum(shares[:, ::-1], axis=1)[:, ::-1] - shares  # bins above b's, summed
        at = np.arange(b.size)
        into = exc.excess - b * width  # how far into its bin
        q = np.exp(-width / mean)
        inner = (np.exp(-into / mean) - q) / np.maximum(1.0 - q, 1e-12)
        part = np.where(b == shares.shape[1] - 1, np.exp(-into / mean), np.maximum(inner, 0.0))
        return np.asarray(
            st["tail_rate"][exc.rows, exc.stat] * (above[at, b] + part * shares[at, b]),
            dtype=np.float64,
        )

    # -- events ------------------------------------------------------------------------------------

    def _open(self, row: _Row, p: FloatArray) -> BoolArray:
        """Alarms that open (p under the threshold, none open, a token in the series' budget)."""
        st, prm = self.state, self.params
        want = row.scored & (st["open"] < 0.5) & (p < prm.alarm_p)
        if math.isfinite(prm.alarms_per_day):
            refill = st["dt"] * prm.alarms_per_day / DAY_S
            tokens = np.where(
                row.valid, np.minimum(st["tokens"] + refill, prm.alarm_burst), st["tokens"]
            )
            allowed = tokens >= 1.0
            st["tokens"] = np.where(want & allowed, tokens - 1.0, tokens)
        else:
            allowed = np.ones_like(want)
        opened = want & allowed
        st["open"] = np.where(opened, 1.0, st["open"])
        return opened

    def _close(self, row: _Row, p: FloatArray) -> BoolArray:
        """Hysteresis: an alarm closes after `calm_rows` rows in a row with p above
        `calm_factor` times the threshold."""
        st, prm = self.state, self.params
        is_open = (st["open"] > 0.5) & row.valid
        calm = np.where(
            is_open, np.where(p > prm.alarm_p * prm.calm_factor, st["calm"] + 1.0, 0.0), st["calm"]
        )
        closed = is_open & (calm >= prm.calm_rows)
        st["calm"] = np.where(closed, 0.0, calm)
        st["open"] = np.where(closed, 0.0, st["open"])
        return closed

    def _adopt(self, row: _Row, pred: _Predictions) -> BoolArray:
        """A level shift: once the series has sat `adopt_rows` rows in a row at a level its
        slow predictor does not explain (the local level, steady by its own recent mean
        residual, more than 3 scales from the baseline, or from the rhythm where the series
        has one), the slow levels move there (the new normal, reported once) and any alarm
        closes."""
        st, prm = self.state, self.params
        if prm.adopt_rows <= 0:
            return np.zeros(row.x.shape[0], dtype=bool)
        local = st["level_local"]
        gap = local - pred.expected[BASELINE]
        apart = np.abs(gap) > 3.0 * pred.sigma[BASELINE]
        if prm.rhythm:
            gap_rhythm = local - pred.expected[RHYTHM]
            apart_rhythm = np.abs(gap_rhythm) > 3.0 * pred.sigma[RHYTHM]
            apart = np.where(pred.rhythm_on, apart_rhythm, apart)
        steady = np.abs(st["mean_z"][:, LOCAL, -1]) < 1.0
        sat = row.scored & steady & apart
        st["shifted"] = np.where(sat, st["shifted"] + 1.0, np.where(row.valid, 0.0, st["shifted"]))
        due = st["shifted"] >= prm.adopt_rows
        if due.any():
            st["level_baseline"] = np.where(due, local, st["level_baseline"])
            if prm.rhythm:
                moved = due & pred.rhythm_on
                st["level_rhythm"] = np.where(
                    moved, st["level_rhythm"] + gap_rhythm, st["level_rhythm"]
                )
            for name in ("mean_z", "open", "calm", "shifted"):
                st[name][due] = 0.0
        return due

    # -- learning ----------------------------------------------------------------------------------

    def _learn_tails(self, row: _Row, exc: _Exceedances, pred: _Predictions) -> None:
        """Each statistic's exceedance rate (every scored row) and mean excess (the rows
        beyond); the rhythm's only where its bin has learned (before, its scale means nothing)."""
        st, prm = self.state, self.params
        weight = np.maximum(self._a_rate, 1.0 / (prm.tail_prior_rows + st["rows"])) * row.scored
        if prm.rhythm:
            rate_w = np.repeat(weight[:, None], st["tail_rate"].shape[1], axis=1)
            rhythm = self._rhythm_stats
            rate_w[:, rhythm] *= pred.profile_ready[:, None]
        else:
            rate_w = weight[:, None]
        rate = st["tail_rate"]
        rate -= rate_w * rate
        learn = row.scored[exc.rows]
        if prm.rhythm:
            learn &= (exc.predictor != RHYTHM) | pred.profile_ready[exc.rows]
        r, c, e = exc.rows[learn], exc.stat[learn], exc.excess[learn]
        w = rate_w[r, c] if prm.rhythm else weight[r]
        decayed = rate[r, c]
        rate[r, c] += w
        if prm.tail_bins:
            # Between exceedances the rate and each bin's part of it fall alike: the shares
            # change only here (sparse), by this exceedance's weight in its bin.
            shares = st["tail_shares"]
            kept = decayed / np.maximum(rate[r, c], 1e-300)
            shares[r, c] *= kept[:, None]
            shares[r, c, self._bin(e)] += 1.0 - kept
        seen = st["tail_seen"][r, c]
        mean = st["tail_excess"][r, c]
        w_exc = np.maximum(self._a_excess, 1.0 / (5.0 + seen))
        st["tail_excess"][r, c] = mean + w_exc * (np.minimum(e, EXCESS_CLIP * mean) - mean)
        st["tail_seen"][r, c] = np.minimum(seen + 1.0, SEEN_CAP)

    def _learn_levels(self, row: _Row, pred: _Predictions) -> None:
        """The local and baseline levels and their scales, Huberized after the warm-up (equal
        weights during it: a fast, fair start)."""
        st, prm = self.state, self.params
        warm = st["rows"] >= prm.warmup_rows
        early = 1.0 / (st["rows"] + 1.0)
        learn = row.learn & ~row.first
        a_scale = np.maximum(self._a_scale, early) * learn
        for k, name in ((LOCAL, "local"), (BASELINE, "baseline")):
            limit = np.where(warm, prm.huber_k * pred.sigma[k], np.inf)
            clipped = np.clip(pred.resid[k], -limit, limit)
            a_level = np.maximum(self._a_level[k], early) * learn
            level = st[f"level_{name}"]
            st[f"level_{name}"] = np.where(row.first, row.x, level + a_level * clipped)
            scale = st[f"scale_{name}"]
            scale += a_scale * (np.abs(clipped) - scale)

    def _learn_rhythm(self, row: _Row, pred: _Predictions) -> None:
        """The rhythm's deseasonalised level, its bin (value above the level, and its own
        scale), the day of the week's offset, and how well it predicts against the local level."""
        st, prm = self.state, self.params
        idx, b, learn = row.idx, row.bin, row.learn
        level = st["level_rhythm"]
        warm = st["rows"] >= prm.warmup_rows
        a_level = np.maximum(
            _alpha(prm.rhythm_level_halflife_days * row.rows_per_day), 1.0 / (st["rows"] + 1.0)
        )
        # The deseasonalised level moves by at most a few local scales per row.
        room = 3 * prm.huber_k * pred.sigma[LOCAL]
        step = np.where(warm, np.clip(pred.resid[RHYTHM], -room, room), pred.resid[RHYTHM])
        st["level_rhythm"] = np.where(
            row.first, row.x, np.where(learn, level + a_level * step, level)
        )
        visits = st["profile_visits"][idx, b]
        per_bin = row.rows_per_day / prm.rhythm_bins
        a_bin = np.maximum(_alpha(prm.rhythm_halflife_days * per_bin), 1.0 / (visits + 1.0))
        ready = visits >= RHYTHM_READY_VISITS
        value = st["profile"][idx, b]
        target = row.x - level - st["week"][idx, row.dow]
        limit = np.where(ready, 2 * prm.huber_k * pred.sigma[RHYTHM], np.inf)
        st["profile"][idx, b] = np.where(
            learn, value + a_bin * np.clip(target - value, -limit, limit), value
        )
        scale = st["profile_scale"][idx, b]
        huber = np.minimum(np.abs(pred.resid[RHYTHM]), prm.huber_k * pred.sigma[RHYTHM])
        new_scale = np.where(ready, scale + a_bin * (huber - scale), np.abs(pred.resid[LOCAL]))
        st["profile_scale"][idx, b] = np.where(learn & ~row.first, new_scale, scale)
        st["profile_visits"][idx, b] = visits + learn
        on = learn & pred.profile_ready & warm
        week = st["week"][idx, row.dow]
        a_week = _alpha(prm.week_halflife_weeks * row.rows_per_day)
        limit_w = prm.huber_k * pred.sigma[RHYTHM]
        st["week"][idx, row.dow] = np.where(
            on, week + a_week * np.clip(pred.resid[RHYTHM], -limit_w, limit_w), week
        )
        self._learn_rhythm_error(row, pred)

    def _learn_rhythm_error(self, row: _Row, pred: _Predictions) -> None:
        st = self.state
        cap = 10.0 * pred.sigma[LOCAL]
        local = np.minimum(np.abs(pred.resid[LOCAL]), cap)
        rhythm = np.minimum(np.abs(pred.resid[RHYTHM]), cap)
        ok = row.learn & pred.profile_ready
        err_local, err_rhythm = st["err_local"], st["err_rhythm"]
        st["err_local"] = np.where(ok, err_local + self._a_err * (local - err_local), err_local)
        # Until its bin has learned, the rhythm counts as twice as bad as the local level.
        st["err_rhythm"] = np.where(
            ok,
            err_rhythm + self._a_err * (rhythm - err_rhythm),
            np.where(row.learn, 2.0 * st["err_local"], err_rhythm),
        )

    # -- persistence -------------------------------------------------------------------------------

    def _unused(self) -> frozenset[str]:
        """State this configuration never reads (not saved)."""
        p = self.params
        out: set[str] = set()
        if not p.rhythm:
            out |= {"profile", "profile_visits", "profile_scale", "week", "level_rhythm"}
            out |= {"err_local", "err_rhythm"}
        if not p.tail_bins:
            out.add("tail_shares")
        if not math.isfinite(p.alarms_per_day):
            out.add("tokens")
            if not p.rhythm:
                out |= {"last_t", "dt"}
        return frozenset(out)

    def to_dict(self, with_keys: bool = True) -> dict[str, Any]:
        """The learned state, compact (base64 of float32, the tails in float16, times in
        float64), with its settings and (unless the caller keeps them once for several
        detectors) its keys."""
        unused = self._unused()
        return {
            "params": asdict(self.params),
            "keys": None if self._keys is None or not with_keys else self._keys.tolist(),
            "state": {
                k: pack(v, _SAVED_AS.get(k, "float32"))
                for k, v in self.state.items()
                if k not in unused
            },
        }

    def load_dict(self, data: Mapping[str, Any], keys: list[str] | None = None) -> None:
        """Take a saved state back (`keys`: where the caller kept them); one saved under other
        settings (or broken) is ignored: the detector starts afresh rather than misread it."""
        saved = dict(data.get("params", {}))
        if "average_halflives_rows" in saved:
            saved["average_halflives_rows"] = tuple(saved["average_halflives_rows"])
        if saved != asdict(self.params):
            return
        # (A field no longer kept, saved by an earlier version, is dropped.)
        state = {k: unpack(v) for k, v in data.get("state", {}).items() if k in self._spec}
        sizes = {v.shape[0] for v in state.values()}
        if set(state) | self._unused() != set(self._spec) or len(sizes) != 1:
            return
        if any(v.shape[1:] != self._spec[k][0] for k, v in state.items()):
            return
        n = sizes.pop()
        for name in self._unused():
            shape, fill = self._spec[name]
            state[name] = np.full((n, *shape), fill)
        self.state = state
        saved_keys = keys if keys is not None else data.get("keys")
        self._keys = None if saved_keys is None else np.asarray(saved_keys, dtype=np.str_)


@dataclass(frozen=True, slots=True)
class SeriesResult:
    """Every row of one or more whole series (rows x series), as `update` said them."""

    p: FloatArray
    expected: FloatArray
    opened: BoolArray
    closed: BoolArray
    changed: BoolArray
    alarm: BoolArray

    @property
    def score(self) -> FloatArray:
        return np.asarray(1.0 - self.p, dtype=np.float64)


def detect_series(
    times_s: npt.ArrayLike,
    values: npt.ArrayLike,
    valid: npt.ArrayLike | None = None,
    params: StreamParams | None = None,
) -> SeriesResult:
    """Run the detector over whole series, row by row (causal): `times_s` and `values` are
    rows (one series) or rows x series (several at once, e.g. files of different lengths with
    `valid` false past each one's end: a row that is not valid changes nothing)."""
    t = np.asarray(times_s, dtype=np.float64)
    x = np.asarray(values, dtype=np.float64)
    one = x.ndim == 1
    t2, x2 = (t[:, None], x[:, None]) if one else (t, x)
    ok = np.ones(x2.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    ok = ok[:, None] if ok.ndim == 1 else ok
    rows, n = x2.shape
    det = StreamDetector(params, n)
    p = np.ones((rows, n))
    expected = np.full((rows, n), np.nan)
    flags = {
        name: np.zeros((rows, n), dtype=bool) for name in ("opened", "closed", "changed", "alarm")
    }
    for i in range(rows):
        step = det.update(x2[i], t2[i], ok[i])
        p[i] = step.p
        expected[i] = step.expected
        for name, out in flags.items():
            out[i] = getattr(step, name)

    def shaped(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return a[:, 0] if one else a

    return SeriesResult(
        p=shaped(p),
        expected=shaped(expected),
        opened=shaped(flags["opened"]),
        closed=shaped(flags["closed"]),
        changed=shaped(flags["changed"]),
        alarm=shaped(flags["alarm"]),
    )

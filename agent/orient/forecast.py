"""Forecasts of power (and temperature) series at several horizons, with prediction intervals.

Each series has a value now and, optionally, a *base*: the caller's noise-free estimate of its
level now (for a node's power: the sum of what each GPU is expected to draw, since a sample is a
level plus noise). The model predicts the change from the base to the horizon (never the level
itself) from lag features of the series (its recent differences, short and long means, its
spread) and what the caller knows of each series now (e.g. the share of GPUs starting up):
scikit-learn's HistGradientBoostingRegressor with an absolute-error loss (or a ridge model).

Three methods compete on the most recent quarter of each horizon's training rows (held out
from the fit): persistence (the value now), the base alone, and base + model. A method must
win clearly to be used: by at least 1%, and by more than one standard error of its gain, the
held-out rows cut into blocks a horizon long (rows `h` cycles apart share most of their future:
at long horizons a model that fits noise otherwise wins a few blocks by chance, and loses badly
after). The base (the value without its noise) is used unless persistence wins clearly; the
model where it wins clearly over both. Intervals are split-conformal: the quantiles of the
chosen method's errors on those rows.

`PanelForecaster` serves many series at once (one per node): it keeps the last values of each
series in a ring of columns, samples a few series each cycle into a training set whose targets
arrive `h` cycles later, and refits one horizon at a time on a schedule. `forecast_series` does
the same for one series read from a file, row by row, causally.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import Ridge

from agent.core.keyed import KeyedColumns
from agent.orient.stats import pack, single_threaded, unpack

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

LAGS = (1, 2, 4, 8, 16, 32)
WINDOW = 33  # values kept per series: now and 32 back
N_LAG_FEATURES = 1 + len(LAGS) + 3 + 1  # ... and base - value
VALIDATION_SHARE = 0.25
PERSIST_ROWS = 1000  # training rows per horizon kept in the saved state
BEAT_MARGIN = 0.99  # another method must be at least 1% better than persistence to be used
MIN_BLOCKS = 3  # blocks of held-out rows a model is compared on, at the fewest
MODELS = ("hgb", "ridge")  # the learned models: gradient-boosted trees, or linear ridge


def lag_features(window: FloatArray, exog: FloatArray | None = None) -> FloatArray:
    """Features from windows of past values (rows: series; columns: oldest .. newest = now).

    NaN where history is missing (the model handles it)."""
    m, width = window.shape
    now = window[:, -1]
    cols = [now]
    for lag in LAGS:
        cols.append(now - window[:, -1 - lag] if lag < width else np.full(m, np.nan))
    with np.errstate(invalid="ignore"), _quiet():
        cols.append(np.nanmean(window[:, -4:], axis=1) - now)
        cols.append(np.nanmean(window[:, -16:], axis=1) - now)
        cols.append(np.nanstd(window[:, -8:], axis=1))
    x = np.column_stack(cols)
    if exog is not None and exog.size:
        x = np.column_stack([x, exog])
    return np.asarray(x, dtype=np.float64)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence numpy's warnings about all-NaN slices (they are expected: short histories)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        yield


@dataclass
class HorizonModel:
    """What was chosen for one horizon and how good each method was on held-out rows."""

    method: str = "persistence"  # "persistence", "level" (the base) or the model's kind
    mae_model: float = math.nan
    mae_level: float = math.nan
    mae_persistence: float = math.nan
    q_lo: float = 0.0  # error quantiles of the chosen method (normalized units)
    q_hi: float = 0.0
    rows: int = 0
    fit_end: int = 0  # how many training rows had ever been collected when it was fit
    model: Any = None  # the fitted regressor (not persisted: refit from the training rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "mae_model": _finite(self.mae_model),
            "mae_level": _finite(self.mae_level),
            "mae_persistence": _finite(self.mae_persistence),
            "q_lo": self.q_lo,
            "q_hi": self.q_hi,
            "rows": self.rows,
            "fit_end": self.fit_end,
        }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def check_model(kind: str) -> str:
    """`kind` if it names a learned model; a ValueError naming the choices otherwise (an unknown
    name must not silently build another model)."""
    if kind not in MODELS:
        raise ValueError(f"unknown forecast model {kind!r} (known: {', '.join(MODELS)})")
    return kind


def _new_regressor(kind: str, seed: int, leaf: int = 40, loss: str = "absolute_error") -> Any:
    if check_model(kind) == "ridge":
        return Ridge(alpha=1.0)
    return HistGradientBoostingRegressor(
        loss=loss,
        max_iter=60,
        learning_rate=0.1,
        max_leaf_nodes=15,
        min_samples_leaf=leaf,
        l2_regularization=1.0,
        early_stopping=False,
        random_state=seed,
    )


class _Columns:
    """A regressor that sees only some feature columns (missing values as 0 for linear ones)."""

    def __init__(self, model: Any, columns: IntArray, fill_missing: bool) -> None:
        self.model = model
        self.columns = columns
        self.fill_missing = fill_missing

    def _x(self, x: FloatArray) -> FloatArray:
        cols = x[:, self.columns]
        return np.nan_to_num(cols) if self.fill_missing else cols

    def fit(self, x: FloatArray, y: FloatArray) -> None:
        with single_threaded():
            self.model.fit(self._x(x), y)

    def predict(self, x: FloatArray) -> FloatArray:
        with single_threaded():
            return np.asarray(self.model.predict(self._x(x)), dtype=np.float64)


def clearly_better(
    err_new: FloatArray, err_old: FloatArray, block_rows: int, z: float = 1.0
) -> bool:
    """Whether errors `err_new` beat `err_old` (paired, in time order) by at least 1% in mean
    absolute error and by more than `z` standard errors of the gain's means over blocks of
    `block_rows` consecutive rows (rows within a block are not independent evidence)."""
    new, old = np.abs(err_new), np.abs(err_old)
    if not float(new.mean()) < BEAT_MARGIN * float(old.mean()):
        return False
    # Few rows (a restart keeps only the newest): at least MIN_BLOCKS shorter blocks, a weaker
    # test than with whole horizons but still more than the margin alone.
    block = max(1, min(int(block_rows), new.shape[0] // MIN_BLOCKS))
    blocks = new.shape[0] // block
    if blocks < 2:
        return False
    # The newest rows, whole blocks only.
    gain = (old - new)[new.shape[0] - blocks * block :].reshape(blocks, block).mean(axis=1)
    return bool(gain.mean() > z * gain.std(ddof=1) / math.sqrt(blocks))


def fit_horizon(
    x: FloatArray,
    y: FloatArray,
    offset: FloatArray,
    coverage: float,
    min_rows: int,
    seed: int = 0,
    kind: str = "hgb",
    leaf: int = 40,
    block_rows: int = 1,
) -> HorizonModel:
    """Choose a method for one horizon. `y`: the value at the horizon minus the base; `offset`:
    the base minus the value now (so persistence's error is y + offset). Rows in time order:
    fit on the older three quarters, compare on the newest quarter. `block_rows`: about how many
    consecutive rows span one horizon (their futures overlap)."""
    n = y.shape[0]
    out = HorizonModel(rows=n)
    if n < 20:
        return out
    split = int(n * (1.0 - VALIDATION_SHARE))
    yv = y[split:]
    quantiles = [(1.0 - coverage) / 2.0, 1.0 - (1.0 - coverage) / 2.0]
    err_p = yv + offset[split:]
    out.mae_persistence = float(np.mean(np.abs(err_p)))
    out.mae_level = float(np.mean(np.abs(yv)))
    best_err, best_mae = err_p, out.mae_persistence
    # The base is the value without its noise: it need only not lose clearly to persistence
    # (on held-out rows a horizon apart either wins often by chance, and switching costs).
    if out.mae_level < best_mae or not clearly_better(err_p, yv, block_rows):
        out.method, best_err, best_mae = "level", yv, out.mae_level
    model = _fit_model(x[:split], y[:split], min_rows, seed, kind, leaf)
    if model is not None:
        pred = model.predict(x[split:])
        out.mae_model = float(np.mean(np.abs(yv - pred)))
        if clearly_better(yv - pred, best_err, block_rows) and clearly_better(
            yv - pred, err_p, block_rows
        ):
            out.method, out.model, best_err = kind, model, yv - pred
    out.q_lo, out.q_hi = (float(q) for q in np.quantile(best_err, quantiles))
    return out


def _fit_model(
    x: FloatArray,
    y: FloatArray,
    min_rows: int,
    seed: int,
    kind: str,
    leaf: int = 40,
    loss: str = "absolute_error",
) -> Any:
    if y.shape[0] < max(min_rows, 10) or np.ptp(y) == 0.0:
        return None
    # Columns with fewer than two distinct values teach nothing (and trip the binning).
    usable = [j for j in range(x.shape[1]) if np.unique(x[np.isfinite(x[:, j]), j]).size >= 2]
    if not usable:
        return None
    model = _Columns(
        _new_regressor(kind, seed, leaf, loss), np.asarray(usable, dtype=np.int64), kind != "hgb"
    )
    try:
        model.fit(x, y)
    except ValueError:
        return None
    return model


def predict(model: HorizonModel, now: FloatArray, base: FloatArray, x: FloatArray) -> FloatArray:
    """The forecast of each series by the chosen method (same units as `now` and `base`)."""
    if model.method == "persistence":
        return now.copy()
    if model.method == "level" or model.model is None or x.shape[0] == 0:
        return base.copy()
    return base + np.asarray(model.model.predict(x), dtype=np.float64)


# -- many series (nodes) ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PanelForecast:
    """Per series (aligned with the names given) x horizon."""

    point: FloatArray
    lo: FloatArray
    hi: FloatArray
    methods: tuple[str, ...]  # per horizon


class PanelForecaster:
    """Forecasts for a set of named series (e.g. each node's power), sampled every cycle."""

    def __init__(
        self,
        horizons_s: Sequence[float],
        coverage: float = 0.9,
        refit_cycles: int = 20,
        min_train_rows: int = 200,
        train_rows: int = 20000,
        series_per_cycle: int = 64,
        n_exog: int = 0,
        seed: int = 0,
        model: str = "hgb",
    ) -> None:
        self.kind = check_model(model)
        self.horizons_s = tuple(float(h) for h in horizons_s)
        self.coverage = coverage
        self.refit_cycles = refit_cycles
        self.min_train_rows = min_train_rows
        self.train_rows = train_rows
        self.series_per_cycle = series_per_cycle
        self.n_exog = n_exog
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.n_features = N_LAG_FEATURES + n_exog
        self.series = KeyedColumns({f"h{i}": (np.float64, np.nan) for i in range(WINDOW)})
        self.cycle = 0  # cycles recorded
        self.interval_s: float | None = None  # the cycle interval the training rows assume
        self.steps = tuple(0 for _ in self.horizons_s)
        # cycle -> (series names, features, base, value now), all normalized
        self.pending: dict[int, tuple[npt.NDArray[np.str_], FloatArray, FloatArray]] = {}
        self.train_x = [np.zeros((0, self.n_features)) for _ in self.horizons_s]
        self.train_y = [np.zeros(0) for _ in self.horizons_s]  # value at horizon - base
        self.train_off = [np.zeros(0) for _ in self.horizons_s]  # base - value now
        self.models = [HorizonModel() for _ in self.horizons_s]
        self._refits = 0
        self.appended = [0 for _ in self.horizons_s]  # training rows ever collected, per horizon

    # -- state ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "series": self.series.to_dict(),
            "cycle": self.cycle,
            "interval_s": self.interval_s,
            "steps": list(self.steps),
            "pending": {
                str(c): {"names": names.tolist(), "x": pack(x), "base": pack(base)}
                for c, (names, x, base) in self.pending.items()
            },
            # The newest training rows only: a state file is written often, and after a
            # restart the models refit on what was kept.
            "train_x": [pack(x[-PERSIST_ROWS:]) for x in self.train_x],
            "train_y": [pack(y[-PERSIST_ROWS:]) for y in self.train_y],
            "train_off": [pack(o[-PERSIST_ROWS:]) for o in self.train_off],
            "models": [m.to_dict() for m in self.models],
            "refits": self._refits,
            "appended": self.appended,
        }

    def load_dict(self, data: Mapping[str, Any]) -> None:
        self.series.load_dict(data.get("series", {}))
        self.cycle = int(data.get("cycle", 0))
        interval = data.get("interval_s")
        self.interval_s = None if interval is None else float(interval)
        self.steps = tuple(int(s) for s in data.get("steps", self.steps))
        self.pending = {
            int(c): (
                np.asarray(v["names"], dtype=np.str_),
                unpack(v["x"]).reshape(-1, self.n_features),
                unpack(v["base"]),
            )
            for c, v in data.get("pending", {}).items()
        }
        self.train_x = [unpack(x).reshape(-1, self.n_features) for x in data["train_x"]]
        self.train_y = [unpack(y) for y in data["train_y"]]
        self.train_off = [unpack(o) for o in data["train_off"]]
        self._refits = int(data.get("refits", 0))
        self.appended = [int(a) for a in data.get("appended", [0] * len(self.horizons_s))]
        # Fitted models are not persisted: refit each on the rows kept.
        self.models = [HorizonModel() for _ in self.horizons_s]
        for i in range(len(self.horizons_s)):
            self._refit(i)

    # -- per cycle --------------------------------------------------------------------------------

    def _windows(self, slots: IntArray) -> FloatArray:
        """Each series' last WINDOW values, oldest first."""
        cols = self.series.cols
        order = [(self.cycle - WINDOW + 1 + j) % WINDOW for j in range(WINDOW)]
        return np.column_stack([cols[f"h{k}"][slots] for k in order])

    def update(
        self,
        names: npt.NDArray[np.str_],
        values: FloatArray,
        scale: FloatArray,
        exog: FloatArray | None,
        interval_s: float | None,
        base: FloatArray | None = None,
    ) -> PanelForecast:
        """Record this cycle's value of each series, learn, and forecast each horizon.

        Values are modelled in units of `scale` (e.g. watts over the node's capacity), so one
        model serves series of any size; forecasts come back in the caller's units. `base`: the
        noise-free level now where the caller knows it (else the value)."""
        m = names.shape[0]
        h = len(self.horizons_s)
        if interval_s is not None and (
            self.interval_s is None or abs(interval_s - self.interval_s) > 0.25 * self.interval_s
        ):
            self._reset_training(interval_s)
        self.cycle += 1
        slot = self.series.slots(names)
        with np.errstate(invalid="ignore", divide="ignore"):
            norm = np.where(scale > 0, values / scale, np.nan)
            base_n = norm if base is None else np.where(scale > 0, base / scale, np.nan)
        base_n = np.where(np.isfinite(base_n), base_n, norm)
        column = self.series.cols[f"h{self.cycle % WINDOW}"]
        column[:] = np.nan  # series not seen this cycle: a gap
        column[slot] = norm
        x = lag_features(self._windows(slot), exog)
        x = np.column_stack([x, base_n - norm])
        self._collect_targets(names, norm)
        self._sample_rows(names, norm, base_n, x)
        if self.interval_s is not None:
            every = max(1, self.refit_cycles // max(h, 1))
            if self.cycle % every == 0:
                self._refit(self._refits % h)
                self._refits += 1
        point = np.empty((m, h))
        lo = np.empty((m, h))
        hi = np.empty((m, h))
        for i, model in enumerate(self.models):
            forecast = predict(model, norm, base_n, x)
            point[:, i] = forecast * scale
            lo[:, i] = (forecast + model.q_lo) * scale
            hi[:, i] = (forecast + model.q_hi) * scale
        return PanelForecast(point, lo, hi, tuple(m.method for m in self.models))

    def _reset_training(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.steps = tuple(max(1, round(hs / interval_s)) for hs in self.horizons_s)
        self.pending.clear()
        self.train_x = [np.zeros((0, self.n_features)) for _ in self.horizons_s]
        self.train_y = [np.zeros(0) for _ in self.horizons_s]
        self.train_off = [np.zeros(0) for _ in self.horizons_s]
        self.models = [HorizonModel() for _ in self.horizons_s]
        self.appended = [0 for _ in self.horizons_s]

    def _sample_rows(
        self, names: npt.NDArray[np.str_], norm: FloatArray, base: FloatArray, x: FloatArray
    ) -> None:
        if self.interval_s is None:
            return
        ok = np.flatnonzero(np.isfinite(norm))
        if ok.size == 0:
            return
        take = min(ok.size, self.series_per_cycle)
        rows = np.sort(self.rng.choice(ok, size=take, replace=False))
        self.pending[self.cycle] = (names[rows], x[rows], base[rows])

    def _collect_targets(self, names: npt.NDArray[np.str_], norm: FloatArray) -> None:
        if not self.pending or names.size == 0:
            return
        order = np.argsort(names)
        sorted_names = names[order]
        for i, step in enumerate(self.steps):
            entry = self.pending.get(self.cycle - step)
            if entry is None:
                continue
            pnames, px, pbase = entry
            pos = np.clip(np.searchsorted(sorted_names, pnames), 0, names.size - 1)
            found = sorted_names[pos] == pnames
            later = np.where(found, norm[order[pos]], np.nan)
            target = later - pbase
            offset = pbase - px[:, 0]
            good = np.isfinite(target) & np.isfinite(offset)
            if good.any():
                keep = -self.train_rows
                self.train_x[i] = np.concatenate([self.train_x[i], px[good]])[keep:]
                self.train_y[i] = np.concatenate([self.train_y[i], target[good]])[keep:]
                self.train_off[i] = np.concatenate([self.train_off[i], offset[good]])[keep:]
                self.appended[i] += int(good.sum())
        oldest = self.cycle - max(self.steps)
        for c in [c for c in self.pending if c <= oldest]:
            del self.pending[c]

    def _refit(self, i: int, start: int = 0, end: int | None = None) -> None:
        leaf = int(np.clip(10 * self.steps[i], 40, 400))
        rows = slice(start, end)
        # Rows come a cycle's sample at a time: a horizon's worth is steps x that many.
        per_cycle = max(1, min(self.series_per_cycle, len(self.series)))
        self.models[i] = fit_horizon(
            self.train_x[i][rows],
            self.train_y[i][rows],
            self.train_off[i][rows],
            self.coverage,
            self.min_train_rows,
            self.seed + i,
            self.kind,
            # Rows h cycles apart overlap: long horizons have fewer independent rows.
            leaf=leaf,
            block_rows=self.steps[i] * per_cycle,
        )
        self.models[i].fit_end = self.appended[i]


# -- one series, for `ooda forecast` ---------------------------------------------------------------


def refit_points(n: int, first: int = 64, growth: float = 1.25, max_gap: int = 2000) -> list[int]:
    """Rows after which the model is refit: geometric at first, then at most every max_gap rows.
    A function of the row index only, so a prefix of a file is forecast exactly as the file."""
    points: list[int] = []
    r = first
    while r < n:
        points.append(r)
        r = min(math.ceil(r * growth), r + max_gap)
    return points


def forecast_series(
    values: FloatArray,
    horizon_steps: int,
    window_rows: int = 5000,
    min_rows: int = 50,
    kind: str = "hgb",
) -> FloatArray:
    """For each row i, the forecast of row i + H from rows <= i (causal).

    Until enough history exists, and wherever the model does not beat persistence on its
    most recent training rows, the forecast is the last value (persistence)."""
    check_model(kind)
    y = np.asarray(values, dtype=np.float64)
    n = y.shape[0]
    h = int(horizon_steps)
    if n == 0:
        return np.zeros(0)
    padded = np.concatenate([np.full(WINDOW - 1, np.nan), y])
    windows = np.lib.stride_tricks.sliding_window_view(padded, WINDOW)
    feats = lag_features(np.ascontiguousarray(windows))
    out = y.copy()
    target = np.full(n, np.nan)
    if h < n:
        target[: n - h] = y[h:] - y[: n - h]
    zero = np.zeros(n)
    points = refit_points(n)
    for k, r in enumerate(points):
        # At row r the targets of rows j <= r - h are known.
        last = r - h
        if last < min_rows:
            continue
        lo = max(0, last + 1 - window_rows)
        model = fit_horizon(
            feats[lo : last + 1],
            target[lo : last + 1],
            zero[lo : last + 1],
            0.9,
            min_rows,
            0,
            kind,
            block_rows=h,
        )
        end = points[k + 1] if k + 1 < len(points) else n
        out[r:end] = predict(model, y[r:end], y[r:end], feats[r:end])
    return out

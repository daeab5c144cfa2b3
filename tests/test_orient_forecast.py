"""Forecasts: causal, compared with persistence (and falling back to it), intervals that
cover, and the Orienter's forecast in the loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.orient.forecast import PanelForecaster, clearly_better, forecast_series
from agent.orient.orienter import FleetScore, Orienter
from tests.conftest import make_snapshot


def ar_series(n: int, seed: int, phi: float = 0.9) -> np.ndarray:
    """Mean-reverting around 100: the change ahead is predictable from the level."""
    rng = np.random.default_rng(seed)
    y = np.empty(n)
    y[0] = 100.0
    for i in range(1, n):
        y[i] = 100.0 + phi * (y[i - 1] - 100.0) + rng.normal(0, 2.0)
    return y


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a - b)))


def test_the_model_beats_persistence_where_there_is_something_to_learn() -> None:
    y = ar_series(3000, seed=1, phi=0.8)
    h = 5
    f = forecast_series(y, h)
    tail = np.arange(1500, len(y) - h)
    # The best possible here (the AR(1) mean) is about 0.82 of persistence's error.
    assert mae(f[tail], y[tail + h]) < 0.9 * mae(y[tail], y[tail + h])


def test_it_falls_back_to_persistence_where_there_is_not() -> None:
    rng = np.random.default_rng(2)
    walk = np.cumsum(rng.normal(0, 1, 3000))  # a random walk: persistence is optimal
    h = 3
    f = forecast_series(walk, h)
    tail = np.arange(1000, len(walk) - h)
    assert mae(f[tail], walk[tail + h]) <= 1.03 * mae(walk[tail], walk[tail + h])
    assert np.mean(f[tail] == walk[tail]) > 0.5  # mostly persistence itself


def test_forecast_is_causal() -> None:
    y = ar_series(700, seed=3)
    full = forecast_series(y, 4)
    for cut in (1, 65, 200, 523):
        assert np.array_equal(forecast_series(y[:cut], 4), full[:cut])


@settings(max_examples=15, deadline=None)
@given(
    values=st.lists(
        st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False), min_size=1, max_size=160
    ),
    horizon=st.integers(1, 10),
    cut=st.integers(1, 160),
)
def test_forecast_prefix_property(values: list[float], horizon: int, cut: int) -> None:
    y = np.asarray(values)
    cut = min(cut, len(values))
    assert np.array_equal(forecast_series(y[:cut], horizon), forecast_series(y, horizon)[:cut])


def test_panel_intervals_cover_and_state_round_trips() -> None:
    rng = np.random.default_rng(4)
    series = 40
    names = np.array([f"node{i}" for i in range(series)])
    level = np.full(series, 0.5)
    panel = PanelForecaster(
        horizons_s=(15.0, 60.0), refit_cycles=20, min_train_rows=100, series_per_cycle=series
    )
    inside, total = 0, 0
    pending: list[tuple[int, np.ndarray, np.ndarray]] = []
    for cycle in range(400):
        level = 0.5 + 0.8 * (level - 0.5) + rng.normal(0, 0.03, series)
        out = panel.update(names, level * 1000.0, np.full(series, 1000.0), None, 15.0)
        if cycle > 250:
            pending.append((cycle + 4, out.lo[:, 1].copy(), out.hi[:, 1].copy()))
        for _due, lo, hi in [p for p in pending if p[0] == cycle]:
            inside += int(((level * 1000 >= lo) & (level * 1000 <= hi)).sum())
            total += series
    assert panel.models[1].method != "persistence"  # mean reversion is there to learn
    assert 0.8 <= inside / total <= 0.97
    state = json.loads(json.dumps(panel.to_dict()))
    restored = PanelForecaster(
        horizons_s=(15.0, 60.0), refit_cycles=20, min_train_rows=100, series_per_cycle=series
    )
    restored.load_dict(state)
    # The newest training rows are kept and the models refit on them: a restart forecasts
    # about as before, without writing every row at every save.
    assert all(
        y.shape[0] == min(1000, panel.train_y[i].shape[0]) for i, y in enumerate(restored.train_y)
    )
    a = panel.update(names, level * 1000.0, np.full(series, 1000.0), None, 15.0)
    b = restored.update(names, level * 1000.0, np.full(series, 1000.0), None, 15.0)
    assert b.methods[1] != "persistence"
    assert np.isfinite(b.point).all()
    assert np.mean(np.abs(a.point - b.point)) < 30.0  # within the series' own noise (sd 30)


def test_the_orienter_forecasts_fleet_and_nodes_with_intervals() -> None:
    orienter = Orienter()
    rng = np.random.default_rng(5)
    sit = None
    for k in range(30):
        power = list(500 + 20 * rng.standard_normal(8))
        sit = orienter.orient(make_snapshot(power, time_s=15.0 * k), None)
    assert sit is not None and sit.forecast is not None
    f = sit.forecast
    assert f.horizons_s == (60.0, 300.0, 900.0)
    assert f.node_w is not None and f.node_w.shape == (2, 3)
    assert f.node_temp_c is not None and f.node_temp_c.shape == (2, 3)
    assert np.all(f.fleet_lo_w <= f.fleet_w) and np.all(f.fleet_w <= f.fleet_hi_w)
    assert len(f.fleet_methods) == 3 and f.method in ("persistence", "level+nodes", "mixed")
    point, lo, hi = f.at(300.0)
    assert lo <= point <= hi


def scored_fleet(persistence_err: np.ndarray, summed_err: np.ndarray) -> FleetScore:
    """A FleetScore (one horizon, one cycle ahead) whose candidates made these errors."""
    score = FleetScore(n_horizons=1, coverage=0.9)
    for k in range(persistence_err.size + 1):
        score.realize(0.0)  # the actual is always 0 W: a candidate's error is minus its value
        if k < persistence_err.size:
            wide = np.array([1e9])  # the interval given (its misses are another test's)
            score.record(np.array([[-persistence_err[k]], [-summed_err[k]]]), (1,), -wide, wide)
    return score


def test_the_fleet_uses_the_nodes_sum_unless_persistence_beats_it_by_two_standard_errors() -> None:
    """The nodes' sum already won on many series' held-out rows: one series' recent errors must
    show more than a lucky run of persistence before the fleet falls back to it."""
    rows = 240
    summed = np.full(rows, 10.0)
    sign = np.where(np.arange(rows) % 2 == 0, 1.0, -1.0)

    def persistence_gain(spread_w: float) -> np.ndarray:
        """Persistence's errors: 2% better than the sum on average, by `spread_w` either way."""
        return summed - (0.2 + spread_w * sign)

    assert scored_fleet(summed * 1.1, summed).choose()[0][0] == 1  # the sum wins
    assert scored_fleet(summed, summed).choose()[0][0] == 1  # a tie keeps the sum
    # 2% better at about 6 standard errors: persistence.
    choice, lo, hi = scored_fleet(persistence_gain(0.5), summed).choose()
    assert choice[0] == 0 and lo[0] < hi[0]
    # 2% better at about 1.5 standard errors: clear at one, not at two.
    lucky = persistence_gain(2.07)
    assert clearly_better(lucky, summed, 1) and not clearly_better(lucky, summed, 1, z=2.0)
    assert scored_fleet(lucky, summed).choose()[0][0] == 1
    # Until 30 forecasts have come due: persistence, with no interval of its own yet.
    choice, lo, hi = scored_fleet(summed[:20] * 1.1, summed[:20]).choose()
    assert choice[0] == 0 and np.isnan(lo[0]) and np.isnan(hi[0])


def test_fleet_scores_saved_for_other_candidates_start_afresh() -> None:
    """A state saved when the fleet scored three candidates (persistence, level, level+nodes)
    and kept no intervals must not be read as this version's."""
    score = scored_fleet(np.full(100, 11.0), np.full(100, 10.0))
    state = json.loads(json.dumps(score.to_dict()))
    restored = FleetScore(n_horizons=1, coverage=0.9)
    restored.load_dict(state)
    assert restored.errors == score.errors and restored.pending == score.pending
    assert restored.left_out == score.left_out
    assert score.left_out[0] > 0.11  # every (wide) interval held: the share left out grew
    assert restored.choose()[0][0] == 1
    del state["left_out"]
    state["errors"].insert(1, state["errors"][0])
    state["pending"] = {c: [v[0], v[0], v[1]] for c, v in state["pending"].items()}
    older = FleetScore(n_horizons=1, coverage=0.9)
    older.load_dict(state)
    assert older.errors == [[[]], [[]]] and older.pending == {}
    assert older.left_out == [pytest.approx(0.1)]
    assert older.cycle == score.cycle and older.steps == (1,)


def test_fleet_intervals_adapt_until_they_miss_as_often_as_promised() -> None:
    """Errors that keep growing: the last 240 always understate the next, so their quantiles
    alone miss far more than 10% of the time. Adapting the share left out after every miss
    brings the misses back to about 10%."""

    def miss_rate(adapt_rate: float) -> float:
        score = FleetScore(n_horizons=1, coverage=0.9, adapt_rate=adapt_rate)
        rng = np.random.default_rng(7)
        given: tuple[float, float] | None = None
        misses = []
        for k in range(3000):
            actual = rng.normal(0.0, np.exp(k / 300.0))
            if given is not None and k >= 1000:
                misses.append(not given[0] <= actual <= given[1])
            score.realize(actual)
            _, lo, hi = score.choose()
            lo = np.where(np.isfinite(lo), lo, -1.0)  # as the orienter's spread, before any
            hi = np.where(np.isfinite(hi), hi, 1.0)
            score.record(np.zeros((2, 1)), (1,), lo, hi)  # both candidates say 0
            given = (float(lo[0]), float(hi[0]))
        return float(np.mean(misses))

    assert miss_rate(0.0) > 0.15
    assert miss_rate(0.002) == pytest.approx(0.1, abs=0.02)


def test_a_model_must_win_clearly_not_in_a_few_lucky_blocks() -> None:
    """Rows a horizon apart share their future: a gain made in one block of ten is luck."""
    rng = np.random.default_rng(6)
    old = rng.normal(0.0, 10.0, 4000)
    assert clearly_better(0.9 * old, old, block_rows=400)  # better everywhere
    lucky = old * np.where(np.arange(old.size) < 400, 0.5, 1.01)
    assert np.mean(np.abs(lucky)) < 0.97 * np.mean(np.abs(old))  # better on average ...
    assert not clearly_better(lucky, old, block_rows=400)  # ... in one block only
    assert clearly_better(lucky, old, block_rows=1)  # what counting every row would conclude
    assert not clearly_better(old, old, block_rows=400)


def test_an_unknown_forecast_model_is_refused_by_name() -> None:
    import pytest
    from pydantic import ValidationError

    from agent.config import parse_config
    from agent.core.errors import ConfigError
    from agent.orient.forecast import _new_regressor
    from agent.orient.settings import ForecastSettings

    # "huber" was once accepted, and silently built gradient-boosted trees: refused now, with
    # the field named, as any unknown model is (the documented ones: hgb, ridge).
    with pytest.raises(ConfigError, match=r"orient\.forecast\.model"):
        parse_config({"orient": {"forecast": {"model": "huber"}}})
    with pytest.raises(ValidationError):
        ForecastSettings(model="huber")  # type: ignore[arg-type]
    for kind in ("huber", "HGB", ""):
        with pytest.raises(ValueError, match="unknown forecast model"):
            _new_regressor(kind, 0)
        with pytest.raises(ValueError, match="unknown forecast model"):
            PanelForecaster([60.0], model=kind)
    assert parse_config({"orient": {"forecast": {"model": "ridge"}}}).orient.forecast.model == (
        "ridge"
    )

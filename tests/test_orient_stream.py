"""The streaming event detector (agent.orient.stream): causal and columnar (a series alone or
beside others gives the same rows), one alarm per episode, level shifts adopted, daily rhythms
learned, heavy tails calibrated, a flat line's first move seen, its state kept under its key,
reset, rate-limited and saved."""

from __future__ import annotations

import numpy as np
import pytest

from agent.orient.stats import pack
from agent.orient.stream import StreamDetector, StreamParams, detect_series

STEP_S = 300.0


def noisy(n: int, seed: int = 0, level: float = 100.0, sd: float = 5.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(level, sd, n)


def times(n: int, step_s: float = STEP_S) -> np.ndarray:
    return 1_400_000_000.0 + step_s * np.arange(n)


def test_a_spike_opens_one_alarm_on_its_row_and_it_closes() -> None:
    x = noisy(800)
    x[600] += 80.0
    r = detect_series(times(800), x)
    assert np.flatnonzero(r.opened).tolist() == [600]
    assert r.p[600] < 1e-6 and r.score[600] == pytest.approx(1.0 - r.p[600])
    closes = np.flatnonzero(r.closed)
    calm = StreamParams().calm_rows
    assert closes.size == 1 and 600 + calm <= closes[0] <= 600 + calm + 10  # calm rows, then closed
    assert not r.alarm[closes[0] :].any()


def test_the_first_rows_only_teach() -> None:
    x = noisy(40)
    x[10] += 1000.0
    r = detect_series(times(40), x)
    assert (r.p[:30] == 1.0).all() and not r.opened.any()


def test_a_level_shift_is_one_alarm_then_the_new_normal() -> None:
    x = noisy(2000, seed=1)
    x[1000:] += 60.0  # 12 standard deviations, for good
    r = detect_series(times(2000), x)
    assert np.flatnonzero(r.opened).tolist() == [1000]
    changed = np.flatnonzero(r.changed)
    assert changed.size == 1 and 1000 < changed[0] <= 1000 + 100  # a bounded time
    assert not r.alarm[changed[0] :].any()
    # Afterwards the detector expects the new level.
    assert r.expected[-1] == pytest.approx(160.0, abs=5.0)


def daily(n: int, seed: int = 2) -> np.ndarray:
    """Work hours at 80, nights at 20 (a square wave over the day), with small noise."""
    t = times(n)
    hour = (t % 86_400.0) / 3600.0
    return np.where((hour >= 9) & (hour < 17), 80.0, 20.0) + noisy(n, seed, 0.0, 1.0)


def test_a_daily_rhythm_is_learned_and_a_missing_day_is_seen() -> None:
    per_day = int(86_400 / STEP_S)
    n = 12 * per_day
    x = daily(n)
    quiet = detect_series(times(n), x)
    late = slice(4 * per_day, n)
    assert not quiet.opened[late].any()  # every day's jumps are the rhythm, not anomalies
    missing = x.copy()
    day10 = slice(10 * per_day, 11 * per_day)
    missing[day10] = 20.0 + noisy(per_day, 3, 0.0, 1.0)  # the day's work never came
    r = detect_series(times(n), missing)
    assert r.opened[day10].any() and not r.opened[late][: 6 * per_day].any()


def test_a_weekly_rhythm_is_learned_and_a_missing_weekend_is_seen() -> None:
    """Hourly readings, a daily swing and weekends 40% lower, for ten weeks: once learned, the
    weekends are the rhythm; the one weekend that never came (week 8) is an anomaly."""
    step_s = 3600.0
    n = 24 * 7 * 10
    week_s = 7 * 86_400.0
    t = 1_400_000_000.0 - 1_400_000_000.0 % week_s + step_s * np.arange(n)
    dow = (np.floor(t / 86_400.0).astype(np.int64) + 3) % 7  # 0: Monday
    hour = (t % 86_400.0) / 3600.0
    week = np.arange(n) // (24 * 7)
    x = np.where((dow >= 5) & (week != 8), 60.0, 100.0) + 20.0 * np.sin(2 * np.pi * hour / 24.0)
    x = x + np.random.default_rng(11).normal(0.0, 2.0, n)
    r = detect_series(t, x)
    assert not r.opened[(week >= 2) & (week != 8)].any()
    missed = np.flatnonzero(r.opened & (week == 8))
    assert missed.size == 1 and dow[missed[0]] == 5  # on the Saturday that stayed a weekday


@pytest.mark.parametrize("shape", ["gauss", "pareto", "lognormal", "poisson", "random_walk"])
def test_the_tail_probability_is_calibrated_on_noise_of_any_shape(shape: str) -> None:
    """Pure noise, after the first 5,000 rows teach: rows with p < q are at most a share q of
    them (the probability holds, conservatively), and alarms open on at most a share alarm_p
    of the rows, whatever the shape: light tails, a power law of index 1.5 (big excursions are
    this series' normal life), skew, small counts, a wandering level."""
    rng = np.random.default_rng(4)
    n = 20_000
    x = {
        "gauss": lambda: rng.normal(100.0, 5.0, n),
        "pareto": lambda: 10.0 * (rng.pareto(1.5, n) + 1.0),
        "lognormal": lambda: np.exp(rng.normal(0.0, 1.0, n)),
        "poisson": lambda: rng.poisson(2.0, n).astype(np.float64),
        "random_walk": lambda: np.cumsum(rng.normal(0.0, 1.0, n)),
    }[shape]()
    r = detect_series(times(n), x)
    p = r.p[5000:]
    for q in (0.1, 0.01, 0.001):
        assert (p < q).mean() <= q, (q, (p < q).mean())
    assert r.opened[5000:].mean() <= StreamParams().alarm_p


def test_bursts_that_recur_are_learned_from_the_record_and_a_bigger_one_still_seen() -> None:
    """Heavy-tailed noise (many small exceedances, which shape the fitted tail) with a burst of
    about 40 scales every 500 rows: the fitted tail alone keeps calling each burst rare; the
    record of how far the exceedances went says they recur. A burst bigger than any seen
    before still opens an alarm."""
    rng = np.random.default_rng(3)
    n = 8000
    x = 100.0 + 5.0 * rng.standard_t(2.5, n)
    bursts = np.arange(300, n, 500)
    x[bursts] += 200.0 * rng.uniform(0.8, 1.2, bursts.size)
    x[7650] += 2000.0  # novel
    late = bursts[bursts > 4000]
    record = detect_series(times(n), x)
    fitted = detect_series(times(n), x, params=StreamParams(tail_record=False))
    assert (record.p >= fitted.p).all()  # the record only ever raises p
    assert record.opened[late].sum() < fitted.opened[late].sum() == late.size
    assert record.opened[7650] and fitted.opened[7650]


def test_a_flat_line_that_moves_is_seen() -> None:
    x = np.full(500, 45.0)
    x[400:] = 46.0
    r = detect_series(times(500), x)
    assert np.flatnonzero(r.opened).tolist() == [400]
    assert not r.opened[:400].any()


def test_causal_and_columnar_alone_or_together() -> None:
    """Series of different lengths side by side (rows past each one's end not valid) give
    exactly what each gives alone, and a prefix gives the prefix."""
    a, b = noisy(700, seed=6), daily(900, seed=7)
    a[500] += 60.0
    tb = times(900)
    ta = times(700, step_s=60.0)
    x = np.full((900, 2), np.nan)
    t = np.full((900, 2), np.nan)
    x[:700, 0], t[:700, 0] = a, ta
    x[:, 1], t[:, 1] = b, tb
    valid = np.isfinite(x)
    both = detect_series(t, x, valid)
    alone_a = detect_series(ta, a)
    alone_b = detect_series(tb, b)
    np.testing.assert_array_equal(both.p[:700, 0], alone_a.p)
    np.testing.assert_array_equal(both.opened[:700, 0], alone_a.opened)
    np.testing.assert_array_equal(both.p[:, 1], alone_b.p)
    prefix = detect_series(tb[:450], b[:450])
    np.testing.assert_array_equal(prefix.p, alone_b.p[:450])


def test_state_follows_its_key_and_reset_forgets() -> None:
    det = StreamDetector(StreamParams(rhythm=False))
    keys = np.array(["a", "b", "c"])
    rng = np.random.default_rng(8)
    for i in range(200):
        det.align(keys)
        det.update(np.array([10.0, 100.0, 1000.0]) + rng.normal(0, 1, 3), np.full(3, 15.0 * i))
    level_b = det.state["level_baseline"][1].copy()
    moved = np.array(["c", "new", "b"])  # a removed, a new one, the others moved
    det.align(moved)
    np.testing.assert_array_equal(det.state["level_baseline"][2], level_b)
    assert det.state["rows"][1] == 0 and det.state["rows"][2] == 200
    tails = det.state["tail_rate"][2].copy()
    det.reset(np.array([False, False, True]), keep_calibration=True)
    assert det.state["rows"][2] == 0
    np.testing.assert_array_equal(det.state["tail_rate"][2], tails)


def test_the_alarm_budget_holds_alarms_back() -> None:
    x = noisy(3000, seed=9)
    x[1000::100] += 80.0  # a spike every 100 rows (8 h at 5 minutes)
    free = detect_series(times(3000), x, params=StreamParams(adopt_rows=0))
    capped = detect_series(times(3000), x, params=StreamParams(alarms_per_day=1.0, alarm_burst=1.0))
    assert free.opened.sum() > capped.opened.sum()
    # At most one a day (288 rows) after the first.
    opens = np.flatnonzero(capped.opened)
    assert (np.diff(opens) >= 288 - 1).all()


def test_saved_state_continues() -> None:
    x = noisy(600, seed=10)
    x[500] += 70.0
    t = times(600)
    one = StreamDetector(StreamParams(), 1)
    for i in range(300):
        one.update(x[i : i + 1], t[i : i + 1])
    saved = one.to_dict()
    two = StreamDetector(StreamParams(), 1)
    two.load_dict(saved)
    for i in range(300, 600):
        a = one.update(x[i : i + 1], t[i : i + 1])
        b = two.update(x[i : i + 1], t[i : i + 1])
        assert a.p[0] == pytest.approx(b.p[0], rel=2e-3)  # (tails saved in half precision)
        assert a.opened[0] == b.opened[0]
    other = StreamDetector(StreamParams(alarm_p=1e-6), 1)
    other.load_dict(saved)  # learned under other settings: ignored, starts afresh
    assert other.state["rows"][0] == 0


def test_a_state_saved_with_a_field_no_longer_kept_loads() -> None:
    one = StreamDetector(StreamParams(), 1)
    x, t = noisy(100, seed=11), times(100)
    for i in range(100):
        one.update(x[i : i + 1], t[i : i + 1])
    saved = one.to_dict()
    saved["state"]["open_rows"] = pack(np.zeros(1), "float32")  # as earlier versions kept
    two = StreamDetector(StreamParams(), 1)
    two.load_dict(saved)
    assert two.state["rows"][0] == 100

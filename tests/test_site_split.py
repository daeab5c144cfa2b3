"""The site's split of its limits among clusters (agent.site.tree): never more than any limit on
a path, floors first, and as good as the linear program over the same concave curves."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from agent.site.curve import DemandCurve
from agent.site.tree import (
    GRANT_RESOLUTION_W,
    LimitTree,
    TreeError,
    grants_fit,
    proportional_split,
    split,
    stage_increases,
)


def curve(floor_w: float, widths: list[float], slopes: list[float]) -> DemandCurve:
    """A concave curve from its floor, piece widths and (any order of) slopes."""
    slopes = sorted(slopes, reverse=True)
    power = [floor_w]
    value = [0.0]
    for width, slope in zip(widths, slopes, strict=True):
        power.append(power[-1] + width)
        value.append(value[-1] + width * slope)
    return DemandCurve(power_w=tuple(power), value=tuple(value))


def tree_two_feeds(site_w: float = 1000.0) -> LimitTree:
    return LimitTree.build(
        "site",
        site_w,
        {"feed-a": (700.0, None), "feed-b": (600.0, None)},
        {"c1": (None, "feed-a"), "c2": (400.0, "feed-a"), "c3": (None, "feed-b")},
    )


def test_steepest_watts_go_first_within_each_limit() -> None:
    tree = tree_two_feeds()
    curves = {
        "c1": curve(100.0, [400.0], [0.001]),  # buys little per watt
        "c2": curve(100.0, [400.0], [0.010]),  # buys much, but its own limit is 400 W
        "c3": curve(100.0, [600.0], [0.005]),
    }
    result = split(tree, curves)
    assert result.feasible
    # c2 up to its own 400 W; c3 next, up to its feed's 600 W, but the site has 1000 W:
    # c1 keeps its floor of 100 W, c2 400 W, c3 the remaining 500 W.
    assert result.grants_w == {"c1": 100.0, "c2": 400.0, "c3": 500.0}
    assert grants_fit(tree, result.grants_w)


def test_floors_that_do_not_fit_are_shared_and_the_split_says_so() -> None:
    tree = tree_two_feeds(site_w=300.0)
    curves = {c: curve(200.0, [100.0], [0.01]) for c in ("c1", "c2", "c3")}
    result = split(tree, curves)
    assert not result.feasible
    assert sum(result.grants_w.values()) <= 300.0
    assert set(result.short) == {"c1", "c2", "c3"}
    assert all(w == pytest.approx(100.0, abs=1.0) for w in result.grants_w.values())


def test_fixed_draws_count_first() -> None:
    tree = tree_two_feeds()
    curves = {"c1": curve(50.0, [1000.0], [0.01]), "c3": curve(50.0, [1000.0], [0.01])}
    result = split(tree, curves, fixed_w={"c2": 400.0})
    assert grants_fit(tree, result.grants_w, {"c2": 400.0})
    assert result.grants_w["c1"] <= 300.0  # feed-a's 700 W less c2's 400 W


def test_a_cycle_or_an_unknown_feed_is_refused() -> None:
    with pytest.raises(TreeError, match="cycle"):
        LimitTree.build("s", 10.0, {"a": (5.0, "b"), "b": (5.0, "a")}, {"c": (None, "a")})
    with pytest.raises(TreeError, match="no such feed 'x'"):
        LimitTree.build("s", 10.0, {}, {"c": (None, "x")})
    with pytest.raises(TreeError, match="more than 0"):
        LimitTree.build("s", 10.0, {"a": (0.0, None)}, {"c": (None, "a")})


def test_increases_wait_for_decreases_to_be_confirmed() -> None:
    tree = tree_two_feeds()
    held = {"c1": 500.0, "c2": 100.0, "c3": 400.0}  # what each may still draw
    target = {"c1": 100.0, "c2": 400.0, "c3": 500.0}
    staged = stage_increases(tree, target, held)
    assert staged["c1"] == 100.0  # a decrease goes out at once
    # Counted at what they hold, c1 and c2 leave feed-a 100 W and the site 0 W of room:
    # the increases wait (c2 stays at 100 W, c3 at 400 W) until c1 confirms.
    assert staged["c2"] == 100.0 and staged["c3"] == 400.0
    worst = {c: max(staged[c], held[c]) for c in held}
    assert grants_fit(tree, worst)
    confirmed = stage_increases(tree, target, {**held, "c1": 100.0})
    assert confirmed == target


def test_static_split_by_size() -> None:
    tree = tree_two_feeds()
    static = proportional_split(tree, {"c1": 64.0, "c2": 32.0, "c3": 32.0})
    assert grants_fit(tree, static)
    assert static["c1"] == pytest.approx(2 * static["c2"], abs=1.0)


# -- properties ------------------------------------------------------------------------------

watts = st.floats(min_value=1.0, max_value=5000.0, allow_nan=False)


@st.composite
def sites(draw: st.DrawFn) -> tuple[LimitTree, dict[str, DemandCurve], dict[str, float]]:
    n_feeds = draw(st.integers(0, 3))
    feeds: dict[str, tuple[float, str | None]] = {}
    for i in range(n_feeds):
        parent = draw(st.sampled_from([None, *feeds])) if feeds else None
        feeds[f"f{i}"] = (draw(watts), parent)
    n_clusters = draw(st.integers(1, 5))
    clusters: dict[str, tuple[float | None, str | None]] = {}
    curves: dict[str, DemandCurve] = {}
    for i in range(n_clusters):
        own = draw(st.one_of(st.none(), watts))
        feed = draw(st.sampled_from([None, *feeds]))
        clusters[f"c{i}"] = (own, feed)
        pieces = draw(st.integers(0, 5))
        curves[f"c{i}"] = curve(
            draw(st.floats(0.0, 1000.0)),
            draw(st.lists(st.floats(1.0, 2000.0), min_size=pieces, max_size=pieces)),
            draw(st.lists(st.floats(0.0, 1.0), min_size=pieces, max_size=pieces)),
        )
    tree = LimitTree.build("site", draw(watts), feeds, clusters)
    fixed = {
        c: draw(st.floats(0.0, 500.0))
        for c in clusters
        if draw(st.booleans()) and len(clusters) > 1 and c != "c0"
    }
    return tree, curves, fixed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sites())
def test_never_more_than_any_limit_on_a_path(
    site: tuple[LimitTree, dict[str, DemandCurve], dict[str, float]],
) -> None:
    tree, curves, fixed = site
    live = {c: k for c, k in curves.items() if c not in fixed}
    result = split(tree, live, fixed)
    assert all(w >= 0 for w in result.grants_w.values())
    room_left = {n: tree.nodes[n].limit_w - s for n, s in tree.sums(fixed).items()}
    if min(room_left.values()) >= 0:
        # Fixed draws that fit leave grants that fit with them.
        assert grants_fit(tree, result.grants_w, fixed), tree.over({**fixed, **result.grants_w})
    else:
        # Fixed draws over a limit already: nothing more is granted under it.
        for node, left in room_left.items():
            if left < 0:
                assert all(result.grants_w.get(c, 0.0) == 0.0 for c in tree.under(node))
    for c, w in result.grants_w.items():
        assert w <= curves[c].ceiling_w + 1e-6
        if result.feasible:
            assert w >= curves[c].floor_w - GRANT_RESOLUTION_W


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sites())
def test_as_good_as_the_linear_program(
    site: tuple[LimitTree, dict[str, DemandCurve], dict[str, float]],
) -> None:
    tree, curves, _ = site
    result = split(tree, curves)
    if not result.feasible:
        return
    # Variables: one per curve piece; floors are fixed at their value.
    pieces = [(c, w, s) for c in tree.clusters for w, s in curves[c].segments()]
    if not pieces:
        return
    floors = tree.sums({c: curves[c].floor_w for c in tree.clusters})
    nodes = list(tree.nodes)
    a_ub = np.zeros((len(nodes), len(pieces)))
    for j, (c, _w, _s) in enumerate(pieces):
        for node in tree.paths[c]:
            a_ub[nodes.index(node), j] = 1.0
    b_ub = np.array([tree.nodes[n].limit_w - floors[n] for n in nodes])
    finite = np.isfinite(b_ub)
    lp = linprog(
        -np.array([s for _c, _w, s in pieces]),
        A_ub=a_ub[finite],
        b_ub=b_ub[finite],
        bounds=[(0.0, w) for _c, w, _s in pieces],
        method="highs",
    )
    assert lp.status == 0
    best = sum(curves[c].value[0] for c in tree.clusters) - lp.fun
    # Rounding each grant down to a watt costs at most a watt of its steepest piece.
    rounding = sum(max((s for _w, s in curves[c].segments()), default=0.0) for c in curves)
    assert result.value >= best - rounding * GRANT_RESOLUTION_W - 1e-6


@settings(max_examples=200, deadline=None)
@given(sites(), st.data())
def test_staged_grants_fit_with_what_is_still_held(
    site: tuple[LimitTree, dict[str, DemandCurve], dict[str, float]], data: st.DataObject
) -> None:
    tree, curves, _ = site
    target = split(tree, curves)
    if not target.feasible:
        return
    # What the clusters may still draw: an earlier split (under another site limit) that fit.
    frac = data.draw(st.floats(0.1, 1.0))
    earlier = split(tree.with_limits({tree.root: frac * tree.nodes[tree.root].limit_w}), curves)
    held = {
        c: min(earlier.grants_w[c], data.draw(st.floats(0.0, earlier.grants_w[c] + 1.0)))
        for c in earlier.grants_w
    }
    staged = stage_increases(tree, target.grants_w, held)
    assert grants_fit(tree, {c: max(staged[c], held[c]) for c in staged})
    for c in staged:
        assert staged[c] <= max(target.grants_w[c], held[c]) + 1e-9

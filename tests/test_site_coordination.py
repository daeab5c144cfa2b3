"""The site's coordination in one process, on a fake clock and the in-memory store (the same
contract as etcd; tests/integration/test_site_real.py runs it on a real etcd): leader election
and its failsafe, grants and their leases, the coordinator's rounds, demand response, and an
agent's loop under its grant."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent.assembly import twin_agent
from agent.core.clock import FakeClock
from agent.core.errors import ConfigError
from agent.core.situation import LARGEST_BUILTIN_MAX_CAP_W
from agent.core.snapshot import Snapshot
from agent.orient.orienter import Orienter
from agent.sim.twin import Twin, TwinSpec
from agent.site.coordinator import (
    Coordinator,
    RoundReport,
    SitePlan,
    fallback_shares,
)
from agent.site.curve import CurveError, DemandCurve, build_curve, curve_inputs
from agent.site.demand import DemandError, DemandEvent, load_schedule, site_target
from agent.site.election import Elector
from agent.site.grants import Grant, GrantKeeper
from agent.site.link import LinkSettings, SiteLink
from agent.site.service import site_plan as service_site_plan
from agent.site.settings import parse_site_config
from agent.site.store import LeaseLostError, MemoryStore, StoreUnavailableError
from agent.site.tree import LimitTree
from policies.registry import builtin_registry
from tests.conftest import make_snapshot

PREFIX = "/ooda/sites/hall"


class Refuser:
    """A peer that never gives its word (unreachable)."""

    def ping(self, url: str, leader: str, ttl_s: float) -> str | None:
        return "unreachable (ConnectError)"


# -- the store -------------------------------------------------------------------------------


def test_memory_store_leases_expire_and_outages_raise() -> None:
    clock = FakeClock(0.0)
    store = MemoryStore(clock)
    lease = store.lease(5)
    store.put("/a/x", "1", lease)
    assert store.create("/a/y", "2") and not store.create("/a/y", "3")
    changed: list[int] = []
    store.watch_prefix("/a/", lambda: changed.append(1))
    clock.advance(6)
    store.tick()
    assert store.get("/a/x") is None and store.get("/a/y") == "2" and changed
    with pytest.raises(LeaseLostError):
        store.refresh(lease)
    store.available = False
    with pytest.raises(StoreUnavailableError):
        store.get("/a/y")


# -- election --------------------------------------------------------------------------------


def elector(store: MemoryStore, clock: FakeClock, name: str, **kw: object) -> Elector:
    return Elector(store, prefix=f"{PREFIX}/clusters/c1", member=name, ttl_s=6, mono=clock, **kw)  # type: ignore[arg-type]


def test_one_leader_and_a_standby_that_takes_over_after_the_lease() -> None:
    clock = FakeClock(0.0)
    store = MemoryStore(clock)
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    a.step()
    b.step()
    assert a.view().may_act and a.view().role == "leader"
    assert not b.view().may_act and b.view().leader == "a"
    # a dies (stops renewing): it would stop acting before etcd ends its lease...
    clock.advance(5.5)
    assert not a.view().may_act
    b.step()
    assert not b.view().may_act  # ...and the key is still a's until then
    clock.advance(1.0)
    b.step()
    assert b.view().may_act and b.view().leader == "b"


def test_a_clean_stop_hands_over_at_once() -> None:
    clock = FakeClock(0.0)
    store = MemoryStore(clock)
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    a.step()
    b.step()
    a.resign()
    b.step()
    assert b.view().may_act


def test_etcd_outage_a_lone_leader_leads_on_and_says_so() -> None:
    clock = FakeClock(0.0)
    store = MemoryStore(clock)
    a = elector(store, clock, "a")
    a.step()
    store.available = False
    clock.advance(10.0)
    a.step()
    view = a.view()
    assert view.may_act and view.role == "failsafe_leader"
    assert view.problem is not None and "etcd unreachable" in view.problem
    assert "no other replica" in view.problem


def test_etcd_outage_a_leader_whose_standby_cannot_be_asked_stops_acting() -> None:
    clock = FakeClock(0.0)
    store = MemoryStore(clock)
    a = elector(store, clock, "a", pinger=Refuser(), peer_url="http://a")
    b = elector(store, clock, "b", peer_url="http://b")
    a.step()
    b.step()
    a.step()  # a sees b registered
    store.available = False
    clock.advance(10.0)
    a.step()
    view = a.view()
    assert not view.may_act and view.role == "unconfirmed"
    assert view.problem is not None and "replica b" in view.problem


def test_a_standby_that_gave_its_word_does_not_campaign() -> None:
    clock = FakeClock(0.0)
    store = MemoryStore(clock)
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    a.step()
    b.step()
    clock.advance(3.0)
    b.step()
    assert b.promise("a")  # until 9 s
    clock.advance(3.5)  # a's key is gone (its lease ended at 6 s), but b gave its word
    b.step()
    assert not b.view().may_act
    clock.advance(3.0)
    b.step()
    assert b.view().may_act
    assert not b.promise("a")  # a leader gives no word


# -- grants ----------------------------------------------------------------------------------


def test_a_grant_is_kept_through_its_lease_then_the_safe_share() -> None:
    wall, mono = FakeClock(1000.0), FakeClock(0.0)
    keeper = GrantKeeper("c1", 500.0, wall, mono)
    first = keeper.view()
    assert first.watts == 500.0 and first.problem is not None and "no grant" in first.problem
    assert keeper.offer(Grant("c1", 800.0, 3, 1000.0, 60.0, fallback_w=400.0))
    assert not keeper.offer(Grant("c1", 900.0, 2, 1001.0, 60.0))  # older epoch
    assert not keeper.offer(Grant("c2", 900.0, 9, 1001.0, 60.0))  # another cluster's
    assert keeper.view().watts == 800.0 and keeper.view().problem is None
    wall.advance(30)
    mono.advance(30)
    kept = keeper.view("etcd unreachable for 30 s")
    assert kept.watts == 800.0 and kept.source == "grant_kept"
    assert kept.problem is not None and "keeping the grant of 800 W" in kept.problem
    wall.advance(31)
    mono.advance(31)
    lapsed = keeper.view("etcd unreachable for 61 s")
    assert lapsed.watts == 400.0 and lapsed.source == "safe_share"  # the grant's fallback
    assert lapsed.problem is not None and "lapsed" in lapsed.problem


def test_a_grant_ends_by_the_receivers_own_clock_too() -> None:
    # The coordinator's clock is ahead: by wall time the grant would hold 70 s, by receipt 60 s.
    wall, mono = FakeClock(1000.0), FakeClock(0.0)
    keeper = GrantKeeper("c1", 500.0, wall, mono)
    keeper.offer(Grant("c1", 800.0, 1, 1010.0, 60.0))
    mono.advance(61)
    wall.advance(61)
    assert keeper.view().watts == 500.0


def test_grant_and_curve_from_the_store_are_checked() -> None:
    with pytest.raises(CurveError, match="concave"):
        DemandCurve.from_json({"power_w": [0, 10, 20], "value": [0, 1, 5]})
    with pytest.raises(CurveError, match="finite"):
        DemandCurve.from_json({"power_w": [0, 1e400], "value": [0, 1]})
    with pytest.raises(ValueError, match="watts"):
        Grant.from_json({"cluster": "c", "watts": "x", "epoch": 1, "issued_unix": 0, "lease_s": 1})


# -- demand response -------------------------------------------------------------------------


def test_a_target_is_ramped_down_before_it_starts_and_up_after_it_ends() -> None:
    event = DemandEvent("shed", 1000.0, 600.0, 6000.0)
    assert site_target([event], 0.0, 10000.0, 10.0).limit_w == 10000.0
    ramping = site_target([event], 900.0, 10000.0, 10.0)
    assert ramping.limit_w == 7000.0 and ramping.phase == "ramping_down"
    assert site_target([event], 1300.0, 10000.0, 10.0).limit_w == 6000.0
    after = site_target([event], 1700.0, 10000.0, 10.0)
    assert after.limit_w == 7000.0 and after.phase == "ramping_up"


def test_a_schedule_file(tmp_path: Path) -> None:
    path = tmp_path / "dr.toml"
    path.write_text(
        '[[event]]\nid = "peak"\nstart = 2026-07-01T14:00:00Z\nduration_s = 3600\ntarget_w = 6e6\n'
    )
    (event,) = load_schedule(path)
    assert event.target_w == 6e6 and event.start_unix == 1782914400.0
    path.write_text('[[event]]\nid = "x"\nstart = 2026-07-01T14:00:00\nduration_s = 1\n'
                    "target_w = 1\n")  # fmt: skip
    with pytest.raises(DemandError, match=r"event\[0\].start: give the time's zone"):
        load_schedule(path)


# -- the coordinator -------------------------------------------------------------------------

SITE_TOML = {
    "site": {"name": "hall", "limit_w": 3000.0, "interval_s": 10.0},
    "feeds": {"a": {"limit_w": 2000.0}},
    "clusters": {
        "c1": {"safe_share_w": 600.0, "feed": "a"},
        "c2": {"safe_share_w": 600.0, "feed": "a"},
        "c3": {"safe_share_w": 600.0},
    },
    "demand_response": {"ramp_w_per_s": 10.0},
}


def site_plan(data: dict[str, object] | None = None) -> SitePlan:
    plan = service_site_plan(parse_site_config(data or SITE_TOML))
    assert plan.prefix == PREFIX  # the default etcd prefix, site "hall"
    return plan


def publish_curve(store: MemoryStore, cluster: str, curve: DemandCurve, now: float) -> None:
    store.put(
        f"{PREFIX}/clusters/{cluster}/curve",
        json.dumps({**curve.to_json(), "cycle_unix": now, "replica": f"{cluster}-a"}),
    )


def linear(floor: float, ceiling: float, slope: float) -> DemandCurve:
    return DemandCurve((floor, ceiling), (0.0, slope * (ceiling - floor)))


def test_site_config_refuses_safe_shares_that_do_not_fit() -> None:
    data = json.loads(json.dumps(SITE_TOML))
    data["clusters"]["c1"]["safe_share_w"] = 1500.0
    with pytest.raises(ConfigError, match=r"safe shares under 'a' exceed its limit by 100 W"):
        parse_site_config(data)
    data = json.loads(json.dumps(SITE_TOML))
    data["clusters"]["c1"]["feed"] = "nope"
    with pytest.raises(ConfigError, match="no such feed 'nope'"):
        parse_site_config(data)


def test_rounds_split_by_marginal_value_and_keep_every_limit() -> None:
    clock = FakeClock(1_000_000.0)
    store = MemoryStore(clock)
    coordinator = Coordinator(store, site_plan(), wall=clock, mono=clock, member="coord")
    publish_curve(store, "c1", linear(300.0, 1500.0, 0.010), clock.now())
    publish_curve(store, "c2", linear(300.0, 1500.0, 0.001), clock.now())
    publish_curve(store, "c3", linear(300.0, 1500.0, 0.005), clock.now())
    report = coordinator.step()
    assert report is not None and report.fits and report.feasible
    # The clusters plan under their safe shares (600 W each) until they confirm a grant: the
    # first grants only come part of the way (make before break).
    assert report.grants_w == {"c1": 1320.0, "c2": 300.0, "c3": 1080.0}
    for c, slope in (("c1", 0.010), ("c2", 0.001), ("c3", 0.005)):  # each confirms epoch 1
        curve = linear(300.0, 1500.0, slope)
        publish_curve(store, c, replace(curve, grant_epoch=1), clock.now())
    clock.advance(10.0)
    report = coordinator.step()
    assert report is not None and report.fits
    # c1 buys the most per watt: its ceiling (1500 W) fits feed a with c2 at its floor; c3
    # takes the rest of the site's 3000 W.
    assert report.grants_w == {"c1": 1500.0, "c2": 300.0, "c3": 1200.0}
    grant = Grant.from_json(json.loads(store.get(f"{PREFIX}/clusters/c1/grant") or "{}"))
    assert grant.watts == 1500.0 and grant.fallback_w == 600.0


def settle(
    store: MemoryStore, coordinator: Coordinator, clock: FakeClock, slopes: dict[str, float]
) -> RoundReport:
    """Rounds until the grants stand still, every cluster confirming each one."""
    report = None
    for _ in range(4):
        for c, slope in slopes.items():
            curve = replace(linear(300.0, 1500.0, slope), grant_epoch=coordinator.epoch)
            publish_curve(store, c, curve, clock.now())
        report = coordinator.step()
        clock.advance(10.0)
    assert report is not None
    return report


def test_a_cluster_without_a_curve_counts_at_its_safe_share_or_unexpired_grant() -> None:
    clock = FakeClock(1_000_000.0)
    store = MemoryStore(clock)
    coordinator = Coordinator(store, site_plan(), wall=clock, mono=clock, member="coord")
    steady = settle(store, coordinator, clock, {"c1": 0.01, "c2": 0.001, "c3": 0.005})
    assert steady.grants_w == {"c1": 1500.0, "c2": 300.0, "c3": 1200.0}
    store.delete(f"{PREFIX}/clusters/c1/curve")  # c1's agent is gone
    report = settle(store, coordinator, clock, {"c2": 0.001, "c3": 0.005})
    assert report.counted_w["c1"] == 1500.0  # its grant may still be in force
    assert "c1" not in report.grants_w and report.grants_w["c2"] == 300.0
    for _ in range(5):  # past its lease and the skew
        clock.advance(10.0)
        coordinator.step()
    report = settle(store, coordinator, clock, {"c2": 0.001, "c3": 0.005})
    assert report.counted_w["c1"] == 600.0  # now its safe share
    # c3 buys more per watt and takes its ceiling (1500 W); c2 the rest of the site's 3000 W.
    assert report.grants_w == {"c2": 900.0, "c3": 1500.0}


def test_increases_wait_until_the_cluster_that_gives_up_watts_confirms() -> None:
    clock = FakeClock(1_000_000.0)
    store = MemoryStore(clock)
    coordinator = Coordinator(store, site_plan(), wall=clock, mono=clock, member="coord")
    steady = settle(store, coordinator, clock, {"c1": 0.01, "c2": 0.001, "c3": 0.005})
    assert steady.grants_w == {"c1": 1500.0, "c2": 300.0, "c3": 1200.0}
    held = coordinator.epoch
    # c2 now buys the most: c1 must give up watts before c2 may have them.
    publish_curve(store, "c1", replace(linear(300.0, 1500.0, 0.001), grant_epoch=held), clock.now())
    publish_curve(store, "c2", replace(linear(300.0, 1500.0, 0.02), grant_epoch=held), clock.now())
    second = coordinator.step()
    assert second is not None and second.fits
    assert second.grants_w["c1"] == 300.0  # the decrease at once
    # c1 may still draw 1500 W: with c3's 1200 W the site is full, c2 waits.
    assert second.grants_w["c2"] == 300.0
    # c1 confirms planning under the smaller grant: c2 gets the rest.
    clock.advance(10.0)
    publish_curve(
        store,
        "c1",
        replace(linear(300.0, 1500.0, 0.001), grant_epoch=coordinator.epoch),
        clock.now(),
    )
    publish_curve(
        store,
        "c2",
        replace(linear(300.0, 1500.0, 0.02), grant_epoch=coordinator.epoch),
        clock.now(),
    )
    third = coordinator.step()
    assert third is not None and third.grants_w["c2"] == 1500.0 and third.fits


def test_a_demand_response_event_lowers_the_grants_ahead_of_the_limit() -> None:
    clock = FakeClock(1_000_000.0)
    store = MemoryStore(clock)
    coordinator = Coordinator(store, site_plan(), wall=clock, mono=clock, member="coord")
    for c in ("c1", "c2", "c3"):
        publish_curve(store, c, linear(300.0, 1500.0, 0.01), clock.now())
    # 1800 W from 200 s on: the ramp (10 W/s) starts at 80 s; the grants follow 20 s ahead.
    coordinator.post_event(DemandEvent("shed", clock.now() + 200.0, 300.0, 1800.0, "webhook"))
    report = coordinator.step()
    assert report is not None and sum(report.grants_w.values()) <= 3000.0

    def rounds(n: int) -> RoundReport:
        for _ in range(n):
            clock.advance(10.0)
            for c in ("c1", "c2", "c3"):  # each planned under the last grant (it confirms it)
                curve = linear(300.0, 1500.0, 0.01)
                curve = DemandCurve(curve.power_w, curve.value, grant_epoch=coordinator.epoch)
                publish_curve(store, c, curve, clock.now())
            report = coordinator.step()
        assert report is not None
        return report

    report = rounds(14)  # 60 s before the event: 2400 W now, 2200 W 20 s ahead
    assert report.limit_w == 2400.0 and report.planned_limit_w == 2200.0
    assert sum(report.grants_w.values()) <= 2200.0
    # What may still be drawn (each cluster's last confirmed grant) keeps the limit now.
    assert sum(report.counted_w.values()) <= 2400.0 and report.fits
    assert report.target.event is not None and report.target.phase == "ramping_down"
    report = rounds(6)
    assert report.limit_w == 1800.0
    assert sum(report.counted_w.values()) <= 1800.0 and report.fits
    # Below the safe shares (3 x 600 W = 1800 W): each falls back to its share of the target.
    assert all(w == pytest.approx(600.0) for w in report.fallback_w.values())


def test_fallback_shares_shrink_under_a_target() -> None:
    tree = LimitTree.build("s", 900.0, {}, {"a": (None, None), "b": (None, None)})
    assert fallback_shares(tree, {"a": 600.0, "b": 600.0}) == {"a": 450.0, "b": 450.0}


# -- an agent under its grant ----------------------------------------------------------------


def test_an_agent_plans_under_its_grant_and_publishes_its_curve() -> None:
    twin = Twin(TwinSpec(nodes=2, gpus_per_node=8, seed=4))
    wall = FakeClock(1_000_000.0)
    store = MemoryStore(wall)
    link = SiteLink(
        store,
        LinkSettings(PREFIX, "c1", "c1-a", safe_share_w=4000.0, leader_ttl_s=15),
        wall=wall,
        mono=wall,
    )
    registry = builtin_registry()
    loop = twin_agent(twin, ("power_budget",), registry=registry, site=link).loop
    assert loop.budget_w is link and loop.election is link  # the assembly wired the link in
    link.step()
    twin.run_until(15.0)
    first = loop.cycle()
    assert first.situation.budget_w == 4000.0  # the safe share: no grant yet
    assert any("no grant from the site coordinator" in e for e in first.errors)
    link.step()
    record = json.loads(store.get(f"{PREFIX}/clusters/c1/curve") or "{}")
    curve = DemandCurve.from_json(record)
    assert curve.floor_w < 4000.0 < curve.ceiling_w and record["can_meet"] is True
    store.put(
        f"{PREFIX}/clusters/c1/grant",
        json.dumps(Grant("c1", 5000.0, 1, wall.now(), 60.0).to_json()),
    )
    link.step()
    twin.run_until(30.0)
    second = loop.cycle()
    assert second.situation.budget_w == 5000.0 and not second.errors
    # The curve agrees with the caps the agent chose: its value at the grant is what the
    # allocation under that budget buys (GPU-equivalents), within a few percent.
    busy = second.situation.busy
    assert curve.value_at(5000.0) == pytest.approx(float(busy.sum()), rel=0.5)


def test_build_curve_is_concave_and_spans_floor_to_ceiling() -> None:
    twin = Twin(TwinSpec(nodes=2, gpus_per_node=8, seed=1))
    loop = twin_agent(twin, ("power_budget",), registry=builtin_registry(), dry_run=True).loop
    twin.run_until(15.0)
    situation = loop.cycle().situation
    curve = build_curve(situation)
    slopes = [s for _w, s in curve.segments()]
    assert all(np.diff(slopes) <= 1e-9)
    assert curve.ceiling_w > curve.floor_w > 0


def test_a_curve_counts_unseen_gpus_of_an_unknown_model_as_power_budget_does() -> None:
    """The curve's fixed draw holds what power_budget holds back for unseen GPUs: one of an
    unknown model (no limits known) at the largest limit of the fleet or the built-in table.
    Before, the curve took the fleet's largest only (700 W here; 0 W in a fleet of unknown
    models), promising watts the cluster's own budget policy would not spend."""
    models = np.array(["NVIDIA H100 80GB HBM3"] * 4 + ["NVIDIA H100 NVL"] * 4)

    def snap_at(t: float, stale: list[bool]) -> Snapshot:
        s = make_snapshot([600.0] * 4 + [350.0] * 4, time_s=t, stale=stale)
        return replace(s, model=models.copy())

    orienter = Orienter()
    for t in (0.0, 200.0):
        orienter.orient(snap_at(t, [False] * 8), 2700.0)
    situation = orienter.orient(snap_at(215.0, [False] * 4 + [True] * 4), 2700.0)
    stale_w, guessed = situation.stale_worst_w()
    assert guessed and stale_w.sum() == 4 * LARGEST_BUILTIN_MAX_CAP_W
    assert curve_inputs(situation).fixed_w >= 4 * LARGEST_BUILTIN_MAX_CAP_W


def test_a_standby_coordinator_takes_over_and_counts_the_grants_in_force() -> None:
    clock = FakeClock(1_000_000.0)
    store = MemoryStore(clock)
    first = Coordinator(store, site_plan(), wall=clock, mono=clock, member="coord-a")
    second = Coordinator(store, site_plan(), wall=clock, mono=clock, member="coord-b")
    steady = settle(store, first, clock, {"c1": 0.01, "c2": 0.001, "c3": 0.005})
    assert second.step() is None  # a standby publishes nothing
    assert steady.grants_w["c1"] == 1500.0
    # The first dies (no more renewals): its key lapses after its TTL (two rounds: 20 s).
    store.delete(f"{PREFIX}/clusters/c1/curve")  # and c1's agent is gone too
    report = None
    for _ in range(3):
        clock.advance(10.0)
        report = second.step()
    assert report is not None and second.elector.view().role == "leader"
    # c1's last grant (1500 W, from the other coordinator) is still counted until it lapses.
    assert report.counted_w["c1"] == 1500.0 and report.epoch > steady.epoch

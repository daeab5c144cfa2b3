"""power_budget's account shares: weighted max-min fairness between accounts when the budget
binds, priorities still ordering the work inside each; the shares from the config or from the
scheduler (through the Situation). Acceptance on the twin: with shares 50/30/20 under a binding
budget, every account's power is at or above its share (or its demand) after one interval."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from agent.config import parse_config
from agent.core.errors import ConfigError
from agent.core.intents import SetPowerCap
from agent.core.jobs import ACCOUNT_LABEL
from agent.core.situation import Situation
from agent.orient.orienter import Orienter
from agent.sim.accounts import TwinAccountLabels
from agent.sim.adapters import TwinCapActuator, TwinSource
from agent.sim.twin import Twin, TwinSpec
from policies.fair_share import weighted_max_min
from policies.power_budget import PowerBudget, PowerBudgetMemory, PowerBudgetSettings
from tests.conftest import make_snapshot

SHARES = {"team-a": 50.0, "team-b": 30.0, "team-c": 20.0}


def test_max_min_splits_by_weight_and_gives_unused_shares_to_the_others() -> None:
    floors = np.zeros(3)
    split = weighted_max_min(1000.0, [900.0, 900.0, 900.0], floors, [50, 30, 20])
    assert split == pytest.approx([500.0, 300.0, 200.0])
    # team-b asks for less than its share: it gets all it asks, the rest flows 50:20.
    split = weighted_max_min(1000.0, [900.0, 100.0, 900.0], floors, [50, 30, 20])
    assert split[1] == pytest.approx(100.0)
    assert split[0] / split[2] == pytest.approx(50 / 20) and split.sum() == pytest.approx(1000)


def test_max_min_keeps_floors_and_feeds_weightless_accounts_last() -> None:
    split = weighted_max_min(1000.0, [900.0, 900.0], [600.0, 100.0], [1, 1])
    assert split == pytest.approx([600.0, 400.0])  # no account below what its lowest caps draw
    split = weighted_max_min(1000.0, [300.0, 900.0], [50.0, 100.0], [1, 0])
    assert split == pytest.approx([300.0, 700.0])  # weight 0: what the weighted one leaves
    split = weighted_max_min(300.0, [900.0, 900.0], [50.0, 100.0], [1, 0])
    assert split == pytest.approx([200.0, 100.0])  # ... and its floor until then
    assert weighted_max_min(100.0, [900.0], [300.0], [1]) == pytest.approx([300.0])
    assert weighted_max_min(1e6, [900.0, 1.0], [0.0, 0.0], [1, 1]) == pytest.approx([900, 1])


def situation_with_accounts(accounts: list[str], budget_w: float, **kw: object) -> Situation:
    power = [600.0] * len(accounts)
    snap = make_snapshot(power, time_s=400, jobs=[f"j{i}" for i in range(len(accounts))])
    snap = replace(
        snap, labels={**snap.labels, ACCOUNT_LABEL: np.array(accounts, dtype=np.str_)}, **kw
    )
    orienter = Orienter()
    for t in (0.0, 200.0):  # the natural draws learned, as after a few cycles without caps
        orienter.orient(replace(snap, time_s=t), budget_w)
    return orienter.orient(snap, budget_w)


def caps(situation: Situation, **settings: object) -> SetPowerCap:
    policy = PowerBudget(PowerBudgetSettings(**settings))  # type: ignore[arg-type]
    found = [
        i
        for i in policy.decide(situation, PowerBudgetMemory(), situation.time_s).intents
        if isinstance(i, SetPowerCap)
    ]
    assert len(found) == 1
    return found[0]


def test_a_small_account_is_capped_last_and_priorities_order_work_inside_an_account() -> None:
    accounts = ["team-a"] * 6 + ["team-b"] * 2
    sit = situation_with_accounts(accounts, 3600.0)
    sit = replace(sit, priority=np.array([2, 2, 2, 0, 0, 0, 0, 0]))
    without = caps(sit)
    shared = caps(sit, account_shares={"team-a": 1.0, "team-b": 1.0})
    # Equal shares, and team-b's two GPUs ask less than half: team-b is not capped at all.
    assert (shared.watts[6:] >= 700.0).all() and (without.watts[6:] < 700.0).all()
    demand_b = float(sit.curves.natural_w[6:].sum())  # what team-b's GPUs draw uncapped
    assert shared.evidence["account_budget_w"]["team-b"] == pytest.approx(demand_b, abs=0.1)
    # Inside team-a its high-priority work keeps more than its low-priority work.
    assert shared.watts[:3].mean() > shared.watts[3:6].mean()


def test_the_schedulers_shares_apply_unless_the_config_gives_some() -> None:
    accounts = ["team-a"] * 4 + ["team-b"] * 4
    scheduler = {"team-a": 0.8, "team-b": 0.2}
    sit = situation_with_accounts(accounts, 3600.0, account_shares=scheduler)
    by_scheduler = caps(sit).evidence["account_budget_w"]
    assert by_scheduler["team-a"] > by_scheduler["team-b"]
    configured = caps(sit, account_shares={"team-a": 1.0, "team-b": 3.0})
    assert (
        configured.evidence["account_budget_w"]["team-b"]
        > (configured.evidence["account_budget_w"]["team-a"])
    )
    assert "account_budget_w" not in caps(sit, scheduler_shares=False).evidence


def test_share_settings_are_validated_by_key() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"policies": {"power_budget": {"account_shares": {"a": -1}}}})
    assert "policies.power_budget.account_shares.a" in str(err.value)


def test_shares_50_30_20_hold_under_a_binding_budget_after_one_interval() -> None:
    twin = Twin(TwinSpec(nodes=8, gpus_per_node=8, seed=3, occupancy=1.0))
    source = TwinAccountLabels(TwinSource(twin))
    orienter = Orienter()
    for _ in range(4):  # a minute of history: the natural draws, learned uncapped
        twin.run_until(twin.t_s + 15.0)
        snap = source.observe(twin.t_s)
        orienter.orient(snap, None)
    busy = twin.job_row >= 0
    demand = float(twin.noise_free_power_w[busy].sum())
    budget = 0.6 * float(twin.noise_free_power_w.sum())
    situation = orienter.orient(source.observe(twin.t_s), budget)
    accounts = situation.snapshot.labels[ACCOUNT_LABEL]
    present = sorted(set(accounts[busy].tolist()))
    assert present == sorted(SHARES) and demand > budget
    intent = caps(situation, account_shares=SHARES)
    given = intent.evidence["account_budget_w"]
    available = sum(given.values())
    result = TwinCapActuator(twin).set_caps(intent.targets, intent.watts, 120.0)
    assert result.ok.all()
    twin.run_until(twin.t_s + 15.0)  # one interval under the caps

    # The plan: each account's budget at least its share of what the accounts may draw, or all
    # it asks for (weighted max-min).
    demand_of = {
        a: float(situation.curves.natural_w[busy & (accounts == a)].sum()) for a in present
    }
    total_share = sum(SHARES.values())
    for account in present:
        fair = SHARES[account] / total_share * available
        assert given[account] >= min(fair, demand_of[account]) - 0.5, (account, given)
    # What they drew, one interval later: each account at least its share of the power the
    # accounts drew, or its whole draw uncapped (the twin's truth) where that is less.
    drawn = {a: float(twin.noise_free_power_w[busy & (accounts == a)].sum()) for a in present}
    uncapped = twin.true_curves()["natural_w"]
    for account in present:
        fair = SHARES[account] / total_share * sum(drawn.values())
        alone = float(uncapped[busy & (accounts == account)].sum())
        assert drawn[account] >= min(fair, alone) * 0.999, (account, drawn, fair, alone)
    assert drawn["team-c"] < SHARES["team-c"] / total_share * sum(drawn.values())  # its demand
    assert float(twin.noise_free_power_w.sum()) <= budget  # and the budget holds

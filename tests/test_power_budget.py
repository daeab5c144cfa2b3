from __future__ import annotations

import numpy as np

from agent.core.intents import Notify, ReleasePowerCap, SetPowerCap
from agent.core.situation import LARGEST_BUILTIN_MAX_CAP_W, Situation
from agent.core.snapshot import Snapshot
from agent.orient.orienter import Orienter
from policies.power_budget import PowerBudget, PowerBudgetMemory, PowerBudgetSettings
from tests.conftest import make_snapshot


def situation(snap: Snapshot, budget: float | None, warm: bool = True) -> Situation:
    orienter = Orienter()
    if warm:  # learn the natural draws first, as after a few cycles with no caps
        for t in (0.0, 200.0):
            orienter.orient(make_snapshot_like(snap, t), budget)
    return orienter.orient(snap, budget)


def make_snapshot_like(snap: Snapshot, time_s: float) -> Snapshot:
    from dataclasses import replace

    return replace(snap, time_s=time_s)


def policy(**settings: object) -> PowerBudget:
    return PowerBudget(PowerBudgetSettings(**settings))  # type: ignore[arg-type]


def caps_of(intents: list) -> SetPowerCap:  # type: ignore[type-arg]
    found = [i for i in intents if isinstance(i, SetPowerCap)]
    assert len(found) == 1
    return found[0]


def test_no_budget_no_intents() -> None:
    snap = make_snapshot([500.0] * 8, time_s=400)
    d = policy().decide(situation(snap, None), PowerBudgetMemory(), 400)
    assert d.intents == []


def test_under_budget_no_caps() -> None:
    snap = make_snapshot([400.0] * 8, time_s=400)
    d = policy().decide(situation(snap, 20_000.0), PowerBudgetMemory(), 400)
    assert d.intents == []


def test_over_budget_caps_fit_worst_case() -> None:
    power = [600.0] * 6 + [80.0, 80.0]
    snap = make_snapshot(
        power, time_s=400, util_pct=[95.0] * 6 + [0.0, 0.0], jobs=["1"] * 6 + ["", ""]
    )
    sit = situation(snap, 3200.0)
    d = policy(margin_frac=0.02).decide(sit, PowerBudgetMemory(), 400)
    caps = caps_of(list(d.intents))
    assert len(caps.targets) == 8
    # Worst case until the next cycle: busy GPUs at their cap, idle ones could start at theirs.
    assert caps.watts.sum() <= 3200.0 * 0.98
    idle = ~sit.busy[: len(power)]
    assert np.all(caps.watts[idle] == 200.0)  # idle GPUs get the lowest cap
    assert caps.evidence["budget_w"] == 3200.0
    assert set(caps.to_records()[0]) >= {"kind", "target", "policy", "reason", "watts"}


def test_low_priority_is_capped_first() -> None:
    from dataclasses import replace

    snap = make_snapshot([600.0] * 8, time_s=400)
    sit = situation(snap, 4000.0)
    sit = replace(sit, priority=np.array([0, 0, 0, 0, 2, 2, 2, 2]))
    caps = caps_of(list(policy().decide(sit, PowerBudgetMemory(), 400).intents))
    assert caps.watts[:4].mean() < caps.watts[4:].mean()


def test_stale_gpus_count_at_their_max_and_get_no_intent() -> None:
    snap = make_snapshot([500.0] * 8, time_s=400, stale=[False] * 6 + [True, True])
    sit = situation(snap, 3800.0)
    caps = caps_of(list(policy().decide(sit, PowerBudgetMemory(), 400).intents))
    assert "GPU-0006" not in caps.targets.uuid and "GPU-0007" not in caps.targets.uuid
    assert caps.evidence["stale_reserve_w"] == 1400.0
    assert caps.watts.sum() <= 3800 - 1400


def test_infeasible_budget_notifies() -> None:
    snap = make_snapshot([600.0] * 4, time_s=400)
    d = policy().decide(situation(snap, 500.0), PowerBudgetMemory(), 400)
    assert any(isinstance(i, Notify) and i.severity == "critical" for i in d.intents)
    assert np.all(caps_of(list(d.intents)).watts == 200.0)


def test_release_waits_for_hysteresis_hold() -> None:
    snap = make_snapshot([300.0] * 4, time_s=400, limit_w=400.0)
    sit = situation(snap, 10_000.0)
    p = policy(release_hold_s=60)
    d1 = p.decide(sit, PowerBudgetMemory(), 400)
    assert d1.intents == [] and d1.memory.fits_since_s == 400  # type: ignore[attr-defined]
    d2 = p.decide(sit, d1.memory, 430)
    assert d2.intents == []
    d3 = p.decide(sit, d2.memory, 461)
    assert len(d3.intents) == 1 and isinstance(d3.intents[0], ReleasePowerCap)


def test_policy_is_pure() -> None:
    snap = make_snapshot([600.0] * 8, time_s=400)
    sit = situation(snap, 3000.0)
    p = policy()
    a = caps_of(list(p.decide(sit, PowerBudgetMemory(), 400).intents))
    b = caps_of(list(p.decide(sit, PowerBudgetMemory(), 400).intents))
    assert np.array_equal(a.watts, b.watts)


def test_rack_budget_holds_within_a_loose_cluster_budget() -> None:
    from agent.orient.groups import GroupSpec

    snap = make_snapshot([600.0] * 8, time_s=400)  # node1: GPUs 0-3, node2: GPUs 4-7
    orienter = Orienter(groups=(GroupSpec("rack1", 1600.0, ("node1",)),))
    for t in (0.0, 200.0):
        orienter.orient(make_snapshot_like(snap, t), 100_000.0)
    sit = orienter.orient(snap, 100_000.0)
    caps = caps_of(list(policy(margin_frac=0.0).decide(sit, PowerBudgetMemory(), 400).intents))
    by_uuid = dict(zip(caps.targets.uuid.tolist(), caps.watts.tolist(), strict=True))
    rack1 = [by_uuid[f"GPU-{i:04d}"] for i in range(4)]
    rack2 = [by_uuid[f"GPU-{i:04d}"] for i in range(4, 8)]
    assert sum(rack1) <= 1600.0
    assert all(w == 700.0 for w in rack2)  # the rest of the cluster keeps its power


def test_job_priority_patterns() -> None:
    from agent.orient.groups import job_priorities

    job = np.array(["1001", "1001", "2002", "", "3003"])
    out = job_priorities(job, {"1*": 2, "3*": 0}, np.ones(5, dtype=np.int64))
    assert out.tolist() == [2, 2, 1, 1, 0]


def test_stale_gpus_of_an_unknown_model_count_at_the_largest_known_max() -> None:
    from dataclasses import replace

    # "NVIDIA H100 NVL" is not in the built-in table: its limits are unknown.
    models = np.array(["NVIDIA H100 80GB HBM3"] * 4 + ["NVIDIA H100 NVL"] * 4)

    def snap_at(t: float, stale: list[bool], power_w: float = 350.0) -> Snapshot:
        s = make_snapshot([600.0] * 4 + [power_w] * 4, time_s=t, stale=stale)
        return replace(s, model=models.copy())

    orienter = Orienter()
    for t in (0.0, 200.0):
        orienter.orient(snap_at(t, [False] * 8), 2700.0)
    # Unseen, the unknown GPUs may draw as much as any GPU we know of: not 0 W.
    sit = orienter.orient(snap_at(215.0, [False] * 4 + [True] * 4), 2700.0)
    d = policy().decide(sit, PowerBudgetMemory(), 215.0)
    caps = caps_of(list(d.intents))
    # The largest limit of the built-in table: GB200's 1,200 W since issue 23 (H100's 700 W before).
    assert caps.evidence["stale_reserve_w"] == 4 * LARGEST_BUILTIN_MAX_CAP_W == 4 * 1200.0
    assert caps.evidence["stale_max_cap_guessed"] is True
    # Even where the guess fits with room to spare, caps are held, not released.
    roomy = orienter.orient(snap_at(230.0, [False] * 4 + [True] * 4), 100_000.0)
    p = policy(release_hold_s=0.0)
    capped = replace(roomy, cap_w=np.full(8, 400.0))
    assert p.decide(capped, PowerBudgetMemory(fits_since_s=0.0), 230.0).intents == []
    seen = orienter.orient(snap_at(245.0, [False] * 8, power_w=80.0), 100_000.0)
    released = p.decide(replace(seen, cap_w=np.full(8, 400.0)), PowerBudgetMemory(), 245.0)
    assert any(isinstance(i, ReleasePowerCap) for i in released.intents)


def test_an_unknown_natural_draw_counts_at_the_max_cap_and_uncaps_nobody() -> None:
    from dataclasses import replace

    from agent.core.curves import allocate_power

    # The split itself: the unknown GPU counts as drawing its max cap, and is capped too.
    natural = np.array([np.nan, 600.0, 600.0, 600.0])
    alloc = allocate_power(2000.0, natural, 1.13, 1.65, 1.0, 200.0, 700.0)
    assert alloc.feasible and np.all(np.isfinite(alloc.cap_w))
    assert alloc.power_w.sum() <= 2000.0 and np.all(alloc.cap_w < 700.0)
    # The policy: one NaN natural draw must not plan every GPU at its max.
    snap = make_snapshot([600.0] * 8, time_s=400)
    sit = situation(snap, 3000.0)
    nat = sit.curves.natural_w.copy()
    nat[0] = np.nan
    unknown = replace(sit, curves=replace(sit.curves, natural_w=nat))
    caps = caps_of(list(policy().decide(unknown, PowerBudgetMemory(), 400).intents))
    assert np.all(np.isfinite(caps.watts))
    # Each GPU draws at most its natural draw (600 W) or its cap, the unknown one its cap.
    drawn = np.minimum(np.where(np.isnan(nat), 700.0, 600.0), caps.watts)
    assert drawn.sum() <= 3000.0, caps.watts

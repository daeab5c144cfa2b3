from __future__ import annotations

import numpy as np
import pytest

from agent.act.gate import Gate
from agent.act.guard import GuardSettings
from agent.core.clock import FakeClock
from agent.core.intents import Action, GpuTargets, Outcome, ReleasePowerCap, SetPowerCap
from agent.core.snapshot import Snapshot
from agent.orient.orienter import Orienter
from tests.conftest import make_snapshot
from tests.fakes import make_gate


def cap(snap, rows, watts):  # type: ignore[no-untyped-def]
    return SetPowerCap(
        policy="t",
        reason="r",
        targets=GpuTargets.from_rows(snap, rows),
        watts=np.asarray(watts, dtype=float),
    )


def apply(guard: Gate, review, now: float) -> None:  # type: ignore[no-untyped-def]
    for i, intent in enumerate(review.allowed):
        guard.ledger.record(Action(f"a{i}", "d", intent, Outcome.APPLIED, False), now)


def test_cooldown_on_fake_clock() -> None:
    clock = FakeClock(1000.0)
    guard = make_gate(GuardSettings(cap_cooldown_s=60, cap_dead_band_w=10))
    snap = make_snapshot([500.0] * 2, limit_w=700.0)
    sit = Orienter().orient(snap, None)
    r1 = guard.review([cap(snap, [0, 1], [400, 400])], sit, clock.now())
    assert len(r1.allowed) == 1 and not r1.refused
    apply(guard, r1, clock.now())

    snap2 = make_snapshot([400.0] * 2, limit_w=400.0)
    sit2 = Orienter().orient(snap2, None)
    clock.advance(30)
    # Raising within the cooldown is refused; lowering (the safe direction) is not.
    r2 = guard.review([cap(snap2, [0, 1], [500, 300])], sit2, clock.now())
    assert [len(i.targets) for i in r2.allowed] == [1] and r2.allowed[0].watts.tolist() == [300.0]
    assert len(r2.refused) == 1 and r2.refused[0].reason.startswith("cooldown")
    clock.advance(31)
    r3 = guard.review([cap(snap2, [0], [500])], sit2, clock.now())
    assert len(r3.allowed) == 1 and not r3.refused


def test_dead_band_and_bounds() -> None:
    guard = make_gate(GuardSettings(cap_dead_band_w=10))
    snap = make_snapshot([500.0] * 3, limit_w=[400.0, 400.0, 700.0])
    sit = Orienter().orient(snap, None)
    review = guard.review([cap(snap, [0, 1, 2], [405, 100, 900])], sit, 0.0)
    allowed = review.allowed[0]
    # Clipped to the GPU's own range (H100: 200-700 W); the request stays in the evidence.
    assert allowed.watts.tolist() == [200.0] and "requested_w" in allowed.evidence
    assert not review.refused  # 900 -> 700 equals the current limit: unchanged
    assert review.unchanged == 2


def test_stale_and_unknown_refused() -> None:
    guard = make_gate()
    snap = make_snapshot([500.0] * 3, stale=[False, True, False], model="unknown GPU")
    sit = Orienter().orient(snap, None)
    review = guard.review([cap(snap, [0, 1], [300, 300])], sit, 0.0)
    reasons = sorted(r.reason for r in review.refused)
    assert reasons == [
        "telemetry stale: no action on what cannot be seen",
        "the GPU's cap range is unknown",
    ]
    assert not review.allowed


def test_targets_not_in_this_cycle_are_refused_even_when_nothing_is_seen() -> None:
    """A GPU capped earlier that this cycle did not see (another node, or an outage that left no
    GPU at all) is never acted on, whatever the guard remembers of it."""
    guard = make_gate(GuardSettings(cap_cooldown_s=0))
    seen = make_snapshot([500.0] * 4, limit_w=700.0)
    first = guard.review([cap(seen, [0, 1, 2, 3], [400] * 4)], Orienter().orient(seen, None), 0.0)
    apply(guard, first, 0.0)
    fewer = make_snapshot([500.0] * 2, limit_w=700.0)  # GPUs 2 and 3 are gone
    review = guard.review([cap(seen, [1, 2, 3], [300] * 3)], Orienter().orient(fewer, None), 100.0)
    assert [r.reason for r in review.refused] == ["GPU not seen this cycle"]
    assert review.refused[0].intent.targets.uuid.tolist() == seen.uuid[[2, 3]].tolist()
    assert review.allowed[0].targets.uuid.tolist() == [seen.uuid[1]]
    nothing = Snapshot.empty(200.0)
    review = guard.review([cap(seen, [0], [300])], Orienter().orient(nothing, None), 200.0)
    assert [r.reason for r in review.refused] == ["GPU not seen this cycle"] and not review.allowed


def test_release_only_what_we_capped() -> None:
    guard = make_gate(GuardSettings(cap_cooldown_s=0))
    snap = make_snapshot([300.0] * 2, limit_w=400.0)
    sit = Orienter().orient(snap, None)
    release = ReleasePowerCap(policy="t", reason="r", targets=GpuTargets.from_rows(snap, [0, 1]))
    review = guard.review([release], sit, 0.0)
    assert not review.allowed and review.refused[0].reason == "not capped by us"
    guard.ledger.record(Action("a", "d", cap(snap, [0], [400]), Outcome.APPLIED, False), 0.0)
    review = guard.review([release], sit, 10.0)
    assert len(review.allowed) == 1 and review.allowed[0].targets.uuid.tolist() == ["GPU-0000"]


@pytest.mark.parametrize("dry_run", [True, False])
def test_dry_run_compares_with_what_was_recorded(dry_run: bool) -> None:
    guard = make_gate(GuardSettings(cap_cooldown_s=0), dry_run=dry_run)
    snap = make_snapshot([500.0], limit_w=700.0)
    sit = Orienter().orient(snap, None)
    r1 = guard.review([cap(snap, [0], [400])], sit, 0.0)
    guard.ledger.record(
        Action("a", "d", r1.allowed[0], Outcome.RECORDED if dry_run else Outcome.APPLIED, dry_run),
        0.0,
    )
    r2 = guard.review([cap(snap, [0], [400])], sit, 20.0)
    # Dry-run: the telemetry still says 700 W, but we already recommended 400 W: no repeat.
    assert (len(r2.allowed), r2.unchanged) == ((0, 1) if dry_run else (1, 0))


def test_guard_state_round_trips() -> None:
    import json

    guard = make_gate()
    snap = make_snapshot([500.0])
    guard.ledger.record(Action("a", "d", cap(snap, [0], [400]), Outcome.APPLIED, False), 123.0)
    copy = make_gate()
    copy.ledger.load_dict(json.loads(json.dumps(guard.ledger.to_dict())))
    assert copy.ledger.capped_by_us(np.array(["GPU-0000"])).tolist() == [True]
    assert copy.ledger.caps["last_change_s"][0] == 123.0

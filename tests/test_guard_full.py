"""The guard in full, on a FakeClock: the drain circuit breaker and its reset, the rate limits,
ownership, opt-out, the scope, stale nodes, and its state across a restart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.act.gate import Gate, Review
from agent.act.guard import RESET_FILE, GuardSettings, request_reset
from agent.act.rollout import Rollout, RolloutSettings
from agent.core.clock import FakeClock
from agent.core.intents import (
    Action,
    DrainNode,
    GpuTargets,
    Intent,
    Notify,
    Outcome,
    ReleasePowerCap,
    RequeueJob,
    ResumeNode,
    SetNodeFeatures,
    SetNodeWeight,
    SetPowerCap,
    Severity,
)
from agent.core.situation import NodeStates, Situation
from agent.orient.orienter import Orienter
from tests.conftest import make_snapshot
from tests.fakes import FakePlacement, make_gate, make_loop

N_NODES = 10


def node_order(n: int = N_NODES) -> list[str]:
    """The snapshot's node order (sorted names: node1, node10, node2, ...)."""
    return sorted(f"node{k}" for k in range(1, n + 1))


def states(
    n: int = N_NODES,
    drained_by_others: tuple[int, ...] = (),
    drained_by_us: tuple[int, ...] = (),
    opted_out: tuple[int, ...] = (),
    partitions: dict[int, frozenset[str]] | None = None,
    weight: int = 1,
) -> NodeStates:
    """Node states aligned with the snapshot's nodes; nodes given by number (2 = node2)."""
    order = node_order(n)

    def at(nums: tuple[int, ...]) -> list[int]:
        return [order.index(f"node{num}") for num in nums]

    drained = np.zeros(n, dtype=bool)
    ours = np.zeros(n, dtype=bool)
    reason = np.full(n, "", dtype=object)
    for k in at(drained_by_others):
        drained[k], reason[k] = True, "admin: bad PSU"
    for k in at(drained_by_us):
        drained[k], ours[k], reason[k] = True, True, "ooda: health"
    out = np.zeros(n, dtype=bool)
    out[at(opted_out)] = True
    parts = None
    if partitions is not None:
        parts = tuple(partitions.get(int(name[4:]), frozenset({"gpu"})) for name in order)
    return NodeStates(
        drained=drained,
        drained_by_us=ours,
        reason=reason.astype(np.str_),
        weight=np.full(n, weight, dtype=np.int64),
        features=tuple(frozenset({"ooda-ignore"}) if o else frozenset() for o in out),
        opted_out=out,
        known=np.ones(n, dtype=bool),
        partitions=parts,
    )


def situation(
    nodes: NodeStates | None = None,
    stale_nodes: tuple[int, ...] = (),
    n_nodes: int = N_NODES,
    limit_w: float = 700.0,
) -> Situation:
    stale = [i // 4 + 1 in stale_nodes for i in range(4 * n_nodes)]
    snap = make_snapshot([500.0] * (4 * n_nodes), stale=stale, limit_w=limit_w)
    assert snap.node_names.tolist() == node_order(n_nodes)
    return Orienter().orient(snap, None, nodes if nodes is not None else states(n_nodes))


def drain(node: str, expires_s: float = float("inf")) -> DrainNode:
    return DrainNode(
        policy="health_drain", reason="ooda: health: xid:79", node=node, expires_s=expires_s
    )


def apply(guard: Gate, review: Review, now: float, outcome: Outcome = Outcome.APPLIED) -> None:
    for i, intent in enumerate(review.allowed):
        guard.ledger.record(Action(f"a{i}", "d", intent, outcome, outcome is Outcome.RECORDED), now)


def reasons(review: Review) -> dict[str, str]:
    return {r.intent.target_name(): r.reason for r in review.refused}


def allowed_nodes(review: Review) -> list[str]:
    return [i.target_name() for i in review.allowed if not isinstance(i, Notify)]


def test_breaker_trips_at_the_limit_stays_open_and_says_so_every_cycle() -> None:
    clock = FakeClock(1000.0)
    guard = make_gate(
        GuardSettings(
            breaker_max_nodes=2, breaker_max_pct=100, drain_rate_max=10, node_cooldown_s=0
        )
    )
    sit = situation()
    review = guard.review([drain("node1"), drain("node2"), drain("node3")], sit, clock.now())
    assert allowed_nodes(review) == ["node1", "node2"]
    why = reasons(review)["node3"]
    assert why.startswith("circuit breaker tripped:") and "the limit is 2" in why
    assert [name for name, _ in review.events] == ["guard_breaker_tripped"]
    assert review.alarms and "OPEN" in review.alarms[0]
    notes = [i for i in review.allowed if isinstance(i, Notify)]
    assert len(notes) == 1 and notes[0].severity is Severity.CRITICAL
    assert review.raised == notes
    apply(guard, review, clock.now())

    # Hours later, the window long gone: still open, still loud, still refusing.
    clock.advance(6 * 3600)
    review = guard.review([drain("node4")], situation(), clock.now())
    assert allowed_nodes(review) == []
    assert "circuit breaker open since t=1000 s" in reasons(review)["node4"]
    assert "`ooda guard reset`" in reasons(review)["node4"]
    assert review.alarms and len(review.raised) == 1
    assert not review.events  # tripped once, not again
    # Resumes, caps and weights are not drains: the breaker does not hold them.
    sit = situation(states(drained_by_us=(1,)))
    review = guard.review([ResumeNode(policy="p", reason="r", node="node1")], sit, clock.now())
    assert allowed_nodes(review) == ["node1"]


def test_reset_lets_it_drain_again_and_counts_afresh() -> None:
    clock = FakeClock(0.0)
    guard = make_gate(GuardSettings(breaker_max_nodes=1, breaker_max_pct=100, node_cooldown_s=0))
    review = guard.review([drain("node1"), drain("node2")], situation(), clock.now())
    apply(guard, review, clock.now())
    assert guard.ledger.breaker.open and guard.ledger.breaker.trips == 1
    clock.advance(60)
    fields = guard.reset_breaker(clock.now(), by="alice", note="driver push")
    assert fields["was_open"] and fields["by"] == "alice"
    # node1's drain an minute ago no longer counts: one more may go, the next trips again.
    review = guard.review([drain("node2")], situation(), clock.now())
    assert allowed_nodes(review) == ["node2"] and not review.alarms
    apply(guard, review, clock.now())
    review = guard.review([drain("node3")], situation(), clock.now() + 1)
    assert reasons(review)["node3"].startswith("circuit breaker tripped")
    assert guard.ledger.breaker.trips == 2


def test_reset_request_file_is_consumed_once_and_audited(tmp_path: Path) -> None:
    clock = FakeClock(0.0)
    guard = make_gate(
        GuardSettings(breaker_max_nodes=1, breaker_max_pct=100, node_cooldown_s=0),
        reset_file=tmp_path / RESET_FILE,
    )
    apply(guard, guard.review([drain("node1"), drain("node2")], situation(), 0.0), 0.0)
    assert guard.ledger.breaker.open
    request = request_reset(tmp_path, by="bob@ops", note="checked the nodes")
    assert json.loads((tmp_path / RESET_FILE).read_text())["id"] == request["id"]
    assert [p.name for p in tmp_path.iterdir()] == [RESET_FILE]  # no temporary left behind
    clock.advance(15)
    review = guard.review([drain("node2")], situation(), clock.now())
    assert not guard.ledger.breaker.open and allowed_nodes(review) == ["node2"]
    ((name, fields),) = review.events
    assert name == "guard_reset" and fields["by"] == "bob@ops" and fields["was_open"]
    assert fields["request_id"] == request["id"] and fields["note"] == "checked the nodes"
    assert not (tmp_path / RESET_FILE).exists()
    # A request a previous guard applied but could not remove is not applied twice.
    (tmp_path / RESET_FILE).write_text(json.dumps(request))
    apply(guard, review, clock.now())
    review = guard.review([drain("node3")], situation(), clock.now() + 1)
    assert not review.events or review.events[0][0] != "guard_reset"
    assert guard.ledger.breaker.open  # tripped by node3, the stale request did not close it
    # An unreadable request still counts as a person asking.
    (tmp_path / RESET_FILE).write_text("{half a req")
    review = guard.review([], situation(), clock.now() + 2)
    assert review.events[0][0] == "guard_reset" and not guard.ledger.breaker.open
    assert "unreadable" in str(review.events[0][1])


def test_breaker_state_survives_a_restart() -> None:
    guard = make_gate(GuardSettings(breaker_max_nodes=1, breaker_max_pct=100, node_cooldown_s=0))
    apply(guard, guard.review([drain("node1"), drain("node2")], situation(), 10.0), 10.0)
    saved = json.loads(json.dumps(guard.ledger.to_dict()))
    restarted = make_gate(guard.settings)
    restarted.ledger.load_dict(saved)
    assert restarted.ledger.breaker.open and restarted.ledger.breaker.opened_s == 10.0
    assert restarted.ledger.drains == [(10.0, "node1")]
    review = restarted.review([drain("node5")], situation(), 20.0)
    assert "circuit breaker open" in reasons(review)["node5"]
    # And an old state without any of the new keys loads as a closed breaker.
    old = make_gate()
    old.ledger.load_dict({"caps": saved["caps"], "nodes": {"keys": [], "last_change_s": []}})
    assert not old.ledger.breaker.open and old.ledger.drains == []


@pytest.mark.parametrize(
    ("n_nodes", "max_nodes", "pct", "min_nodes", "limit"),
    [
        (100, 5, 10.0, 1, 5),
        (30, 5, 10.0, 1, 3),
        (4, 5, 10.0, 1, 1),
        (4, 5, 10.0, 0, 0),
        (1000, 5, 0.0, 1, 1),
        (10, 0, 50.0, 1, 0),
    ],
)
def test_breaker_limit_nodes_or_share(
    n_nodes: int, max_nodes: int, pct: float, min_nodes: int, limit: int
) -> None:
    guard = make_gate(
        GuardSettings(breaker_max_nodes=max_nodes, breaker_max_pct=pct, breaker_min_nodes=min_nodes)
    )
    assert guard.breaker_limit(n_nodes) == limit


def test_drain_rate_limit_waits_for_room_without_tripping() -> None:
    clock = FakeClock(0.0)
    guard = make_gate(
        GuardSettings(
            drain_rate_max=2,
            drain_rate_window_s=600,
            breaker_max_nodes=10,
            breaker_max_pct=100,
            node_cooldown_s=0,
        )
    )
    review = guard.review([drain("node1"), drain("node2"), drain("node3")], situation(), 0.0)
    assert allowed_nodes(review) == ["node1", "node2"]
    assert reasons(review)["node3"].startswith("rate limit: 2 drains in the last 600 s")
    assert not guard.ledger.breaker.open
    apply(guard, review, 0.0)
    clock.set(599.0)
    assert allowed_nodes(guard.review([drain("node3")], situation(), clock.now())) == []
    clock.set(601.0)
    assert allowed_nodes(guard.review([drain("node3")], situation(), clock.now())) == ["node3"]


def test_steering_rate_limit() -> None:
    guard = make_gate(GuardSettings(steer_rate_max=3, steer_rate_window_s=300, node_cooldown_s=0))
    weights = [
        SetNodeWeight(policy="placement", reason="hot", node=f"node{k}", weight=1000)
        for k in range(1, 6)
    ]
    review = guard.review(weights, situation(), 0.0)
    assert allowed_nodes(review) == ["node1", "node2", "node3"]
    assert reasons(review)["node4"].startswith("rate limit: 3 weight/feature changes")
    apply(guard, review, 0.0)
    assert allowed_nodes(guard.review(weights[3:], situation(), 200.0)) == []
    assert len(allowed_nodes(guard.review(weights[3:], situation(), 301.0))) == 2


def test_ownership_never_touches_someone_elses_drain() -> None:
    guard = make_gate(GuardSettings(node_cooldown_s=0))
    sit = situation(states(drained_by_others=(2,), weight=1))
    intents: list[Intent] = [
        drain("node2"),
        ResumeNode(policy="p", reason="r", node="node2"),
        SetNodeWeight(policy="placement", reason="hot", node="node2", weight=1000),
        SetNodeFeatures(policy="placement", reason="hot", node="node2", add=frozenset({"hot"})),
        # Undoing our own features is allowed even there.
        SetNodeFeatures(policy="placement", reason="cool", node="node2", remove=frozenset({"hot"})),
    ]
    review = guard.review(intents, sit, 0.0)
    refused = [r.reason for r in review.refused]
    assert refused == [
        "drained by someone else (reason: 'admin: bad PSU'): never touched by us",
        "drained by someone else: never resumed by us",
        "drained by someone else (reason: 'admin: bad PSU'): never re-weighted by us "
        "(only our own changes undone)",
        "drained by someone else (reason: 'admin: bad PSU'): never re-featured by us "
        "(only our own changes undone)",
    ]
    assert [type(i).__name__ for i in review.allowed] == ["SetNodeFeatures"]


def test_weight_undo_allowed_on_someone_elses_drain() -> None:
    guard = make_gate(GuardSettings(node_cooldown_s=0))
    up = SetNodeWeight(policy="placement", reason="hot", node="node3", weight=1000)
    review = guard.review([up], situation(states(weight=1)), 0.0)
    apply(guard, review, 0.0)  # we found weight 1
    # An admin drains node3; our weight stays until we give back the one we found.
    sit = situation(states(drained_by_others=(3,), weight=1000))
    again = SetNodeWeight(policy="placement", reason="hotter", node="node3", weight=2000)
    back = SetNodeWeight(policy="placement", reason="cool", node="node3", weight=1)
    review = guard.review([again, back], sit, 10.0)
    assert allowed_nodes(review) == ["node3"] and review.allowed[0] is back
    assert "never re-weighted" in reasons(review)["node3"]


def test_drain_of_our_own_drain_is_unchanged_and_dry_run_remembers() -> None:
    guard = make_gate(GuardSettings(node_cooldown_s=0))
    review = guard.review([drain("node1")], situation(states(drained_by_us=(1,))), 0.0)
    assert review.allowed == [] and review.refused == [] and review.unchanged == 1
    # Advising: the placement never shows our recorded drain; a repeat is no new advice.
    guard = make_gate(GuardSettings(node_cooldown_s=0), dry_run=True)
    apply(guard, guard.review([drain("node1")], situation(), 0.0), 0.0, Outcome.RECORDED)
    review = guard.review([drain("node1")], situation(), 30.0)
    assert review.allowed == [] and review.unchanged == 1


def test_opt_out_protects_the_node_and_its_gpus() -> None:
    guard = make_gate(GuardSettings(node_cooldown_s=0, cap_cooldown_s=0))
    sit = situation(states(opted_out=(2,)))
    snap = sit.snapshot
    caps = SetPowerCap(
        policy="power_budget",
        reason="budget",
        targets=GpuTargets.from_rows(snap, list(range(8))),
        watts=np.full(8, 400.0),
    )
    intents: list[Intent] = [
        caps,
        drain("node2"),
        SetNodeWeight(policy="placement", reason="hot", node="node2", weight=1000),
        RequeueJob(policy="health_drain", reason="xid", job="101", node="node2"),
        RequeueJob(policy="health_drain", reason="xid", job="100", node="node1"),
    ]
    review = guard.review(intents, sit, 0.0)
    capped = [i for i in review.allowed if isinstance(i, SetPowerCap)]
    assert capped[0].targets.node.tolist() == ["node1"] * 4  # node2's GPUs untouched
    opt = "opted out (ooda-ignore): never touched"
    refused = {(type(r.intent).__name__, r.intent.target_name()): r.reason for r in review.refused}
    assert refused == {
        ("SetPowerCap", "4 GPUs"): opt,
        ("DrainNode", "node2"): opt,
        ("SetNodeWeight", "node2"): opt,
        ("RequeueJob", "101"): f"{opt} (node node2)",
    }
    assert [i.target_name() for i in review.allowed if isinstance(i, RequeueJob)] == ["100"]


def test_no_node_action_on_a_node_whose_gpus_are_all_stale() -> None:
    guard = make_gate(GuardSettings(node_cooldown_s=0))
    review = guard.review([drain("node3"), drain("node4")], situation(stale_nodes=(3,)), 0.0)
    assert allowed_nodes(review) == ["node4"]
    assert reasons(review)["node3"] == (
        "telemetry stale: every GPU of node3 is stale; no action on what cannot be seen"
    )


def test_scope_by_hostlist_glob_and_partition() -> None:
    rollout = Rollout(
        RolloutSettings(nodes=["node[1-3]", "node1*"], partitions=["gpu"]),
        members=["node1", "node2", "node3", "node1*"],
    )
    guard = make_gate(
        GuardSettings(node_cooldown_s=0, cap_cooldown_s=0, breaker_max_pct=100), rollout=rollout
    )
    sit = situation(states(partitions={2: frozenset({"debug"})}))
    snap = sit.snapshot
    caps = SetPowerCap(
        policy="power_budget",
        reason="budget",
        targets=GpuTargets.from_rows(snap, np.arange(snap.n_gpus)),
        watts=np.full(snap.n_gpus, 400.0),
    )
    review = guard.review([caps, *(drain(f"node{k}") for k in (1, 2, 4, 10))], sit, 0.0)
    capped = next(i for i in review.allowed if isinstance(i, SetPowerCap))
    assert sorted(set(capped.targets.node.tolist())) == ["node1", "node10", "node3"]
    assert allowed_nodes(review)[1:] == ["node1", "node10"]
    why = reasons(review)
    assert why["node2"] == "out of scope: not in partitions gpu"
    assert why["node4"] == "out of scope: not in [rollout] nodes"
    # Partitions asked for, but the placement system does not say: nothing is touched.
    review = guard.review([drain("node1")], situation(states()), 0.0)
    assert reasons(review)["node1"].startswith("out of scope: the placement system does not say")


def test_refusals_reach_the_audit_through_the_loop(tmp_path: Path) -> None:
    """The loop audits the guard's refusals, its events and its own Notify; alarms are errors."""
    from agent.act.audit import AuditLog, read_records
    from agent.act.executor import RecordingNotifier
    from policies.base import BasePolicy, Decision, PolicyMemory, PolicySettings

    class DrainAll(BasePolicy[PolicySettings, PolicyMemory]):
        name = "drain_all"
        safety = True

        def decide(
            self, situation: Situation, memory: PolicyMemory, now_s: float
        ) -> Decision[PolicyMemory]:
            return Decision([drain(str(n)) for n in situation.snapshot.node_names], memory)

    class Source:
        def observe(self, now_s: float):  # type: ignore[no-untyped-def]
            return make_snapshot([500.0] * 16, time_s=now_s)

    notes = RecordingNotifier()
    placement = FakePlacement(states=lambda names: states(len(names)))
    audit = AuditLog(tmp_path / "audit.jsonl")
    clock = FakeClock(100.0)
    loop = make_loop(
        Source(),
        [DrainAll(PolicySettings())],
        guard=GuardSettings(breaker_max_nodes=2, breaker_max_pct=100),
        placement=placement,
        notifier=notes,
        audit=audit,
        clock=clock,
    )
    report = loop.cycle()
    assert placement.done("drain") == ["node1", "node2"]
    assert any("circuit breaker OPEN" in e for e in report.errors)
    assert len(notes.sent) == 1 and notes.sent[0].policy == "guard"
    audit.close()
    records = list(read_records(tmp_path / "audit.jsonl"))
    events = [r["event"] for r in records]
    assert "guard_breaker_tripped" in events
    refusals = [r for r in records if r["event"] == "refusal"]
    assert {r["target"] for r in refusals} == {"node3", "node4"}
    assert all(r["reason"].startswith("circuit breaker") for r in refusals)
    guard_decisions = [r for r in records if r["event"] == "decision" and r["policy"] == "guard"]
    notify_actions = [r for r in records if r["event"] == "action" and r["kind"] == "notify"]
    assert len(guard_decisions) == 1 and notify_actions[0]["outcome"] == "applied"


def test_reset_without_a_running_daemon_applies_at_the_next_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The breaker trips, the daemon stops (its state saved); a person resets with the CLI while
    nothing runs; the next daemon loads the saved state and applies the reset at its first cycle."""
    from agent.cli import main

    settings = GuardSettings(breaker_max_nodes=1, breaker_max_pct=100, node_cooldown_s=0)
    state_dir = tmp_path / "state"
    first = make_gate(settings, reset_file=state_dir / RESET_FILE)
    apply(first, first.review([drain("node1"), drain("node2")], situation(), 0.0), 0.0)
    saved = json.dumps(first.ledger.to_dict())  # what the daemon persisted when it stopped
    assert first.ledger.breaker.open

    config = tmp_path / "agent.toml"
    config.write_text(f'[daemon]\nstate_dir = "{state_dir}"\n')
    assert main(["guard", "reset", "--config", str(config), "--note", "ok"]) == 0
    assert "applies it at its next cycle, or at its next start" in capsys.readouterr().out

    second = make_gate(settings, reset_file=state_dir / RESET_FILE)
    second.ledger.load_dict(json.loads(saved))
    assert second.ledger.breaker.open
    review = second.review([drain("node2")], situation(), 3600.0 * 24)
    assert [name for name, _ in review.events] == ["guard_reset"]
    assert allowed_nodes(review) == ["node2"] and not second.ledger.breaker.open


def test_guard_reset_cli_names_an_unwritable_state_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = tmp_path / "agent.toml"
    config.write_text(f'[daemon]\nstate_dir = "{blocker / "state"}"\n')
    assert main(["guard", "reset", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ooda: error: --state-dir {blocker / 'state'}: cannot write")


def test_state_dir_defaults_to_the_cluster_name() -> None:
    from agent.config import parse_config, state_dir

    assert state_dir(parse_config({"cluster": {"name": "lab"}})) == Path("/var/lib/ooda/lab")
    assert state_dir(parse_config({"daemon": {"state_dir": "/srv/ooda"}})) == Path("/srv/ooda")


def test_breaker_counts_drains_made_after_the_clock_went_back_past_a_reset() -> None:
    """A reset at t=10,000, then the clock steps back to 5,000: drains after the jump carry
    earlier times than the reset, and must count towards the breaker all the same."""
    guard = make_gate(
        GuardSettings(
            breaker_max_nodes=2, breaker_max_pct=100, drain_rate_max=100, node_cooldown_s=0
        )
    )
    guard.reset_breaker(10_000.0, by="op")
    assert guard.ledger.clock_went_back(5_000.0) == 5_000.0
    sit = situation()
    drained: list[str] = []
    for k, node in enumerate(["node1", "node2", "node3", "node4"]):
        t = 5_000.0 + 60.0 * k
        review = guard.review([drain(node)], sit, t)
        apply(guard, review, t)
        drained += allowed_nodes(review)
    assert drained == ["node1", "node2"] and guard.ledger.breaker.open


def test_requeue_needs_a_node_whose_scope_can_be_checked() -> None:
    """A requeue names a node not seen this cycle (its scope and opt-out unknown), or no node
    under a rollout scope: refused, as node intents on unseen nodes are."""
    rollout = Rollout(RolloutSettings(nodes="node[1-3]"), members=["node1", "node2", "node3"])
    guard = make_gate(GuardSettings(), rollout=rollout)
    unseen = RequeueJob(policy="health_drain", reason="xid", job="42", node="node99")
    nameless = RequeueJob(policy="health_drain", reason="xid", job="43", node="")
    inside = RequeueJob(policy="health_drain", reason="xid", job="44", node="node1")
    review = guard.review([unseen, nameless, inside], situation(), 0.0)
    assert [i.target_name() for i in review.allowed] == ["44"]
    assert "node99 not seen this cycle" in reasons(review)["42"]
    assert "rollout scope" in reasons(review)["43"]
    # Without a scope, a requeue that names no node still goes ahead (nothing to check).
    review = make_gate(GuardSettings()).review([nameless], situation(), 0.0)
    assert [i.target_name() for i in review.allowed] == ["43"]


def _one_gpu(limit_w: float) -> tuple[Situation, GpuTargets]:
    sit = situation(n_nodes=2, limit_w=limit_w)
    return sit, GpuTargets.from_rows(sit.snapshot, [0])


def test_a_cap_only_recorded_by_a_dry_policy_is_not_ours_to_release_live() -> None:
    """A live agent with one dry-run policy: that policy's cap is only recorded, so a live
    release (ownership, the daemon's on-exit release) must not touch the GPU, whose 500 W limit
    someone else set. The dry policy itself still sees its recorded cap."""
    guard = make_gate(GuardSettings(cap_cooldown_s=0.0), policy_dry_run={"shadow": True})
    sit, t = _one_gpu(500.0)
    advice = SetPowerCap(policy="shadow", reason="r", targets=t, watts=np.array([400.0]))
    apply(guard, guard.review([advice], sit, 0.0), 0.0, Outcome.RECORDED)
    assert guard.ledger.capped_by_us(t.uuid).tolist() == [True]
    assert guard.ledger.capped_by_us(t.uuid, recorded=False).tolist() == [False]
    live = ReleasePowerCap(policy="ownership", reason="job left", targets=t)
    review = guard.review([live], sit, 100.0)
    assert not review.allowed and review.refused[0].reason == "not capped by us"
    dry = ReleasePowerCap(policy="shadow", reason="r", targets=t)
    assert len(guard.review([dry], sit, 100.0).allowed) == 1
    # Applied for real, the cap is ours to a live release too.
    cap = SetPowerCap(policy="p", reason="r", targets=t, watts=np.array([400.0]))
    apply(guard, guard.review([cap], sit, 200.0), 200.0)
    assert len(guard.review([live], sit, 300.0).allowed) == 1


def test_state_saved_before_live_caps_were_told_apart_keeps_them_ours() -> None:
    guard = make_gate()
    sit, t = _one_gpu(700.0)
    cap = SetPowerCap(policy="p", reason="r", targets=t, watts=np.array([400.0]))
    apply(guard, guard.review([cap], sit, 0.0), 0.0)
    saved = guard.ledger.to_dict()
    del saved["caps"]["live_cap_w"]
    copy = make_gate()
    copy.ledger.load_dict(saved)
    assert copy.ledger.capped_by_us(t.uuid, recorded=False).tolist() == [True]


def test_a_raise_above_our_cap_waits_for_the_cooldown_while_telemetry_lags() -> None:
    """We lowered a GPU to 300 W; 10 s later the exporter still shows the old 700 W. A request
    for 650 W is a raise of our cap within the cooldown, however it compares with 700 W.
    Asking our own 300 W again is not a raise."""
    guard = make_gate(GuardSettings(cap_cooldown_s=60.0, cap_dead_band_w=10.0))
    sit, t = _one_gpu(700.0)
    first = SetPowerCap(policy="p", reason="r", targets=t, watts=np.array([300.0]))
    apply(guard, guard.review([first], sit, 0.0), 0.0)
    up = SetPowerCap(policy="p", reason="r", targets=t, watts=np.array([650.0]))
    review = guard.review([up], sit, 10.0)
    assert not review.allowed and review.refused[0].reason.startswith("cooldown")
    assert len(guard.review([first], sit, 10.0).allowed) == 1
    assert len(guard.review([up], sit, 70.0).allowed) == 1


def test_a_release_that_finds_the_default_in_place_ends_our_ownership() -> None:
    """Our 400 W cap is gone (the GPU was reset to its 700 W default): our release finds
    nothing to do, and the GPU is no longer ours (audited), so a later release of ours cannot
    undo a 500 W cap someone else sets there."""
    guard = make_gate(GuardSettings(cap_cooldown_s=0.0))
    at_default, t = _one_gpu(700.0)
    cap = SetPowerCap(policy="p", reason="r", targets=t, watts=np.array([400.0]))
    apply(guard, guard.review([cap], at_default, 0.0), 0.0)
    release = ReleasePowerCap(policy="p", reason="r", targets=t)
    review = guard.review([release], at_default, 100.0)
    assert review.unchanged == 1 and not review.allowed
    assert [name for name, _ in review.events] == ["guard_cap_found_released"]
    assert review.events[0][1]["uuids"] == t.uuid.tolist()
    assert guard.ledger.capped_by_us(t.uuid).tolist() == [False]
    someone_elses, _ = _one_gpu(500.0)
    review = guard.review([release], someone_elses, 200.0)
    assert not review.allowed and review.refused[0].reason == "not capped by us"


def test_a_long_job_id_keeps_its_cap_while_the_job_runs() -> None:
    """Job ids of any length (a Kubernetes namespace/pod name): a cap stamped with one is not
    outlived while that job runs, and is once another job with the same long prefix runs."""
    job = "ml-training/llama-70b-finetune-run-2025-06-01-" + "x" * 60
    snap = make_snapshot([500.0] * 8, jobs=[job] * 8)
    sit = Orienter().orient(snap, None, states(2))
    guard = make_gate(GuardSettings())
    t = GpuTargets.from_rows(snap, [0])
    cap = SetPowerCap(policy="p", reason="r", targets=t, watts=np.array([400.0]))
    apply(guard, guard.review([cap], sit, 0.0), 0.0)
    asserted = np.zeros(snap.n_gpus, dtype=bool)
    asserted[0] = True
    guard.ledger.stamp_cap_jobs(snap, asserted)
    holding = np.zeros(snap.n_gpus, dtype=bool)
    assert not guard.ledger.caps_outlived(snap, holding)[0]
    next_job = make_snapshot([500.0] * 8, jobs=[job[:-1] + "y"] * 8)
    assert guard.ledger.caps_outlived(next_job, holding)[0]
    copy = make_gate()
    copy.ledger.load_dict(json.loads(json.dumps(guard.ledger.to_dict())))
    assert not copy.ledger.caps_outlived(snap, holding)[0]


def test_a_cap_that_is_not_a_number_is_refused_live_and_advising() -> None:
    """A policy's NaN (or infinite) cap goes nowhere: recorded, it would have wiped what the
    guard remembers of our cap; live, it reached the actuator."""
    sit, t = _one_gpu(700.0)
    for dry in (False, True):
        guard = make_gate(GuardSettings(cap_cooldown_s=0.0), dry_run=dry)
        cap = SetPowerCap(policy="p", reason="r", targets=t, watts=np.array([400.0]))
        apply(guard, guard.review([cap], sit, 0.0), 0.0)
        for watts in (np.nan, np.inf):
            bad = SetPowerCap(policy="p", reason="r", targets=t, watts=np.array([watts]))
            review = guard.review([bad], sit, 100.0)
            assert not review.allowed
            assert review.refused[0].reason == "the cap asked is not a number"
        assert guard.ledger.capped_by_us(t.uuid).tolist() == [True]


def test_a_drain_only_recorded_as_advice_does_not_stand_for_a_live_one() -> None:
    """A live agent with an advising policy: its drain of node2 is only recorded, and laid over
    the real node states (so advising policies see it followed). A live drain of node2 must still
    go ahead, not count as 'already drained by us'; a live resume finds nothing to undo."""
    from agent.act.executor import RecordingPlacement

    class Real:
        def node_states(self, names: list[str]) -> NodeStates:
            return states()

    record = RecordingPlacement(Real())  # type: ignore[arg-type]
    record.drain("node2", "ooda: advice")
    overlaid = record.node_states(node_order())
    k = node_order().index("node2")
    assert overlaid.drained_by_us[k] and not overlaid.live_drained_by_us(k)
    sit = situation(overlaid)
    guard = make_gate(GuardSettings(), policy_dry_run={"shadow": True})
    review = guard.review([drain("node2")], sit, 0.0)
    assert allowed_nodes(review) == ["node2"] and review.unchanged == 0
    shadow = DrainNode(policy="shadow", reason="ooda: advice", node="node2")
    review = guard.review([shadow], sit, 0.0)
    assert not review.allowed and review.unchanged == 1  # advising: followed already
    resume = ResumeNode(policy="health_drain", reason="healthy", node="node2")
    review = guard.review([resume], sit, 0.0)
    assert not review.allowed and review.unchanged == 1


def test_advice_beside_a_live_agent_neither_uses_up_nor_trips_the_live_drain_limits() -> None:
    """A live agent with an advising policy: its recorded drains count for its own advice (as
    live would), but not against live drains, and advice past the breaker's limit is refused
    without opening the breaker that holds the live drains. All advising, it trips as before."""
    settings = GuardSettings(
        breaker_max_nodes=2, breaker_max_pct=100, drain_rate_max=100, node_cooldown_s=0
    )
    guard = make_gate(settings, policy_dry_run={"shadow": True})
    sit = situation()

    def advise(node: str) -> DrainNode:
        return DrainNode(policy="shadow", reason="ooda: advice", node=node)

    for t, node in enumerate(["node1", "node2"]):
        apply(guard, guard.review([advise(node)], sit, float(t)), float(t), Outcome.RECORDED)
    review = guard.review([advise("node3")], sit, 10.0)
    assert not review.allowed and "circuit breaker would trip" in review.refused[0].reason
    assert not guard.ledger.breaker.open
    live = guard.review([drain("node3"), drain("node4")], sit, 20.0)
    assert allowed_nodes(live) == ["node3", "node4"] and not guard.ledger.breaker.open
    # The same guard state, saved and restored, keeps advice apart from what was done.
    copy = make_gate(settings, policy_dry_run={"shadow": True})
    copy.ledger.load_dict(json.loads(json.dumps(guard.ledger.to_dict())))
    assert [n for _, n in copy.ledger.advised_drains] == [
        "node1",
        "node2",
    ] and copy.ledger.drains == []
    # A dry-run agent (everything advice) trips the breaker, as live would.
    all_dry = make_gate(settings, dry_run=True)
    for t, node in enumerate(["node1", "node2"]):
        apply(all_dry, all_dry.review([drain(node)], sit, float(t)), float(t), Outcome.RECORDED)
    review = all_dry.review([drain("node3")], sit, 10.0)
    assert allowed_nodes(review) == [] and all_dry.ledger.breaker.open

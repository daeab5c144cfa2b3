"""A kill after the actuators ran but before the state save: what the agent had just set is found
again in the audit log, and telemetry decides what of it is ours (agent/act/recovery.py).

The twin stands in for the hardware. Real hardware keeps a cap through the agent's death; here
that is the twin saved (`TwinStore`) while the agent's own state file is not."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.act.audit import AuditLog
from agent.act.ledger import Ledger
from agent.act.recovery import Recovered, recover, unsaved_records
from agent.core.clock import FakeClock
from agent.core.intents import Action, DrainNode, GpuTargets, Outcome, SetPowerCap
from agent.daemon.service import Daemon
from tests.conftest import make_snapshot
from tests.daemon_helpers import (
    START_UNIX,
    Killed,
    audit_events,
    capped_gpus,
    drive,
    gone,
    in_process,
    sample,
    twin_config,
    write,
)


def _config(tmp_path: Path, on_exit: str = "release") -> Path:
    return write(
        tmp_path / "ooda.toml",
        twin_config(dry_run=False, budget_w=5000, daemon_extra=f'on_exit = "{on_exit}"'),
    )


@contextmanager
def _restarted(cfg: Path, state: Path, wall: FakeClock) -> Iterator[Daemon]:
    """The agent started again on the same state directory, stopped when done."""
    daemon = in_process(cfg, state, wall=wall)
    try:
        yield daemon
    finally:
        daemon.shutdown()


def _first_run(tmp_path: Path) -> tuple[Path, Path, FakeClock, Daemon]:
    """A live agent on the twin, its state saved before it did anything."""
    cfg, state, wall = _config(tmp_path), tmp_path / "state", FakeClock(START_UNIX)
    first = in_process(cfg, state, wall=wall)
    assert first.save_state()
    return cfg, state, wall, first


def _state_file_lost(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on the agent's own state file is never written (the twin's still is)."""
    monkeypatch.setattr(daemon.store, "save", lambda *_a, **_k: 0)


def _recovered(state: Path) -> list[dict[str, Any]]:
    return [e for e in audit_events(state / "audit.jsonl") if e["event"] == "guard_caps_recovered"]


def _kill_before_the_save(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, wall: FakeClock, hardware_keeps: bool
) -> None:
    """One cycle that acts, then the agent's state file is never written (the twin is, when the
    hardware keeps what was set)."""
    _state_file_lost(daemon, monkeypatch)
    if not hardware_keeps:
        monkeypatch.setattr(daemon.twin_store, "save", lambda *_a, **_k: None)
    (report,) = drive(daemon, wall, 1)
    assert any(a.outcome is Outcome.APPLIED for a in report.actions)


def test_caps_set_after_the_last_save_are_adopted_and_released_on_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, state, wall, first = _first_run(tmp_path)
    _kill_before_the_save(first, monkeypatch, wall, hardware_keeps=True)
    capped = capped_gpus(first)
    assert capped > 0
    gone(first)

    second = in_process(cfg, state, wall=wall)
    guard = second.runtime.loop.ledger
    assert not np.isfinite(guard.caps["live_cap_w"]).any()  # the saved state knew of none
    assert len(guard.pending) == capped  # the audit log did
    drive(second, wall, 1)
    (event,) = _recovered(state)
    assert len(event["adopted"]) == capped and not event["not_in_force"]
    assert len(guard.pending) == 0
    assert sample(second, "ooda_caps_settled_total", result="adopted") == capped
    # Ours again, so the on-exit release gives every one of them back. Without the audit log
    # they would stay capped for good: nobody owned them.
    assert second.shutdown()
    assert capped_gpus(second) == 0


def test_a_clean_stop_leaves_nothing_to_recover(tmp_path: Path) -> None:
    # The on-exit release is made after the last cycle and saved with the state.
    cfg, state, wall, first = _first_run(tmp_path)
    drive(first, wall, 1)
    assert capped_gpus(first) > 0
    assert first.shutdown()
    with _restarted(cfg, state, wall) as second:
        assert len(second.runtime.loop.ledger.pending) == 0
    assert not _recovered(state)


def test_an_unreadable_state_still_leaves_the_caps_in_force_ours(tmp_path: Path) -> None:
    # The state file is lost (moved aside as unreadable): the agent starts fresh, and the audit
    # log, read whole, says which caps in force are its own.
    cfg = _config(tmp_path, on_exit="renew")
    state, wall = tmp_path / "state", FakeClock(START_UNIX)
    first = in_process(cfg, state, wall=wall)
    drive(first, wall, 3)
    assert first.shutdown()  # the caps stay (renew on exit)
    capped = capped_gpus(first)
    assert capped > 0
    (state / "lab.state.json").write_text("{")

    with _restarted(cfg, state, wall) as second:
        assert not second.restored
        (report,) = drive(second, wall, 1)
        (event,) = _recovered(state)
        assert len(event["adopted"]) == capped
        guard = second.runtime.loop.ledger
        owned = guard.capped_by_us(report.snapshot.uuid, recorded=False)
        assert int(owned.sum()) >= capped_gpus(second) > 0


def test_caps_that_are_not_in_force_after_the_restart_are_not_adopted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cluster went back with the agent (the twin restored from its own older save): the caps
    # the log names are not there, so none is claimed.
    cfg, state, wall, first = _first_run(tmp_path)
    _kill_before_the_save(first, monkeypatch, wall, hardware_keeps=False)
    gone(first)

    with _restarted(cfg, state, wall) as second:
        pending = len(second.runtime.loop.ledger.pending)
        assert pending > 0
        drive(second, wall, 1)  # settled before the policies decide
        (event,) = _recovered(state)
        assert len(event["not_in_force"]) == pending and not event["adopted"]
        assert len(second.runtime.loop.ledger.pending) == 0


def test_a_kill_while_the_actuator_runs_leaves_decisions_whose_caps_telemetry_confirms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Killed inside the actuator call: the decision is on disk (fsynced before acting), no action
    # record is. The cap was set, so telemetry shows it in force and it is adopted.
    cfg, state, wall, first = _first_run(tmp_path)
    caps = first.runtime.actuators.caps
    real_set = caps.set_caps

    def set_then_die(*args: Any, **kwargs: Any) -> Any:
        real_set(*args, **kwargs)
        raise Killed()

    monkeypatch.setattr(caps, "set_caps", set_then_die)
    wall.advance(15)
    with pytest.raises(Killed):
        first.run_cycle()
    records = audit_events(state / "audit.jsonl")
    assert any(r["event"] == "decision" for r in records)
    assert not any(r["event"] == "action" for r in records)
    # The hardware keeps the caps: only the twin is saved.
    _state_file_lost(first, monkeypatch)
    assert first.save_state()
    capped = capped_gpus(first)
    gone(first)

    second = in_process(cfg, state, wall=wall)
    drive(second, wall, 1)
    (event,) = _recovered(state)
    assert len(event["adopted"]) == capped > 0
    assert second.shutdown()
    assert capped_gpus(second) == 0


# -- which records a save covers -------------------------------------------------------------------


def _cycle(audit: AuditLog, run: str, cycle: int, t: float, watts: float, act: bool) -> None:
    targets = GpuTargets.from_rows(make_snapshot([0.0, 0.0]), [0, 1])  # node1/gpu0, node1/gpu1
    intent = SetPowerCap(policy="p", reason="r", targets=targets, watts=np.full(2, watts))
    decision_id = f"d-{run}-{cycle:06d}-0001"
    audit.decision(decision_id, intent, False, t)
    if act:
        action_id = f"a-{run}-{cycle:06d}-0002"
        audit.action(Action(action_id, decision_id, intent, Outcome.APPLIED, False, time_s=t))


def test_only_decisions_after_the_saved_cycle_and_their_records_are_read_back(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path=path, max_bytes=600, keep=20)  # a file or two per cycle
    _cycle(audit, "aaaaaa", 1, 100.0, 300.0, act=True)
    _cycle(audit, "aaaaaa", 2, 115.0, 310.0, act=True)  # saved after this one
    _cycle(audit, "aaaaaa", 3, 130.0, 320.0, act=True)
    drain = DrainNode(policy="health_drain", reason="xid 79", node="node2")
    audit.decision("d-aaaaaa-000003-0003", drain, False, 130.0)
    audit.action(
        Action("a-aaaaaa-000003-0004", "d-aaaaaa-000003-0003", drain, Outcome.APPLIED, False)
    )
    audit.event("decision", decision_id="d-rollback-1", time_s=999.0)  # not the loop's own
    _cycle(audit, "bbbbbb", 1, 145.0, 330.0, act=False)  # killed while the actuator ran
    audit.close()
    assert len(list(tmp_path.glob("audit.jsonl*"))) > 3  # rotated: read across files

    found = Recovered()
    records = unsaved_records(path, 115.0, found)
    assert {r["decision_id"] for r in records} == {
        "d-aaaaaa-000003-0001",
        "d-aaaaaa-000003-0003",
        "d-bbbbbb-000001-0001",
    }
    guard = Ledger()
    recovered = recover(guard, path, 115.0)
    assert recovered.pending_caps == 2 and recovered.unconfirmed == 2
    assert recovered.node_actions == 1
    assert guard.pending["watts"].tolist() == [330.0, 330.0]  # the last change of each GPU
    assert guard.pending["time_s"].tolist() == [145.0, 145.0]
    assert [n for _, n in guard.drains] == ["node2"]  # counts towards the breaker again
    # Persisted with the guard: a second kill before the first cycle loses nothing.
    again = Ledger()
    again.load_dict(guard.to_dict())
    assert again.pending.keys.tolist() == ["node1/gpu0", "node1/gpu1"]

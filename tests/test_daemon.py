"""The daemon in-process: many cycles on a FakeClock, restarts with state, reloads, the lock, the
scheduler with short real intervals, /metrics and the health checks over real HTTP."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from structlog.testing import capture_logs

from agent.act.gate import Gate
from agent.act.node_client import NodeCapActuator, NodeClientSettings
from agent.core.clock import FakeClock, SystemClock
from agent.core.errors import BadInputError
from agent.core.intents import GpuTargets, IntentKind, SetPowerCap
from agent.core.protocols import Persistent
from agent.core.snapshot import Snapshot
from agent.daemon import AlreadyRunningError
from agent.daemon.service import parse_listen
from agent.daemon.state import StateFile
from agent.daemon.telemetry import refusal_class
from agent.loop import STAGES, CycleReport, Loop
from tests.daemon_helpers import (
    START_UNIX,
    HealthFromXid,
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
from tests.fakes import RenewingCaps, make_gate


def same(a: object, b: object) -> bool:
    """Equal as JSON (NaN, which never equals itself, included)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_many_cycles_on_a_fake_clock(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "ooda.toml",
        twin_config(
            nodes=4, budget_w=18000, faults=("fan=1.8:node2/gpu1@600", "dropout:node3@1800+300")
        ),
    )
    wall = FakeClock(START_UNIX)
    daemon = in_process(cfg, tmp_path / "state", wall=wall)
    try:
        twin = daemon.runtime.twin
        assert twin is not None and twin.t_s == 0.0
        assert not daemon.health().ready  # nothing seen yet
        reports = drive(daemon, wall, 400)
        # The twin follows (fake) wall time: 400 intervals of 15 s.
        assert twin.t_s == pytest.approx(400 * 15.0)
        assert [r.cycle for r in reports] == list(range(1, 401))
        assert sample(daemon, "ooda_cycles_total", result="failed") == 0
        ok = sample(daemon, "ooda_cycles_total", result="ok") or 0.0
        degraded = sample(daemon, "ooda_cycles_total", result="degraded") or 0.0
        assert ok + degraded == 400
        # node3's exporter dropout: its 8 GPUs go stale, then come back
        assert max(int(r.snapshot.stale.sum()) for r in reports) == 8
        assert (sample(daemon, "ooda_gpus_stale") or 0) == 0  # node3 is back
        for stage in STAGES:
            assert sample(daemon, "ooda_stage_duration_seconds_count", stage=stage) == 400
        # Dry-run: what it would do is visible, and nothing was applied.
        assert (sample(daemon, "ooda_recommended_caps", policy="power_budget") or 0) > 0
        assert np.all(twin.cap_w == twin.default_w)
        # State saved at least every state_save_interval_s (30 s) of wall time.
        assert (sample(daemon, "ooda_state_saves_total", result="ok") or 0) >= 200
        assert daemon.health().ready and daemon.progressing()
        # No cycle for a while: not ready; much longer: not progressing (the watchdog starves).
        wall.advance(60)
        assert not daemon.health().ready and daemon.progressing()
        wall.advance(60)
        assert not daemon.progressing()
    finally:
        assert daemon.shutdown()


def _assert_cooldown_resumed(
    loop: Loop, guard_before: dict[str, Any], last_report: CycleReport
) -> None:
    """Cooldowns resume: raising a cap the first run changed in its last cycle is refused; a
    guard that forgot would allow it."""
    last_change = np.array(guard_before["caps"]["last_change_s"])
    latest = float(last_change[np.isfinite(last_change)].max())
    uuid = np.array(guard_before["caps"]["keys"])[last_change == latest][0]
    row = int(np.flatnonzero(last_report.snapshot.uuid == uuid)[0])
    raise_cap = SetPowerCap(
        policy="power_budget",
        reason="test",
        targets=GpuTargets.from_rows(last_report.snapshot, [row]),
        watts=np.array([last_report.situation.cap_w[row] + 100.0]),
    )
    now = latest + 15
    live = Gate(loop.ledger)  # the ledger as a live agent's gate reads it
    review = live.review([raise_cap], last_report.situation, now)
    assert review.refused and "cooldown" in review.refused[0].reason
    fresh = make_gate(loop.gate.settings).review([raise_cap], last_report.situation, now)
    assert fresh.allowed and not fresh.refused


def test_restart_resumes_cooldowns_and_ownership_without_repeated_drains(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "ooda.toml",
        twin_config(
            dry_run=False,
            budget_w=9000,
            faults=("xid=79:node2/gpu1@30+120",),
            extra="[policies.power_budget]\n[policies.health_drain]\nresume_hold_s = 60\n",
        ),
    )
    state_dir = tmp_path / "state"
    wall = FakeClock(START_UNIX)
    first = in_process(cfg, state_dir, wall=wall)
    first.runtime.loop.orienter = HealthFromXid(first.runtime.loop.orienter)
    drive(first, wall, 8)  # twin t = 120 s: node2 drained
    twin = first.runtime.twin
    assert twin is not None and bool(twin.node_drained[1])
    assert first.shutdown()
    saved = json.loads((state_dir / "lab.state.json").read_text())
    guard_before = saved["parts"]["guard"]
    last_report = first.last_report
    assert last_report is not None
    last_t = last_report.time_s
    assert guard_before["nodes"]["keys"] == ["node2"]

    wall.advance(5)
    second = in_process(cfg, state_dir, wall=wall)
    try:
        assert second.restored and second.state_problems == []
        assert sample(second, "ooda_state_restored") == 1
        loop = second.runtime.loop
        loop.orienter = HealthFromXid(loop.orienter)
        # Same cluster (the twin was saved with the state), same memory.
        assert second.runtime.twin is not None
        assert second.runtime.twin.t_s == pytest.approx(last_t)
        assert bool(second.runtime.twin.node_drained[1])
        assert same(loop.ledger.to_dict(), guard_before)
        # The last cycle's time too: a restart after the clock went back sees the jump.
        assert loop.to_dict() == saved["parts"]["loop"] == {"last_cycle_s": last_t}
        _assert_cooldown_resumed(loop, guard_before, last_report)
        # Ownership: the node the first run drained is resumed by the second, once healthy.
        # The fault ends at 150 s and the hold is 60 s, but the node cooldown (300 s) the first
        # run started with its drain holds until then: restored, it still does.
        drive(second, wall, 20)  # to t = 420 s
        assert not bool(second.runtime.twin.node_drained[1])
    finally:
        assert second.shutdown()
    events = audit_events(state_dir / "audit.jsonl")
    applied = [e for e in events if e["event"] == "action" and e["outcome"] == "applied"]
    drains = [e for e in applied if e["kind"] == str(IntentKind.DRAIN_NODE)]
    resumes = [e for e in applied if e["kind"] == str(IntentKind.RESUME_NODE)]
    assert [d["target"] for d in drains] == ["node2"]  # once, across the restart
    assert [r["target"] for r in resumes] == ["node2"]
    drained_at = drains[0]["time_s"]
    held = [
        e
        for e in events
        if e["event"] == "refusal" and e["kind"] == "resume_node" and "cooldown" in e["reason"]
    ]
    assert held and all(e["time_s"] < drained_at + 300 for e in held)
    assert drained_at + 300 <= resumes[0]["time_s"] < drained_at + 300 + 15 + 1
    assert len({e["decision_id"].split("-")[1] for e in applied}) == 2  # two runs


@pytest.mark.parametrize(("dies_in", "owns_caps"), [("store", False), ("twin_store", True)])
def test_a_kill_during_the_state_save_never_leaves_caps_the_agent_does_not_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dies_in: str, owns_caps: bool
) -> None:
    # The twin pickle (the cluster, with the caps) was written before the state file (the
    # ownership): killed between the two, the restarted agent owned none of the caps it had set
    # and could never release them.
    cfg = write(tmp_path / "ooda.toml", twin_config(dry_run=False, budget_w=5000))
    state = tmp_path / "state"
    wall = FakeClock(START_UNIX)
    first = in_process(cfg, state, wall=wall)
    assert first.save_state()  # from before any action

    def die(*_args: object, **_kwargs: object) -> None:
        raise Killed()

    monkeypatch.setattr(getattr(first, dies_in), "save", die)
    wall.advance(15)
    with pytest.raises(Killed):
        first.run_cycle()  # acts, then dies in its state save
    assert capped_gpus(first) > 0
    gone(first)

    second = in_process(cfg, state, wall=wall)
    try:
        capped = capped_gpus(second)
        owned = int(np.isfinite(second.runtime.loop.ledger.caps["our_cap_w"]).sum())
        assert owned >= capped, f"{capped} GPUs capped after the restart, {owned} owned"
        # Either way the twin's save came after the agent's: it has none of the new caps; the
        # agent owns them only where its own state was saved (it releases or resets them).
        assert capped == 0 and (owned > 0) is owns_caps
    finally:
        second.shutdown()


def test_unreadable_state_is_reported_moved_aside_and_the_agent_starts_fresh(
    tmp_path: Path,
) -> None:
    cfg = write(tmp_path / "ooda.toml", twin_config())
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "lab.state.json").write_text('{"format": "ooda-daemon-state", "vers')
    (state_dir / ".lab.state.json.x1y2.tmp").write_text("{")  # a writer killed mid-write
    with capture_logs() as logs:
        daemon = in_process(cfg, state_dir)
    try:
        assert not daemon.restored
        assert "not valid JSON" in daemon.state_problems[0]
        assert sample(daemon, "ooda_state_load_problems_total") == 1
        assert any(e["event"] == "state_unreadable_starting_fresh" for e in logs)
        assert not list(state_dir.glob(".*.tmp"))
        kept = list(state_dir.glob("lab.state.json.unreadable-*"))
        assert len(kept) == 1 and kept[0].read_text().startswith('{"format"')
        assert daemon.run_cycle() is not None
        assert StateFile(state_dir, "lab").load().found  # a good one replaced it
    finally:
        daemon.shutdown()


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        (
            {"format": "ooda-daemon-state", "version": 99, "cluster": "lab", "parts": {}},
            "version 99",
        ),
        ({"format": "ooda-daemon-state", "version": 1, "cluster": "other", "parts": {}}, "other"),
        ({"format": "something-else"}, "not an ooda state file"),
        ([1, 2, 3], "not an ooda state file"),
    ],
)
def test_state_from_elsewhere_is_not_loaded(tmp_path: Path, document: object, problem: str) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "lab.state.json").write_text(json.dumps(document))
    loaded = StateFile(state_dir, "lab").load()
    assert loaded.problem is not None and problem in loaded.problem
    assert not (state_dir / "lab.state.json").exists()


def test_one_unreadable_part_starts_fresh_alone(tmp_path: Path) -> None:
    cfg = write(tmp_path / "ooda.toml", twin_config(dry_run=False))
    state_dir = tmp_path / "state"
    wall = FakeClock(START_UNIX)
    daemon = in_process(cfg, state_dir, wall=wall)
    drive(daemon, wall, 3)
    daemon.shutdown()
    path = state_dir / "lab.state.json"
    document = json.loads(path.read_text())
    guard = document["parts"]["guard"]
    document["parts"]["policies"]["health_drain"] = {"healthy_since_s": "not a mapping"}
    path.write_text(json.dumps(document))
    daemon = in_process(cfg, state_dir, wall=wall)
    try:
        assert daemon.restored
        assert [p.split(":")[0] for p in daemon.state_problems] == ["policies.health_drain"]
        assert same(daemon.runtime.loop.ledger.to_dict(), guard)
    finally:
        daemon.shutdown()


def test_state_from_another_twin_is_not_applied(tmp_path: Path) -> None:
    cfg = write(tmp_path / "ooda.toml", twin_config(dry_run=False))
    state_dir = tmp_path / "state"
    wall = FakeClock(START_UNIX)
    daemon = in_process(cfg, state_dir, wall=wall)
    drive(daemon, wall, 3)
    daemon.shutdown()
    (state_dir / "lab.twin.pickle").unlink()  # the twin is gone: a new one starts at t = 0
    daemon = in_process(cfg, state_dir, wall=wall)
    try:
        assert not daemon.restored
        assert "timeline" in daemon.state_problems[0]
        assert len(daemon.runtime.loop.ledger.caps) == 0
    finally:
        daemon.shutdown()


def test_state_files_are_private_and_written_whole(tmp_path: Path) -> None:
    cfg = write(tmp_path / "ooda.toml", twin_config())
    state_dir = tmp_path / "state"
    wall = FakeClock(START_UNIX)
    daemon = in_process(cfg, state_dir, wall=wall)
    drive(daemon, wall, 2)
    daemon.shutdown()
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    for name in ("lab.state.json", "lab.twin.pickle", "lab.lock"):
        assert stat.S_IMODE((state_dir / name).stat().st_mode) == 0o600, name
    assert not [p for p in state_dir.iterdir() if p.name.endswith(".tmp")]
    document = json.loads((state_dir / "lab.state.json").read_text())
    assert (document["format"], document["version"], document["cluster"]) == (
        "ooda-daemon-state",
        1,
        "lab",
    )
    assert set(document["parts"]) >= {"guard", "orienter", "policies", "recommendations"}


def test_a_second_instance_for_the_same_cluster_is_refused(tmp_path: Path) -> None:
    cfg = write(tmp_path / "ooda.toml", twin_config())
    state_dir = tmp_path / "state"
    daemon = in_process(cfg, state_dir)
    try:
        with pytest.raises(AlreadyRunningError, match=rf"pid {os.getpid()} holds .*lab\.lock"):
            in_process(cfg, state_dir)
        other = in_process(write(tmp_path / "b.toml", twin_config(cluster="b")), state_dir)
        other.shutdown()  # another cluster, same directory: fine
    finally:
        daemon.shutdown()
    in_process(cfg, state_dir).shutdown()  # released on stop


def test_an_unusable_state_dir_is_a_config_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It exists, but the lock cannot be created there (a read-only mount, another user's
    # directory): a raw OSError traceback (exit 1, a restart loop under Restart=) before.
    cfg = write(tmp_path / "ooda.toml", twin_config())
    state_dir = tmp_path / "state"
    (state_dir / "lab.lock").mkdir(parents=True)  # the lock cannot be opened, even as root
    with pytest.raises(BadInputError, match=r"daemon\.state_dir: .*lab\.lock: Is a directory"):
        in_process(cfg, state_dir)
    (state_dir / "lab.lock").rmdir()
    # A read-only mount (root can write anywhere else): the access check says so.
    real_access = os.access
    monkeypatch.setattr(  # process-wide: os.access is the one the daemon calls
        os,
        "access",
        lambda path, mode: False if Path(path) == state_dir else real_access(path, mode),
    )
    with pytest.raises(BadInputError, match=r"daemon\.state_dir: .*not writable"):
        in_process(cfg, state_dir)
    monkeypatch.undo()
    in_process(cfg, state_dir).shutdown()  # nothing left held


def test_reload_takes_a_good_config_and_refuses_a_bad_one(tmp_path: Path) -> None:
    cfg = write(tmp_path / "ooda.toml", twin_config(dry_run=False))
    wall = FakeClock(START_UNIX)
    daemon = in_process(cfg, tmp_path / "state", wall=wall)
    try:
        drive(daemon, wall, 3)
        guard = daemon.runtime.loop.ledger.to_dict()
        twin = daemon.runtime.twin
        write(
            cfg, twin_config(dry_run=False, interval_s=30, extra="[guard]\ncap_cooldown_s = 90\n")
        )
        assert daemon.reload()
        assert daemon.interval_s == 30 and daemon.runtime.loop.gate.settings.cap_cooldown_s == 90
        assert same(daemon.runtime.loop.ledger.to_dict(), guard)  # memory carried over
        assert daemon.runtime.twin is twin  # same [twin]: the same cluster
        assert daemon.runtime.loop.cycles == 3
        assert sample(daemon, "ooda_interval_seconds") == 30
        assert drive(daemon, wall, 1)[0].cycle == 4

        write(cfg, twin_config(dry_run=False, extra="[guard]\ncap_cooldown_s = -5\n"))
        with capture_logs() as logs:
            assert not daemon.reload()
        refused = [e for e in logs if e["event"] == "config_reload_refused"]
        assert "guard.cap_cooldown_s" in refused[0]["error"]
        assert daemon.interval_s == 30  # the old configuration runs on
        write(cfg, twin_config(cluster="renamed", dry_run=False))
        with capture_logs() as logs:
            assert not daemon.reload()
        assert "cluster.name" in logs[-1]["error"]
        assert sample(daemon, "ooda_config_reloads_total", result="refused") == 2
        assert sample(daemon, "ooda_config_reloads_total", result="ok") == 1
        assert drive(daemon, wall, 1)[0].cycle == 5
    finally:
        daemon.shutdown()


@pytest.mark.parametrize("key", ["interval_s", "misfire_grace_s"])
@pytest.mark.parametrize("value", ["inf", "nan", "1e12"])
def test_an_interval_the_scheduler_cannot_take_is_a_config_error(
    tmp_path: Path, key: str, value: str
) -> None:
    # inf or a huge interval overflowed APScheduler at start (a traceback naming no key).
    text = (
        twin_config(interval_s=float(value))
        if key == "interval_s"
        else twin_config(daemon_extra=f"{key} = {value}")
    )
    cfg = write(tmp_path / "ooda.toml", text)
    with pytest.raises(BadInputError, match=rf"daemon\.{key}"):
        in_process(cfg, tmp_path / "state")


def test_a_reload_the_scheduler_refuses_keeps_the_old_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The new runtime used to be swapped in and the old one closed before the reschedule raised,
    # which killed the daemon without on_exit or a state save.
    cfg = write(tmp_path / "ooda.toml", twin_config(dry_run=False))
    wall = FakeClock(START_UNIX)
    daemon = in_process(cfg, tmp_path / "state", wall=wall)
    try:
        old = daemon.runtime

        def overflow(**_kwargs: float) -> None:
            raise OverflowError("date value out of range")

        monkeypatch.setattr("agent.daemon.service.IntervalTrigger", overflow)
        write(cfg, twin_config(dry_run=False, interval_s=30))
        with capture_logs() as logs:
            assert not daemon.reload()
        assert any(e["event"] == "config_reload_refused" for e in logs)
        assert daemon.runtime is old and daemon.interval_s == 15
        audit = tmp_path / "state" / "audit.jsonl"
        before = audit.stat().st_size
        monkeypatch.undo()
        assert drive(daemon, wall, 1)[0] is not None  # the old runtime runs on, its log open
        assert audit.stat().st_size > before
        assert sample(daemon, "ooda_config_reloads_total", result="refused") == 1
    finally:
        assert daemon.shutdown()


def test_force_dry_run_overrides_the_file_and_each_policy(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "ooda.toml",
        twin_config(dry_run=False, extra="[policies.power_budget]\ndry_run = false\n"),
    )
    wall = FakeClock(START_UNIX)
    daemon = in_process(cfg, tmp_path / "state", wall=wall, dry_run=True)
    try:
        report = drive(daemon, wall, 1)[0]
        assert report.actions and all(a.dry_run for a in report.actions)
        twin = daemon.runtime.twin
        assert twin is not None and np.all(twin.cap_w == twin.default_w)
    finally:
        daemon.shutdown()


def test_on_exit_release_gives_back_every_cap_we_set(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "ooda.toml",
        twin_config(dry_run=False, daemon_extra='on_exit = "release"'),
    )
    state_dir = tmp_path / "state"
    wall = FakeClock(START_UNIX)
    daemon = in_process(cfg, state_dir, wall=wall)
    drive(daemon, wall, 2)
    twin = daemon.runtime.twin
    assert twin is not None and np.any(twin.cap_w < twin.default_w)
    assert daemon.shutdown()
    assert np.all(twin.cap_w == twin.default_w)
    released = [
        e
        for e in audit_events(state_dir / "audit.jsonl")
        if e["event"] == "action" and e["policy"] == "ooda-daemon"
    ]
    assert released and released[0]["kind"] == "release_power_cap"
    assert released[0]["outcome"] == "applied"


def test_the_scheduler_never_overlaps_cycles_and_reports_overruns(tmp_path: Path) -> None:
    cfg = write(tmp_path / "ooda.toml", twin_config(interval_s=0.05, speed=0))
    daemon = in_process(cfg, tmp_path / "state", wall=SystemClock())
    inner = daemon.runtime.loop.source
    running = 0
    most = 0
    calls = 0
    lock = threading.Lock()

    class SlowSometimes:
        """Every fifth observation takes three intervals."""

        def observe(self, now_s: float) -> Snapshot:
            nonlocal running, most, calls
            with lock:
                running += 1
                most = max(most, running)
                calls += 1
                slow = calls % 5 == 0
            try:
                if slow:
                    time.sleep(0.15)
                return inner.observe(now_s)
            finally:
                with lock:
                    running -= 1

    daemon.runtime.loop.source = SlowSometimes()
    daemon.start_scheduler()
    try:
        time.sleep(1.5)
    finally:
        assert daemon.shutdown()
    assert most == 1  # never two cycles at once
    assert calls >= 8
    assert (sample(daemon, "ooda_cycle_overruns_total") or 0) >= 1
    assert (sample(daemon, "ooda_cycles_skipped_total", reason="overlap") or 0) >= 1


def test_metrics_and_health_over_http(tmp_path: Path) -> None:
    cfg = write(tmp_path / "ooda.toml", twin_config())
    wall = FakeClock(START_UNIX)
    daemon = in_process(cfg, tmp_path / "state", wall=wall, listen=("127.0.0.1", 0))
    try:
        assert daemon.server is not None
        url = f"http://127.0.0.1:{daemon.server.port}"
        assert httpx.get(f"{url}/healthz").status_code == 200
        not_ready = httpx.get(f"{url}/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json()["reason"] == "no cycle has seen the fleet yet"
        drive(daemon, wall, 3)
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 200 and ready.json()["gpus"] == 16
        text = httpx.get(f"{url}/metrics").text
        for stage in STAGES:
            assert f'ooda_stage_duration_seconds_count{{stage="{stage}"}} 3.0' in text
            assert f'ooda_stage_duration_seconds_bucket{{le="0.01",stage="{stage}"}}' in text
            assert f'ooda_stage_last_duration_seconds{{stage="{stage}"}}' in text
        assert "ooda_cycle_duration_seconds_count 3.0" in text
        assert 'ooda_info{cluster="lab",source="twin",version=' in text
        assert "ooda_gpus_seen 16.0" in text
        assert "ooda_budget_watts 9000.0" in text
        assert "ooda_dry_run 1.0" in text
        assert 'ooda_intents_total{kind="set_power_cap",policy="power_budget"}' in text
        assert (
            'ooda_actions_total{kind="set_power_cap",outcome="recorded",policy="power_budget"}'
            in text
        )
        assert re.search(
            r'^ooda_recommended_cap_watts\{gpu="\d",node="node\d",policy="power_budget",'
            r'uuid="GPU-[0-9a-f-]+"\} \d+',
            text,
            re.MULTILINE,
        )
        assert "ooda_process_resident_memory_bytes" in text
        names = {
            line.split("{")[0].split(" ")[0]
            for line in text.splitlines()
            if line and not line.startswith("#")
        }
        assert all(name.startswith("ooda_") for name in names), names
        assert httpx.get(f"{url}/nope").status_code == 404
    finally:
        daemon.shutdown()


def test_per_gpu_recommendations_are_capped_largest_first(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "ooda.toml", twin_config(nodes=4, daemon_extra="per_gpu_metrics_max = 5")
    )
    wall = FakeClock(START_UNIX)
    daemon = in_process(cfg, tmp_path / "state", wall=wall)
    try:
        drive(daemon, wall, 2)
        total = sample(daemon, "ooda_recommended_caps", policy="power_budget") or 0
        assert total > 5
        assert sample(daemon, "ooda_recommended_caps_exported") == 5
        samples = [
            s
            for m in daemon.metrics.registry.collect()
            if m.name == "ooda_recommended_cap_watts"
            for s in m.samples
        ]
        assert len(samples) == 5
        top = daemon.metrics.recommendations.top(int(total))
        assert [s.labels["uuid"] for s in samples] == [t[0] for t in top[:5]]
    finally:
        daemon.shutdown()


def test_refusal_reasons_map_to_a_fixed_set_of_classes() -> None:
    assert refusal_class("cooldown: changed less than 60 s ago") == "cooldown"
    assert refusal_class("telemetry stale: no action on what cannot be seen") == "stale"
    assert refusal_class("GPU not seen this cycle") == "not_seen"
    assert refusal_class("drained by someone else: never resumed by us") == "not_ours"
    assert refusal_class("circuit breaker open: 3 drains in 1h") == "breaker"
    assert refusal_class("out of scope: not in [rollout] nodes (node node9)") == "out_of_scope"
    assert refusal_class("the job's node is not known: the rollout scope cannot hold") == (
        "out_of_scope"
    )
    assert refusal_class("the cap asked is not a number") == "invalid"
    assert refusal_class("something new") == "other"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:0", ("::1", 0)), ("off", None)],
)
def test_metrics_listen_parses(text: str, expected: object) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9464", "localhost", "1.2.3.4:99999", "[::1]"])
def test_metrics_listen_errors_name_the_option(text: str) -> None:
    with pytest.raises(BadInputError, match="--metrics-listen"):
        parse_listen(text)


def test_a_cycle_that_does_not_finish_in_the_grace_is_abandoned(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "ooda.toml",
        twin_config(interval_s=0.05, speed=0, daemon_extra="stop_grace_s = 0.3"),
    )
    state_dir = tmp_path / "state"
    daemon = in_process(cfg, state_dir, wall=SystemClock())
    inner = daemon.runtime.loop.source
    hung = threading.Event()
    release = threading.Event()

    class HangsOnTheThirdCall:
        calls = 0

        def observe(self, now_s: float) -> Snapshot:
            self.calls += 1
            if self.calls == 3:
                hung.set()
                release.wait(30)
            return inner.observe(now_s)

    daemon.runtime.loop.source = HangsOnTheThirdCall()
    daemon.start_scheduler()
    try:
        assert hung.wait(10)
        t0 = time.monotonic()
        assert daemon.shutdown() is False  # abandoned
        assert time.monotonic() - t0 < 2
        assert daemon.exit_abandoned
        # What the finished cycles wrote is on disk, whole; the lock is free for a restart.
        events = audit_events(state_dir / "audit.jsonl")
        # (a cycle whose decisions are all already in place writes none: cycle 2 may be silent)
        cycles = {_cycle(e) for e in events if e["event"] == "decision"}
        assert 1 in cycles and cycles <= {1, 2}
        assert StateFile(state_dir, "lab").load().found
        in_process(cfg, state_dir).shutdown()
    finally:
        release.set()  # let the abandoned thread end (a real daemon exits without waiting)


def _cycle(event: dict) -> int:  # type: ignore[type-arg]
    return int(event["decision_id"].split("-")[2])


def test_on_exit_renew_renews_the_leases_once_more(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "ooda.toml", twin_config(dry_run=False, extra="[actuators]\nlease_s = 90\n")
    )
    wall = FakeClock(START_UNIX)
    daemon = in_process(cfg, tmp_path / "state", wall=wall)
    caps = RenewingCaps()
    daemon.runtime.actuators.caps = caps
    drive(daemon, wall, 2)
    assert caps.set_calls >= 1 and caps.renewals == [90.0, 90.0]  # every live cycle
    assert daemon.shutdown()
    assert caps.renewals == [90.0, 90.0, 90.0]  # and once more on the way out


def test_the_node_clients_leases_survive_through_its_state(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a-token-long-enough-to-be-accepted\n")
    settings = NodeClientSettings(endpoint_template="https://{node}:9440", token_file=token)
    first = NodeCapActuator(settings)
    second = NodeCapActuator(settings)
    try:
        state = {
            "keys": ["node1/0", "node2/3"],
            "node": ["node1", "node2"],
            "gpu": [0, 3],
            "uuid": ["GPU-a", "GPU-b"],
            "watts": [300.0, 450.0],
            "last_ok_s": [1.0, 2.0],
            "active": [True, False],
        }
        first.load_dict(state)
        second.load_dict(json.loads(json.dumps(first.to_dict())))
        targets, watts = second.leased()
        assert targets.names() == ["node1/gpu0"] and watts.tolist() == [300.0]
        assert isinstance(second, Persistent)
    finally:
        first.close()
        second.close()


def test_a_changed_twin_section_means_a_new_twin_and_fresh_state(tmp_path: Path) -> None:
    cfg = write(tmp_path / "ooda.toml", twin_config(dry_run=False))
    wall = FakeClock(START_UNIX)
    daemon = in_process(cfg, tmp_path / "state", wall=wall)
    try:
        drive(daemon, wall, 2)
        old_twin, old_timeline = daemon.runtime.twin, daemon.timeline
        assert len(daemon.runtime.loop.ledger.caps) > 0
        write(cfg, twin_config(dry_run=False, nodes=3))
        assert daemon.reload()
        assert daemon.runtime.twin is not old_twin and daemon.timeline != old_timeline
        assert len(daemon.runtime.loop.ledger.caps) == 0  # the old cluster's memory means nothing
        assert drive(daemon, wall, 1)[0].snapshot.n_gpus == 24
    finally:
        daemon.shutdown()


def test_a_taken_metrics_port_is_a_clear_error_and_frees_the_lock(tmp_path: Path) -> None:
    cfg = write(tmp_path / "ooda.toml", twin_config())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            BadInputError, match=rf"--metrics-listen: cannot listen on 127.0.0.1:{port}"
        ):
            in_process(cfg, tmp_path / "state", listen=("127.0.0.1", port))
    in_process(cfg, tmp_path / "state").shutdown()  # the lock was released

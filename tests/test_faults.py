"""Faults through the whole loop (issue 9, part 2). Each case checks the four promises: the agent
keeps running, takes no unsafe action (no cap outside the GPU's range, no drain on bad data, no
action on what cannot be seen), loses no audit record, and says what is wrong.

Real parts wherever they can be had here: the twin for the cluster, a tmpfs mount for a full disk,
loopback servers that refuse or stall for Prometheus, real node daemons over Unix sockets. The
node-daemon and Prometheus-over-HTTP cases are marked integration."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.act.audit import AuditLog
from agent.assembly import Agent, assemble
from agent.config import parse_config
from agent.core.clock import FakeClock
from agent.core.intents import DrainNode, GpuTargets, Outcome, SetPowerCap
from agent.core.protocols import CapResult
from agent.core.snapshot import Metric, Snapshot
from agent.loop import CycleReport
from agent.observe.prometheus import PrometheusSettings, PrometheusSource
from agent.sim.adapters import TwinSource
from agent.sim.twin import Twin
from tests.daemon_helpers import DaemonProcess, twin_config

FloatArray = np.ndarray[Any, np.dtype[np.float64]]


# -- helpers --------------------------------------------------------------------------------------


def twin_runtime(
    tmp_path: Path,
    *,
    audit: Path | None = None,
    nodes: int = 2,
    budget_w: float = 6000.0,
    faults: tuple[str, ...] = (),
    extra: str = "",
) -> Agent:
    """A live (not dry-run) runtime on a small twin whose budget is far under its demand, so the
    agent caps on the first cycle."""
    text = twin_config(dry_run=False, nodes=nodes, budget_w=budget_w, faults=faults, audit=None)
    data = tomllib.loads(text + extra)
    data["daemon"]["state_dir"] = str(tmp_path / "state")
    config = parse_config(data)
    log = AuditLog(path=audit) if audit is not None else AuditLog(path=tmp_path / "audit.jsonl")
    return assemble(config, audit=log)


class CountingCaps:
    """Wraps the twin's cap actuator (same protocol) and counts the calls that reach it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    def set_caps(self, targets: GpuTargets, watts: FloatArray, lease_s: float) -> CapResult:
        self.calls += 1
        return self.inner.set_caps(targets, watts, lease_s)  # type: ignore[no-any-return]

    def release_caps(self, targets: GpuTargets) -> CapResult:
        self.calls += 1
        return self.inner.release_caps(targets)  # type: ignore[no-any-return]


def step(runtime: Agent, seconds: float = 15.0) -> CycleReport:
    twin = runtime.twin
    assert twin is not None
    end = twin.t_s + seconds
    while twin.t_s < end:
        twin.step()
    return runtime.loop.cycle()


def assert_caps_in_range(twin: Twin) -> None:
    """The cluster's real caps, whatever the agent saw: inside every GPU's range."""
    assert (twin.cap_w >= twin.min_w - 1e-6).all() and (twin.cap_w <= twin.max_w + 1e-6).all()


def audit_lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # every line parses


def assert_every_action_has_its_decision(records: list[dict[str, Any]]) -> None:
    decided = {r["decision_id"] for r in records if r["event"] in ("decision", "refusal")}
    for r in records:
        if r["event"] == "action":
            assert r["decision_id"] in decided, r


# -- a full disk under the audit log --------------------------------------------------------------


@pytest.fixture
def tiny_disk() -> Iterator[Path]:
    """A 256 KiB tmpfs, unmounted afterwards (needs root; skipped elsewhere)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = Path(tempfile.mkdtemp(prefix="ooda-fulldisk-"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        mount_point.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        with contextlib.suppress(OSError):
            mount_point.rmdir()


def fill(directory: Path) -> Path:
    """Fill the file system to the last byte; the filler's path (delete it to free the space)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):  # down to the last byte
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def test_full_disk_under_the_audit_log_refuses_to_act_says_so_and_resumes(
    tmp_path: Path, tiny_disk: Path
) -> None:
    path = tiny_disk / "audit.jsonl"
    runtime = twin_runtime(tmp_path, audit=path)
    caps = CountingCaps(runtime.actuators.caps)
    runtime.actuators.caps = caps
    twin = runtime.twin
    assert twin is not None
    default = twin.cap_w.copy()
    filler = fill(tiny_disk)
    try:
        for _ in range(3):
            report = step(runtime)
            assert report.actions == []
            assert caps.calls == 0  # nothing acted on whose record could not be written
            assert any("audit log unwritable" in e and "not acting" in e for e in report.errors)
            assert np.array_equal(twin.cap_w, default)
        audit_lines(path)  # what is there is whole: no torn record left behind
    finally:
        filler.unlink()
    report = step(runtime)  # space is back: the agent acts, audited
    applied = [a for a in report.actions if a.outcome is Outcome.APPLIED]
    assert applied and caps.calls >= 1
    assert not [e for e in report.errors if "audit" in e]
    runtime.close()
    records = audit_lines(path)
    assert_every_action_has_its_decision(records)
    ids = {r["action_id"] for r in records if r["event"] == "action"}
    assert {a.action_id for a in report.actions} <= ids
    assert_caps_in_range(twin)


def test_a_record_cut_by_a_full_disk_leaves_no_torn_line(tiny_disk: Path) -> None:
    path = tiny_disk / "audit.jsonl"
    audit = AuditLog(path=path)
    audit.event("before", n=1)
    filler = fill(tiny_disk)
    # Free a little: room for part of a record only.
    with filler.open("r+b") as handle:
        handle.truncate(max(0, filler.stat().st_size - 100))
    with pytest.raises(OSError):
        audit.event("cut", payload="x" * 20_000)
    filler.unlink()
    audit.event("after", n=2)
    audit.close()
    assert [r["event"] for r in audit_lines(path)] == ["before", "after"]


def test_the_daemon_starts_on_a_full_disk_refuses_to_act_and_acts_once_space_is_back(
    tmp_path: Path, tiny_disk: Path
) -> None:
    cfg = tmp_path / "ooda.toml"
    cfg.write_text(twin_config(dry_run=False, interval_s=0.05, speed=20))
    state = tiny_disk / "state"
    state.mkdir()
    filler = fill(tiny_disk)
    proc = DaemonProcess(cfg, state, tmp_path / "run.log").started()
    try:
        assert proc.wait_event("lock_pid_unwritten")["reason"].startswith("cannot write the pid")
        # It runs, observes and decides, and refuses to act on what it cannot audit.
        proc.wait_event(
            "cycle_summary",
            where=lambda e: any(
                "audit log unwritable" in m and "not acting" in m for m in e["errors"]
            ),
        )
        assert proc.wait_event("state_save_failed")
        summaries = [e for e in proc.events() if e.get("event") == "cycle_summary"]
        assert not any(e["actions"].get("applied") for e in summaries)
        seen = len(proc.events())
        filler.unlink()
        proc.wait_event(
            "cycle_summary", after=seen, where=lambda e: bool(e["actions"].get("applied"))
        )
        code, _took_s = proc.stop()
    finally:
        proc.kill()
    assert code == 0
    records = audit_lines(state / "audit.jsonl")
    assert_every_action_has_its_decision(records)


# -- bad samples: NaN, negative, absurd ----------------------------------------------------------


class Corrupting:
    """Between the twin and the agent: chosen GPUs report NaN, negative and absurd values (what a
    broken exporter sends)."""

    def __init__(self, inner: TwinSource) -> None:
        self.inner = inner

    def observe(self, now_s: float) -> Snapshot:
        snap = self.inner.observe(now_s)
        values = {m: v.copy() for m, v in snap.values.items()}
        valid = {m: v.copy() for m, v in snap.valid.items()}
        power = values[Metric.POWER_W]
        power[0], power[1], power[2] = np.nan, -50.0, 1e9
        values[Metric.TEMP_C][3] = 1e9
        values[Metric.MAX_LIMIT_W][4] = 1e9  # a cap range that cannot be
        values[Metric.XID][5] = -1.0
        for m in (Metric.POWER_W, Metric.TEMP_C, Metric.MAX_LIMIT_W, Metric.XID):
            valid[m] = np.isfinite(values[m])
        return replace(snap, values=values, valid=valid)


def test_nan_negative_and_absurd_samples_never_move_a_cap_out_of_range_or_drain(
    tmp_path: Path,
) -> None:
    runtime = twin_runtime(tmp_path)
    twin = runtime.twin
    assert twin is not None
    runtime.loop.source = Corrupting(TwinSource(twin))
    reports = [step(runtime) for _ in range(6)]
    runtime.close()
    for report in reports:
        assert_caps_in_range(twin)
        for action in report.actions:
            assert not isinstance(action.intent, DrainNode), action
            if isinstance(action.intent, SetPowerCap):
                w = action.intent.watts
                assert np.isfinite(w).all() and (w >= 200.0).all() and (w <= 700.0).all()
    first = reports[0]
    power_ok = first.snapshot.usable(Metric.POWER_W)
    assert not power_ok[:3].any()  # NaN, negative, absurd: missing, not believed
    assert any("implausible" in e and "power_w" in e for e in first.errors), first.errors
    assert first.situation.fleet_power_w < 1e6
    records = audit_lines(tmp_path / "audit.jsonl")
    assert_every_action_has_its_decision(records)
    assert any(r["event"] == "action" and r["outcome"] == "applied" for r in records)


# -- clock jumps ----------------------------------------------------------------------------------


def test_clock_jumps_keep_cooldowns_and_caps_sane(tmp_path: Path) -> None:
    """The agent's clock jumps a day forward, then two hours back, while the cluster runs on."""
    runtime = twin_runtime(tmp_path, extra="\n[guard]\ncap_cooldown_s = 60\n")
    twin = runtime.twin
    assert twin is not None
    clock = FakeClock(twin.t_s)
    runtime.loop.clock = clock
    reports: list[CycleReport] = []

    def cycle(jump_s: float = 0.0) -> CycleReport:
        clock.set(clock.now() + 15.0 + jump_s)
        report = step(runtime)
        reports.append(report)
        return report

    for _ in range(4):
        cycle()
    cycle(jump_s=86_400.0)
    for _ in range(3):
        cycle()
    back = cycle(jump_s=-7_200.0)
    assert any("the clock went back 7185 s" in e for e in back.errors), back.errors  # said once
    assert not any("clock went back" in e for e in cycle().errors)
    for _ in range(7):  # 2 minutes after the jump back: cooldowns have run out again
        cycle()
    runtime.close()
    assert_caps_in_range(twin)
    for report in reports:
        assert not [e for e in report.errors if e.startswith("policy ")], report.errors
    # After the backward jump, raising caps is possible again within the cooldown (not only
    # after the clock has caught up two hours later).
    guard = runtime.loop.ledger
    last = guard.caps["last_change_s"]
    assert np.nanmax(last) <= clock.now() + 1e-6
    records = audit_lines(tmp_path / "audit.jsonl")
    assert_every_action_has_its_decision(records)


def test_a_restart_after_the_clock_went_back_sees_the_jump(tmp_path: Path) -> None:
    """The agent stops, the clock is set two hours back, the agent starts with its saved state:
    its cooldowns restart from now instead of lasting until the clock catches up."""
    first = twin_runtime(tmp_path, extra="\n[guard]\ncap_cooldown_s = 60\n")
    assert first.twin is not None
    clock = FakeClock(first.twin.t_s)
    first.loop.clock = clock
    for _ in range(4):
        clock.set(clock.now() + 15.0)
        step(first)
    stopped_at = clock.now()
    saved = json.loads(
        json.dumps({"loop": first.loop.to_dict(), "guard": first.loop.ledger.to_dict()})
    )
    first.close()
    assert saved["loop"] == {"last_cycle_s": stopped_at}

    second = twin_runtime(tmp_path)
    second.loop.load_dict(saved["loop"])
    second.loop.ledger.load_dict(saved["guard"])
    second.loop.clock = FakeClock(stopped_at - 7_200.0)
    report = step(second)
    second.close()
    assert any("the clock went back 7200 s" in e for e in report.errors), report.errors
    changed = second.loop.ledger.caps["last_change_s"]
    assert (changed[np.isfinite(changed)] <= stopped_at - 7_200.0).all()
    with pytest.raises(ValueError, match="last_cycle_s"):
        second.loop.load_dict({"last_cycle_s": "yesterday"})
    with pytest.raises(ValueError, match="last_cycle_s"):
        second.loop.load_dict({"last_cycle_s": True})


# -- Prometheus down, stalling, partial -----------------------------------------------------------


@contextlib.contextmanager
def stalling_server() -> Iterator[tuple[str, threading.Event]]:
    """A loopback TCP server that accepts and never answers (a Prometheus stuck in a query)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.1)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", stop
    finally:
        stop.set()
        thread.join(timeout=2)
        for conn in held:
            conn.close()
        server.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("fault", ["down", "stalls"])
def test_prometheus_down_or_stalling_is_an_outage_within_its_timeout(
    tmp_path: Path, fault: str
) -> None:
    runtime = twin_runtime(tmp_path)
    caps = CountingCaps(runtime.actuators.caps)
    runtime.actuators.caps = caps
    with contextlib.ExitStack() as stack:
        if fault == "down":
            url = closed_port_url()
        else:
            url, _ = stack.enter_context(stalling_server())
        source = PrometheusSource(PrometheusSettings(url=url, timeout_s=0.4, retries=0))
        stack.callback(source.close)
        runtime.loop.source = source
        for _ in range(2):
            t0 = time.monotonic()
            report = step(runtime)
            took_s = time.monotonic() - t0
            assert took_s < 3.0, took_s  # bounded by the timeout, the agent is not stuck
            assert report.snapshot.n_gpus == 0 and report.actions == []
            why = "timed out after 0.4 s" if fault == "stalls" else "connection refused"
            assert any(why in e and url in e for e in report.errors), report.errors
    assert caps.calls == 0
    # Prometheus back (here: the twin's own telemetry): the agent acts again.
    twin = runtime.twin
    assert twin is not None
    runtime.loop.source = TwinSource(twin)
    report = step(runtime)
    assert any(a.outcome is Outcome.APPLIED for a in report.actions)
    runtime.close()


class PartialPrometheus:
    """A hand-written fake of prometheus-api-client's client: a whole inventory, but the power
    series of some GPUs and every temperature series missing (a half-broken exporter)."""

    def __init__(self, n: int, missing_power: set[int]) -> None:
        self.n = n
        self.missing_power = missing_power
        self.now = 0.0

    def _series(self, value: float, skip: set[int], extra: bool = False) -> list[dict[str, Any]]:
        out = []
        for i in range(self.n):
            if i in skip:
                continue
            labels = {"Hostname": f"node{i // 4 + 1}", "gpu": str(i % 4)}
            if extra:
                labels |= {"UUID": f"GPU-{i:04d}", "modelName": "NVIDIA H100 80GB HBM3"}
            out.append({"metric": labels, "value": [self.now, repr(value)]})
        return out

    def custom_query(self, query: str, params: dict[str, str] | None = None) -> Any:
        self.now = float((params or {})["time"])
        if query.startswith("group by"):
            return self._series(1.0, set(), extra=True)
        if "timestamp(" in query:
            return self._series(self.now - 1.0, set(), extra=True)
        if "DCGM_FI_DEV_POWER_USAGE" in query:
            return self._series(650.0, self.missing_power)
        if "DCGM_FI_DEV_GPU_TEMP" in query:
            return []
        if "POWER_MGMT_LIMIT_MIN" in query or "ENFORCED_LIMIT" in query:
            return self._series(200.0 if "MIN" in query else 700.0, set())
        if "POWER_MGMT_LIMIT_MAX" in query or "POWER_MGMT_LIMIT_DEF" in query:
            return self._series(700.0, set())
        if "POWER_MGMT_LIMIT" in query:
            return self._series(700.0, set())
        return []

    def close(self) -> None:
        pass


def test_partial_data_acts_only_on_what_is_seen_and_says_what_is_missing(tmp_path: Path) -> None:
    runtime = twin_runtime(tmp_path, budget_w=3000.0)
    recorded: list[tuple[GpuTargets, FloatArray]] = []

    class Recording:
        def set_caps(self, targets: GpuTargets, watts: FloatArray, lease_s: float) -> CapResult:
            recorded.append((targets, watts))
            return CapResult.all_ok(len(targets))

        def release_caps(self, targets: GpuTargets) -> CapResult:
            return CapResult.all_ok(len(targets))

    runtime.actuators.caps = Recording()
    runtime.actuators.placement = None
    runtime.loop.placement = None
    clock = FakeClock(1_700_000_000.0)
    runtime.loop.clock = clock
    fake = PartialPrometheus(8, missing_power={1, 6})
    runtime.loop.source = PrometheusSource(PrometheusSettings(), client=fake)  # type: ignore[arg-type]
    report = runtime.loop.cycle()
    runtime.close()
    summary = report.summary()
    assert summary["gpus"] == 8 and summary["missing"] == 2  # said: two GPUs without power
    capped = {str(u) for targets, _ in recorded for u in targets.uuid}
    assert capped, "the budget is far under demand: the seen GPUs are capped"
    cap_of = {str(u): float(w) for t, ws in recorded for u, w in zip(t.uuid, ws, strict=True)}
    for watts in cap_of.values():
        assert 200.0 <= watts <= 700.0
    # A GPU whose draw is unknown is never given more room than one whose draw is seen: missing
    # is not zero (a dead sensor must not look idle and free budget for others).
    seen = [w for u, w in cap_of.items() if u not in {"GPU-0001", "GPU-0006"}]
    unseen = [w for u, w in cap_of.items() if u in {"GPU-0001", "GPU-0006"}]
    assert not unseen or max(unseen) <= max(seen), cap_of


# -- SIGKILL mid-cycle and a restart --------------------------------------------------------------


def test_sigkill_mid_cycle_then_restart_no_torn_record_state_reloads_no_duplicate_action(
    tmp_path: Path,
) -> None:
    """`ooda run` killed with SIGKILL while it cycles fast (very likely inside a cycle), then
    started again on the same state."""
    from tests.daemon_helpers import DaemonProcess, write

    cfg = write(
        tmp_path / "ooda.toml",
        twin_config(dry_run=False, interval_s=0.05, speed=20, extra="[guard]\ncap_dead_band_w=5"),
    )
    state = tmp_path / "state"
    first = DaemonProcess(cfg, state, tmp_path / "first.log").started()
    try:
        first.wait_cycles(25)
        first.proc.send_signal(signal.SIGKILL)
        assert first.proc.wait(timeout=5) == -signal.SIGKILL
    finally:
        first.kill()
    audit = state / "audit.jsonl"
    killed = audit_lines(audit)  # every line parses: no torn record
    assert_every_action_has_its_decision(killed)
    assert any(r["event"] == "action" and r["outcome"] == "applied" for r in killed)
    second = DaemonProcess(cfg, state, tmp_path / "second.log").started()
    try:
        restored = second.wait_event("state_restored")
        assert restored["caps_owned"] > 0  # the caps it set are still known as its own
        second.wait_cycles(15)
        code, _ = second.stop()
    finally:
        second.kill()
    assert code == 0
    records = audit_lines(audit)
    assert records[: len(killed)] == killed  # nothing written before the kill was lost
    assert_every_action_has_its_decision(records)
    # No action twice: every action id is unique, and no decision is acted on by both runs.
    ids = [r["action_id"] for r in records if r["event"] == "action"]
    assert len(ids) == len(set(ids))
    runs_of = {}
    for r in records:
        if r["event"] == "action":
            runs_of.setdefault(r["decision_id"], set()).add(r["action_id"].split("-")[1])
    assert all(len(runs) == 1 for runs in runs_of.values())
    # The restarted agent did not set again what the first run had just set: the caps it found
    # in force are its own and unchanged (within the dead band).
    second_run = {
        r["decision_id"].split("-")[1] for r in records[len(killed) :] if "decision_id" in r
    }
    first_run = {r["decision_id"].split("-")[1] for r in killed if "decision_id" in r}
    assert not second_run & first_run  # a new run id; decision ids never collide

    def capped_in_first_cycle(run_records: list[dict[str, Any]]) -> int:
        cycles = [int(r["decision_id"].split("-")[2]) for r in run_records if "decision_id" in r]
        if not cycles:
            return 0
        return sum(
            len(r["target"])
            for r in run_records
            if r["event"] == "action"
            and r["kind"] == "set_power_cap"
            and r["outcome"] == "applied"
            and int(r["decision_id"].split("-")[2]) == min(cycles)
        )

    # The first run capped the fleet from scratch; the restarted one found its caps in force
    # (restored as its own) and did not set them all again.
    assert capped_in_first_cycle(killed) >= 4
    assert capped_in_first_cycle(records[len(killed) :]) < capped_in_first_cycle(killed)
    log = [
        json.loads(x) for x in (tmp_path / "second.log").read_text().splitlines() if x[:1] == "{"
    ]
    assert not [e for e in log if e.get("event") == "cycle_failed"]

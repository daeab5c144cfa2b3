"""`ooda run` as a real process against the twin: signals, reload, systemd notify over a real
datagram socket, one instance per cluster, a restart, and 1,000 fast cycles with flat memory."""

from __future__ import annotations

import json
import math
import signal
import socket
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.daemon_helpers import DaemonProcess, audit_events, twin_config, write


def _cycle_of(decision_id: str) -> tuple[str, int]:
    """(run id, cycle) from `d-RUN-CYCLE-N`."""
    _, run, cycle, _ = decision_id.split("-")
    return run, int(cycle)


def _check_audit_complete(path: Path) -> list[dict]:  # type: ignore[type-arg]
    events = audit_events(path)  # every line whole JSON, the file ends with a newline
    decided = {e["decision_id"] for e in events if e["event"] == "decision"}
    for event in events:
        if event["event"] == "action":
            assert event["decision_id"] in decided, event  # every action traces to its decision
    return events


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_exits_zero_within_5_s_with_the_audit_log_complete(
    tmp_path: Path, signum: signal.Signals
) -> None:
    cfg = write(tmp_path / "ooda.toml", twin_config(dry_run=False, interval_s=0.05, speed=20))
    state = tmp_path / "state"
    proc = DaemonProcess(cfg, state, tmp_path / "run.log").started()
    try:
        proc.wait_cycles(20)
        code, took_s = proc.stop(signum=signum)
    finally:
        proc.kill()
    assert code == 0
    assert took_s < 5.0
    names = [e.get("event") for e in proc.events()]
    assert names[-2:] == ["stopping", "stopped"]
    events = _check_audit_complete(state / "audit.jsonl")
    assert any(e["event"] == "action" and e["outcome"] == "applied" for e in events)
    saved = json.loads((state / "lab.state.json").read_text())
    assert saved["pid"] == proc.pid and saved["parts"]["guard"]["caps"]["keys"]


def test_sighup_reloads_a_good_config_and_keeps_the_old_one_on_a_bad_one(tmp_path: Path) -> None:
    cfg = write(tmp_path / "ooda.toml", twin_config(interval_s=0.05, speed=20))
    proc = DaemonProcess(cfg, tmp_path / "state", tmp_path / "run.log").started()
    try:
        proc.wait_cycles(3)
        assert proc.value("ooda_interval_seconds") == 0.05
        write(cfg, twin_config(interval_s=0.1, speed=20, extra="[guard]\ncap_dead_band_w = 25\n"))
        seen = len(proc.events())
        proc.proc.send_signal(signal.SIGHUP)
        proc.wait_event("config_reloaded", after=seen)
        assert proc.value("ooda_interval_seconds") == 0.1
        assert proc.value("ooda_config_reloads_total", 'result="ok"') == 1

        write(cfg, twin_config(interval_s=0.1, speed=20, extra="[guard]\ncap_dead_band_w = -1\n"))
        seen = len(proc.events())
        proc.proc.send_signal(signal.SIGHUP)
        refused = proc.wait_event("config_reload_refused", after=seen)
        assert "guard.cap_dead_band_w" in refused["error"] and str(cfg) in refused["error"]
        assert proc.value("ooda_config_reloads_total", 'result="refused"') == 1
        assert proc.value("ooda_interval_seconds") == 0.1  # the old config runs on
        before = proc.value("ooda_cycles_total", 'result="ok"') or 0
        time.sleep(0.5)
        assert (proc.value("ooda_cycles_total", 'result="ok"') or 0) > before
        code, _ = proc.stop()
    finally:
        proc.kill()
    assert code == 0


def test_systemd_notify_over_a_real_datagram_socket(tmp_path: Path) -> None:
    cfg = write(tmp_path / "ooda.toml", twin_config(interval_s=0.05, speed=20))
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    messages: list[str] = []

    def receive(until: str, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                continue
            if until in messages[-1]:
                return
        raise AssertionError(f"no {until!r} in {messages}")

    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}
    proc = DaemonProcess(cfg, tmp_path / "state", tmp_path / "run.log", env=env)
    try:
        receive("READY=1")
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=running: cluster lab" in ready
        receive("WATCHDOG=1")
        receive("WATCHDOG=1")  # fed again and again while cycles progress
        assert any(m.startswith("STATUS=cycle ") and "16 GPUs" in m for m in messages)
        proc.proc.send_signal(signal.SIGHUP)
        receive("RELOADING=1")
        assert "MONOTONIC_USEC=" in messages[-1]
        receive("READY=1")
        proc.proc.send_signal(signal.SIGTERM)
        receive("STOPPING=1")
        assert proc.proc.wait(timeout=5) == 0
    finally:
        proc.kill()
        sock.close()


def test_a_second_ooda_run_for_the_cluster_refuses_and_names_the_holder(tmp_path: Path) -> None:
    cfg = write(tmp_path / "ooda.toml", twin_config(interval_s=0.5, speed=0))
    state = tmp_path / "state"
    first = DaemonProcess(cfg, state, tmp_path / "first.log").started()
    try:
        second = DaemonProcess(cfg, state, tmp_path / "second.log")
        assert second.proc.wait(timeout=30) == 1
        second.kill()
        message = (tmp_path / "second.log").read_text().strip().splitlines()[-1]
        assert "already running" in message and f"pid {first.pid}" in message
        assert first.proc.poll() is None  # the first one runs on
        code, _ = first.stop()
    finally:
        first.kill()
    assert code == 0


def test_bad_config_at_start_is_one_line_and_exit_2(tmp_path: Path) -> None:
    cfg = write(tmp_path / "ooda.toml", twin_config(extra="[guard]\ncap_cooldown_s = -1\n"))
    proc = DaemonProcess(cfg, tmp_path / "state", tmp_path / "run.log")
    assert proc.proc.wait(timeout=30) == 2
    proc.kill()
    lines = (tmp_path / "run.log").read_text().strip().splitlines()
    assert len(lines) == 1 and "guard.cap_cooldown_s" in lines[0] and str(cfg) in lines[0]


def test_a_restart_resumes_state_and_the_cluster(tmp_path: Path) -> None:
    cfg = write(tmp_path / "ooda.toml", twin_config(dry_run=False, interval_s=0.05, speed=20))
    state = tmp_path / "state"
    first = DaemonProcess(cfg, state, tmp_path / "first.log").started()
    try:
        first.wait_cycles(10)
        assert first.value("ooda_state_restored") == 0
        assert first.stop()[0] == 0
    finally:
        first.kill()
    guard_first = json.loads((state / "lab.state.json").read_text())["parts"]["guard"]
    second = DaemonProcess(cfg, state, tmp_path / "second.log").started()
    try:
        restored = second.wait_event("state_restored")
        owned = [w for w in guard_first["caps"]["our_cap_w"] if not math.isnan(w)]
        assert owned and restored["caps_owned"] == len(owned)
        second.wait_cycles(10)
        assert second.value("ooda_state_restored") == 1
        assert second.stop()[0] == 0
    finally:
        second.kill()
    events = _check_audit_complete(state / "audit.jsonl")
    runs: dict[str, list[dict]] = {}  # type: ignore[type-arg]
    for e in events:
        if "decision_id" in e:
            runs.setdefault(_cycle_of(e["decision_id"])[0], []).append(e)
    # The second run may write nothing at all: with the caps it finds in force, there is nothing
    # to decide (unchanged decisions are not audited). That is the point of restoring state.
    assert 1 <= len(runs) <= 2
    events1, *rest = runs.values()
    events2 = rest[0] if rest else []

    def capped_in_first_cycle(run_events: list[dict]) -> int:  # type: ignore[type-arg]
        if not run_events:
            return 0
        first = min(_cycle_of(e["decision_id"])[1] for e in run_events)
        return sum(
            len(e["target"])
            for e in run_events
            if e["event"] == "action"
            and e["kind"] == "set_power_cap"
            and e["outcome"] == "applied"
            and _cycle_of(e["decision_id"])[1] == first
        )

    # The twin (the cluster) went on where it was: its time continues, and its caps: the first
    # run capped the fleet from scratch, the second found them in force.
    if events2:
        assert min(e["time_s"] for e in events2) > max(e["time_s"] for e in events1)
    assert capped_in_first_cycle(events1) >= 4
    assert capped_in_first_cycle(events2) < capped_in_first_cycle(events1)


@pytest.mark.slow
def test_a_thousand_fast_cycles_no_overlap_flat_memory(tmp_path: Path) -> None:
    """The acceptance run, bounded: 1,000 cycles at 0.02 s (about 25 s), RSS sampled."""
    cfg = write(tmp_path / "ooda.toml", twin_config(nodes=8, interval_s=0.02, speed=1.0))
    state = tmp_path / "state"
    proc = DaemonProcess(cfg, state, tmp_path / "run.log").started()
    rss: list[tuple[float, int]] = []
    try:
        deadline = time.monotonic() + 90
        done = 0.0
        while done < 1000 and time.monotonic() < deadline:
            time.sleep(0.5)
            done = sum(
                proc.value("ooda_cycles_total", f'result="{r}"') or 0.0
                for r in ("ok", "degraded", "failed")
            )
            rss.append((done, proc.rss_bytes()))
        assert done >= 1000, f"only {done} cycles"
        assert proc.value("ooda_cycles_total", 'result="failed"') == 0
        code, took_s = proc.stop()
    finally:
        proc.kill()
    assert code == 0 and took_s < 5
    # Flat memory: after warm-up (200 cycles), RSS grows by less than 8 MiB over 800 cycles.
    warm = next(r for n, r in rss if n >= 200)
    peak_after = max(r for n, r in rss if n >= 200)
    assert peak_after - warm < 8 * 2**20, [(n, r // 2**20) for n, r in rss]
    # No overlap: decisions come in cycle order, one cycle at a time, every cycle deciding
    # (64 GPUs, a budget far under demand).
    cycles = [
        _cycle_of(e["decision_id"])[1]
        for e in audit_events(state / "audit.jsonl")
        if e["event"] == "decision"
    ]
    assert cycles == sorted(cycles)
    assert len(Counter(cycles)) >= 1000

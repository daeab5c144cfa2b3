"""The durable audit log: rotation that never splits or loses a record, several writers (processes)
on one log, nothing reported written lost to a SIGKILL, torn lines tolerated, and the readers:
tail, follow, explain and their CLIs."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.act.audit import (
    AuditLog,
    ReadStats,
    UnknownActionError,
    audit_files,
    explain,
    follow,
    read_records,
    tail,
)
from agent.cli import main

PAD = "x" * 150


def seqs(path: Path, stats: ReadStats | None = None) -> list[int]:
    return [int(r["seq"]) for r in read_records(path, stats) if "seq" in r]


def test_rotation_keeps_whole_records_and_n_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=4096, keep=3)
    for i in range(200):
        audit.event("note", seq=i, pad=PAD)
    audit.close()
    files = audit_files(path)
    assert [f.name for f in files] == ["audit.jsonl.3", "audit.jsonl.2", "audit.jsonl.1", path.name]
    for f in files:
        data = f.read_bytes()
        assert len(data) <= 4096 and data.endswith(b"\n")
        for line in data.splitlines():
            json.loads(line)  # every line a whole record
    got = seqs(path)
    # The newest records, in order, without a gap; only the oldest files were dropped.
    assert got == list(range(got[0], 200)) and got[0] > 0


def test_a_stray_file_with_a_non_ascii_digit_suffix_is_not_a_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    stray = tmp_path / "audit.jsonl.\u00b3"  # "³": a digit to str.isdigit, not a number to int
    stray.write_text("not ours\n")
    audit = AuditLog(path, max_bytes=4096, keep=2)
    for i in range(100):  # rotates several times past the stray file
        audit.event("note", seq=i, pad=PAD)
    audit.close()
    assert [f.name for f in audit_files(path)] == ["audit.jsonl.2", "audit.jsonl.1", path.name]
    assert stray.read_text() == "not ours\n"


def test_a_record_larger_than_max_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=4096, keep=5)
    audit.event("note", seq=0)
    audit.event("note", seq=1, pad="y" * 10_000)
    audit.event("note", seq=2)
    audit.close()
    assert seqs(path) == [0, 1, 2]
    assert [len(f.read_bytes().splitlines()) for f in audit_files(path)] == [1, 1, 1]


def test_keep_zero_keeps_only_the_current_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=4096, keep=0)
    for i in range(100):
        audit.event("note", seq=i, pad=PAD)
    audit.close()
    assert audit_files(path) == [path] and seqs(path)[-1] == 99


WRITER = """
import sys
from pathlib import Path
from agent.act.audit import AuditLog

path, name = sys.argv[1], sys.argv[2]
count, max_bytes, batch = (int(x) for x in sys.argv[3:6])
audit = AuditLog(Path(path), max_bytes=max_bytes, keep=100000)
i = 0
while i < count:
    with audit.batch():
        for _ in range(batch):
            audit.event("note", writer=name, seq=i, pad="z" * 120)
            i += 1
    # Only now are these records reported written (durable: fsynced at the batch's end).
    print(i, flush=True)
audit.close()
"""


def _writer(path: Path, name: str, count: int, max_bytes: int, batch: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), name, str(count), str(max_bytes), str(batch)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


def test_several_processes_share_one_rotating_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writers = [_writer(path, name, 100, 4096, 1) for name in ("a", "b", "c")]
    for w in writers:
        w.communicate(timeout=60)
        assert w.returncode == 0
    stats = ReadStats()
    records = list(read_records(path, stats))
    assert stats.skipped == 0 and len(stats.files) > 5  # it did rotate, many times
    for name in ("a", "b", "c"):
        mine = [r["seq"] for r in records if r["writer"] == name]
        assert sorted(mine) == list(range(100))  # every record once, none lost or split
    for f in stats.files:
        assert f.stat().st_size <= 4096


@pytest.mark.parametrize("batch", [1, 7])
def test_sigkill_loses_nothing_reported_written(tmp_path: Path, batch: int) -> None:
    path = tmp_path / "audit.jsonl"
    child = _writer(path, "k", 10**9, 6000, batch)  # writes until killed, rotating as it goes
    reported = 0
    assert child.stdout is not None
    deadline = time.monotonic() + 30
    while reported < 150 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        reported = int(line)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    assert reported >= 150
    stats = ReadStats()
    got = seqs(path, stats)
    assert set(range(reported)) <= set(got)  # everything it said was written is there
    assert got == list(range(len(got)))  # in order, whole, nothing half-written parsed
    assert stats.skipped <= 1  # at most a torn last line (none on Linux after a process kill)


def test_torn_last_line_is_tolerated_and_the_next_writer_starts_fresh(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.event("note", seq=0)
    audit.event("note", seq=1)
    audit.close()
    with path.open("ab") as f:
        f.write(b'{"event": "note", "seq": 2, "pa')  # power lost mid-write
    stats = ReadStats()
    assert seqs(path, stats) == [0, 1] and stats.skipped == 1
    audit = AuditLog(path)
    audit.event("note", seq=3)
    audit.close()
    stats = ReadStats()
    assert seqs(path, stats) == [0, 1, 3] and stats.skipped == 1


def test_tail_across_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=4096, keep=50)
    for i in range(120):
        audit.event("note", seq=i, pad=PAD)
    audit.close()
    assert len(audit_files(path)) > 3
    assert [r["seq"] for r in tail(path, 30)] == list(range(90, 120))
    assert tail(path, 0) == []


def test_follow_sees_new_records_across_rotations(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=4096, keep=100)
    audit.event("note", seq=-1)  # before following: not shown
    seen: list[int] = []
    started = threading.Event()

    def write() -> None:
        started.wait(5)
        for i in range(150):
            audit.event("note", seq=i, pad=PAD)
            if i % 10 == 0:
                time.sleep(0.005)

    writer = threading.Thread(target=write)
    writer.start()
    deadline = time.monotonic() + 20

    def nap(seconds: float) -> None:
        started.set()
        time.sleep(0.01)

    follow(
        path,
        lambda r: seen.append(int(r["seq"])),
        sleep=nap,
        stop=lambda: len(seen) >= 150 or time.monotonic() > deadline,
    )
    writer.join(10)
    audit.close()
    assert seen == list(range(150))
    assert len(audit_files(path)) > 3


def test_follow_goes_on_from_a_tail_even_after_rotations(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=4096, keep=100)
    for i in range(30):
        audit.event("note", seq=i, pad=PAD)
    stats = ReadStats()
    assert [r["seq"] for r in tail(path, 3, stats)] == [27, 28, 29]
    for i in range(30, 130):  # written between the tail and the follow: several rotations
        audit.event("note", seq=i, pad=PAD)
    audit.close()
    seen: list[int] = []
    deadline = time.monotonic() + 10
    follow(
        path,
        lambda r: seen.append(int(r["seq"])),
        sleep=lambda _s: None,
        stop=lambda: len(seen) >= 100 or time.monotonic() > deadline,
        start=stats.end,
    )
    assert seen == list(range(30, 130))


def _run_agent(tmp_path: Path) -> Path:
    """A short live twin run with a durable audit log (power_budget under a tight budget)."""
    from agent.assembly import assemble
    from agent.config import parse_config

    path = tmp_path / "audit.jsonl"
    config = parse_config(
        {
            "dry_run": False,
            "cluster": {"budget_w": 6500},
            "twin": {"nodes": 4, "gpus_per_node": 4, "seed": 1, "occupancy": 1.0},
            "policies": {"power_budget": {}},
            "audit": {"path": str(path), "max_bytes": 8192, "keep": 20},
            "daemon": {"state_dir": str(tmp_path / "state")},
        }
    )
    runtime = assemble(config)
    try:
        twin = runtime.twin
        assert twin is not None
        for _ in range(20):
            runtime.loop.cycle()
            twin.run_until(twin.t_s + 15)
    finally:
        runtime.close()
    return path


def test_explain_an_action_with_its_decision_across_rotated_files(tmp_path: Path) -> None:
    path = _run_agent(tmp_path)
    assert len(audit_files(path)) > 1
    actions = [r for r in read_records(path) if r["event"] == "action"]
    first = actions[0]  # in the oldest file still kept
    found = explain(path, first["action_id"])
    assert found.action == first
    assert found.decision is not None and found.decision["decision_id"] == first["decision_id"]
    assert found.decision["policy"] == "power_budget" and found.decision["evidence"]
    assert first["before"] and first["after"] and len(first["uuid"]) == len(first["target"])
    with pytest.raises(UnknownActionError, match="no action or decision with id 'a-nope'"):
        explain(path, "a-nope")


def test_audit_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _run_agent(tmp_path)
    action = next(r for r in read_records(path) if r["event"] == "action")
    assert main(["explain", action["action_id"], "--audit-log", str(path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shown["action"]["action_id"] == action["action_id"]
    assert shown["decision"]["reason"] and shown["decision"]["evidence"]

    assert main(["explain", action["action_id"], "--audit-log", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"action {action['action_id']}: set_power_cap by power_budget" in text
    assert "before:" in text and "evidence:" in text and "decision d-" in text
    # For a person: no Python reprs, and the evidence a line a key, never a value a line.
    assert not re.search(r"\bNone\b|\{'|\bTrue\b|\bFalse\b", text), text
    assert len(text.splitlines()) < 40, text

    assert main(["explain", "a-unknown-42", "--audit-log", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ooda: error: explain: no action or decision with id 'a-unknown-42'")
    assert "\n" not in err

    assert main(["audit", "tail", "--audit-log", str(path), "-n", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["records"]) == 5 and out["skipped"] == 0 and len(out["files"]) > 1

    assert main(["audit", "tail", "--audit-log", str(path), "-n", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3

    config = tmp_path / "agent.toml"
    config.write_text(f'[audit]\npath = "{path}"\n')
    assert main(["audit", "tail", "--config", str(config), "-n", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["records"]) == 2
    config.write_text("dry_run = true\n")
    assert main(["audit", "tail", "--config", str(config)]) == 2
    assert "audit.path is not set" in capsys.readouterr().err


def test_audit_tail_follow_cli(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.event("note", seq=0)
    # Ctrl-C as at a terminal even when the suite was started in the background (a shell's `&`
    # ignores SIGINT, and the child would inherit that): a handled signal is reset on exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "audit",
            "tail",
            "--audit-log",
            str(path),
            "-f",
            "--json",
            "-n",
            "1",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    signal.signal(signal.SIGINT, previous)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    reader = threading.Thread(target=lambda: [lines.put(x) for x in stdout], daemon=True)
    reader.start()
    try:
        assert json.loads(lines.get(timeout=20))["seq"] == 0
        audit.event("note", seq=1)
        assert json.loads(lines.get(timeout=20))["seq"] == 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        finally:
            proc.kill()
            proc.wait(timeout=10)
        audit.close()
    assert proc.returncode == 0

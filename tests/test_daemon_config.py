"""The daemon's configuration edges: `--dry-run` for one cycle, where relative paths resolve,
what `ooda config check` must refuse because `ooda run` would."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main
from agent.core.clock import FakeClock
from tests.conftest import last_json
from tests.daemon_helpers import START_UNIX, drive, in_process, twin_config, write

LIVE_POLICY = """
dry_run = false
[source]
kind = "twin"
[cluster]
name = "lab"
budget_w = 5000.0
[twin]
nodes = 2
[policies.power_budget]
dry_run = false
"""


def test_once_dry_run_forces_each_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A policy's own `dry_run = false` overrides the global flag; --dry-run must still mean
    # that nothing is applied (as `ooda run --dry-run`).
    cfg = tmp_path / "c.toml"
    cfg.write_text(LIVE_POLICY)
    main(["once", "--config", str(cfg), "--dry-run", "--json"])
    out = last_json(capsys.readouterr().out)
    assert out["dry_run"] is True
    assert out["intents"], "the budget is exceeded: something should be proposed"
    assert "applied" not in out["actions"], out["actions"]


def _daemon_with_relative_audit(tmp_path: Path, *, in_file: bool) -> tuple[Path, Path]:
    """Three live cycles of a daemon whose `[audit] path` is relative (as
    deploy/examples/twin.toml): the log is under the state directory, given in the file or
    (`in_file` False) only with --state-dir."""
    state = tmp_path / "state"
    extra = f'state_dir = "{state}"' if in_file else ""
    cfg = write(
        tmp_path / "ooda.toml",
        twin_config(dry_run=False, audit="audit.jsonl", daemon_extra=extra),
    )
    wall = FakeClock(START_UNIX)
    daemon = in_process(cfg, state, wall=wall)
    drive(daemon, wall, 3)
    assert daemon.shutdown()
    assert (state / "audit.jsonl").stat().st_size > 0
    return cfg, state


def test_every_command_finds_a_relative_audit_log_under_the_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The daemon wrote it under daemon.state_dir; the commands read the cwd's (nothing there,
    # or a stray ./audit.jsonl written by `guard reset`).
    cfg, state = _daemon_with_relative_audit(tmp_path, in_file=True)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    log = state / "audit.jsonl"

    assert main(["audit", "tail", "--config", str(cfg), "--json"]) == 0
    out = last_json(capsys.readouterr().out)
    assert out["audit_log"] == str(log) and out["records"]
    action = next(r for r in out["records"] if r.get("event") == "action")
    assert main(["explain", action["action_id"], "--config", str(cfg), "--json"]) == 0
    capsys.readouterr()
    assert main(["rollback", "--config", str(cfg), "--dry-run", "--json"]) == 0
    out = last_json(capsys.readouterr().out)
    assert out["audit_log"] == str(log) and out["caps_to_release"] > 0
    assert main(["guard", "reset", "--config", str(cfg), "--json"]) == 0
    assert main(["guard", "status", "--config", str(cfg), "--json"]) == 0
    capsys.readouterr()
    assert "guard_reset_requested" in log.read_text()
    assert list(elsewhere.iterdir()) == []  # nothing stray in the cwd


def test_state_dir_option_places_a_relative_audit_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, state = _daemon_with_relative_audit(tmp_path, in_file=False)  # `ooda run --state-dir`
    monkeypatch.chdir(tmp_path)
    assert main(["audit", "tail", "--config", str(cfg), "--state-dir", str(state), "--json"]) == 0
    out = last_json(capsys.readouterr().out)
    assert out["audit_log"] == str(state / "audit.jsonl") and out["records"]
    rc = main(["rollback", "--config", str(cfg), "--state-dir", str(state), "--dry-run", "--json"])
    assert rc == 0
    out = last_json(capsys.readouterr().out)
    assert out["audit_log"] == str(state / "audit.jsonl")

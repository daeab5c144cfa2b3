"""The daemon's configuration edges: `--dry-run` for one cycle, where relative paths resolve,
what `ooda config check` must refuse because `ooda run` would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import main

LIVE_POLICY = """
dry_run = false
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
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["dry_run"] is True
    assert out["intents"], "the budget is exceeded: something should be proposed"
    assert "applied" not in out["actions"], out["actions"]

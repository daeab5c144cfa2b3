"""`ooda sim record` keeps the budget it ran under, by default one that binds, and `ooda replay`
replays against it: `--compare` then shows the sets apart (before, a trace held no budget by
default and every row of a comparison was the recording's)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.cli import main
from agent.observe.trace import TraceReader

SMALL = ["--nodes", "2", "--gpus-per-node", "8", "--duration", "45m", "--seed", "4"]


def _last_json(text: str) -> dict[str, Any]:
    return dict(json.loads(text.strip().splitlines()[-1]))


def test_a_recorded_trace_keeps_a_budget_that_binds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "t.parquet"
    assert main(["sim", "record", *SMALL, "-o", str(trace)]) == 0
    said = capsys.readouterr().out
    meta = TraceReader(trace).meta
    (budget,) = set(meta.budget_w.tolist())
    assert f"budget {budget:.0f} W recorded" in said
    assert meta.scenario is not None and meta.scenario["budget_steps"] == [[0.0, budget]]
    assert main(["replay", str(trace), "--compare", "power_budget", "thermal_guard", "--json"]) == 0
    out = _last_json(capsys.readouterr().out)
    assert out["baseline"]["budget_violation_s"] > 0  # sized under the uncapped draw: it binds
    held, unheld = out["compare"]
    assert held["budget_violation_s"] < unheld["budget_violation_s"]
    assert (
        held["energy_kwh"]
        < unheld["energy_kwh"]
        == pytest.approx(out["baseline"]["energy_kwh"], rel=1e-3)
    )


def test_a_chosen_budget_or_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chosen, none = tmp_path / "chosen.parquet", tmp_path / "none.parquet"
    assert main(["sim", "record", *SMALL, "--budget-w", "7000", "-o", str(chosen), "--json"]) == 0
    assert _last_json(capsys.readouterr().out)["budget_steps"] == [[0.0, 7000.0]]
    assert (TraceReader(chosen).meta.budget_w == 7000.0).all()
    assert main(["sim", "record", *SMALL, "--no-budget", "-o", str(none)]) == 0
    assert "no budget recorded" in capsys.readouterr().out
    assert np.isnan(TraceReader(none).meta.budget_w).all()
    code = main(["sim", "record", *SMALL, "--no-budget", "--budget-w", "1", "-o", str(none)])
    assert code == 2
    assert "--budget-w and --no-budget" in capsys.readouterr().err

"""Learned curves out (`ooda curves export`) and the round trip of issue 23: a twin with known
curves -> its trace -> the curves the agent learned -> a scenario -> a twin whose curves lie
within the learner's stated intervals of the originals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main
from agent.config import default_config
from agent.core.curves import throughput_at_power
from agent.core.gpu_models import H100_SXM
from agent.daemon.state import StateFile
from agent.observe.trace import TraceReader
from agent.orient.stats import json_safe
from agent.replay.curves import export_rows, learn_from_trace
from agent.sim.calibration import WorkloadClass
from agent.sim.measured import curve_set
from agent.sim.scenario import load_scenario
from tests.conftest import last_json

EXAMPLES = Path(__file__).parents[1] / "examples"
CURVES = EXAMPLES / "curves" / "zeus-v100-normalized.csv"


def relative_throughput(wl: WorkloadClass, limit_w: float) -> float:
    natural = wl.natural_frac * H100_SXM.max_cap_w
    power = min(natural, wl.cap_draw_frac * limit_w)
    return float(throughput_at_power(power, natural, wl.a, wl.b))


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 h of the example scenario (measured curves, workload labels) under power_budget with a
    budget that binds: caps that vary, for the learner to learn from."""
    out = tmp_path_factory.mktemp("export") / "day.parquet"
    scenario = EXAMPLES / "scenarios" / "measured-curves.toml"
    args = ["sim", "record", "--scenario", str(scenario), "--duration", "4h"]
    assert main([*args, "--policy", "power_budget", "--budget-w", "12000", "-o", str(out)]) == 0
    return out


def test_learned_curves_round_trip_within_their_intervals(
    trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    learned = tmp_path / "learned.csv"
    capsys.readouterr()
    assert main(["curves", "export", "--trace", str(trace), "-o", str(learned), "--json"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["curves"] >= 4
    rows = list(csv.DictReader(learned.open()))
    assert {"throughput_lo", "throughput_hi", "confidence", "jobs"} <= set(rows[0])
    original = {w.name: w for w in curve_set(CURVES, H100_SXM).workloads}
    # The learned file as a scenario's workloads: the twin it gives.
    scenario = tmp_path / "mine.toml"
    scenario.write_text('[workloads]\ncurves = "learned.csv"\n')
    twin_back = {w.name: w for w in load_scenario(scenario).workloads}
    assert set(twin_back) == {r["workload"] for r in rows}
    checked = 0
    for row in rows:
        limit = float(row["power_limit_w"])
        lo, hi = float(row["throughput_lo"]), float(row["throughput_hi"])
        assert lo <= float(row["throughput"]) <= hi
        truth = relative_throughput(original[row["workload"]], limit)
        back = relative_throughput(twin_back[row["workload"]], limit)
        assert lo - 1e-6 <= truth <= hi + 1e-6, (row, truth)
        assert lo - 1e-6 <= back <= hi + 1e-6, (row, back)
        checked += 1
    assert checked == 8 * summary["curves"]
    # What no binding cap showed is said, not guessed.
    assert all("not learned" in n or "assumed" in n for n in summary["notes"])


def test_export_from_a_daemon_state_dir_gives_the_same_curves(trace: Path, tmp_path: Path) -> None:
    learner = learn_from_trace(TraceReader(trace), default_config())
    StateFile(tmp_path, "c1").save({"orienter": {"curves": json_safe(learner.to_dict())}}, {})
    out = tmp_path / "from-state.csv"
    assert main(["curves", "export", "--state-dir", str(tmp_path), "-o", str(out)]) == 0
    direct = export_rows(learner)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(direct.rows)
    assert np.allclose(
        [float(r["throughput"]) for r in rows], [r.throughput for r in direct.rows], atol=1e-5
    )


def test_export_refuses_what_it_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "x.csv")
    assert main(["curves", "export", "-o", out]) == 2
    assert "give --trace TRACE or --state-dir DIR" in capsys.readouterr().err
    assert main(["curves", "export", "--trace", str(tmp_path / "none.parquet"), "-o", out]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["curves", "export", "--state-dir", str(tmp_path), "-o", out]) == 2
    assert "0 state files match" in capsys.readouterr().err
    (tmp_path / "c1.state.json").write_text(json.dumps({"parts": {}}))
    assert main(["curves", "export", "--state-dir", str(tmp_path), "-o", out]) == 2
    assert "no learned curves" in capsys.readouterr().err


def test_calibrate_writes_the_learned_curves_beside_its_scenario(
    trace: Path, tmp_path: Path
) -> None:
    from agent.replay.calibrate import calibrate

    out = tmp_path / "mine.toml"
    result = calibrate(trace, out, default_config())
    assert result.curves_file == tmp_path / "mine.curves.csv"
    section = result.scenario["workloads"]
    assert section["curves"] == "mine.curves.csv"
    assert sum(section["mix"].values()) == pytest.approx(1.0, abs=1e-3)
    spec = load_scenario(out)
    assert {w.name for w in spec.workloads} == set(section["mix"])
    assert spec.workload_label and spec.budget is not None
    assert spec.budget.steps[0][1] == 12000.0

"""`ooda replay`: the counterfactual against the twin's truth, the JSON contract, comparisons,
bad traces, and a day of 1,000 GPUs replayed whole (its speed is bench/replay.py's figure)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from agent.cli import main
from agent.config import parse_config
from agent.core.snapshot import Metric
from agent.observe.trace import TraceReader, TraceWriter
from agent.replay.engine import PolicySet, replay_trace
from agent.replay.twin_trace import record_twin, run_twin
from agent.sim.kpis import RunKpis, uncapped_demand_w
from agent.sim.twin import BudgetSchedule, TwinSpec
from policies.registry import builtin_registry
from tests.tty_helpers import on_a_terminal

DURATION_S = 7200.0
INTERVAL_S = 15.0
KPIS = ("energy_kwh", "throughput_ratio", "budget_violation_s")


@dataclass(frozen=True)
class Recorded:
    spec: TwinSpec
    trace: Path
    truth: RunKpis  # the twin's own measure of the recorded run (policy Q live)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    """Q = power_budget live on a 128-GPU twin for 2 h, under a budget a little above demand
    that drops to 60% of it for 48 minutes: caps bind for a good part of the run (curves and
    cap_draw_frac to learn), and are released afterwards."""
    base = TwinSpec(nodes=16, gpus_per_node=8, seed=11, median_job_s=3 * 3600.0, step_s=15.0)
    demand = uncapped_demand_w(base, DURATION_S)
    spec = replace(
        base,
        budget=BudgetSchedule.demand_response(
            round(1.05 * demand, -1), round(0.6 * demand, -1), 0.35 * DURATION_S, 0.4 * DURATION_S
        ),
    )
    trace = tmp_path_factory.mktemp("replay") / "q-power_budget.parquet"
    run = run_twin(spec, duration_s=DURATION_S, policies=["power_budget"], record_to=trace)
    return Recorded(spec, trace, run.kpis)


def _last_json(text: str) -> dict[str, Any]:
    return dict(json.loads(text.strip().splitlines()[-1]))


def test_the_trace_as_recorded_matches_the_twin(recorded: Recorded) -> None:
    report = replay_trace(recorded.trace, policy_sets=[PolicySet("none", ())])
    base = report.baseline
    assert base["energy_kwh"] == pytest.approx(recorded.truth.energy_kwh, rel=0.01)
    # The throughput proxy (clock and utilization against each job's uncapped levels) measures
    # the work the twin counts.
    assert base["work_gpu_s"] == pytest.approx(recorded.truth.work_gpu_s, rel=0.01)
    assert base["budget_violation_s"] == recorded.truth.violation_s == 0
    assert base["actions"]["set_power_cap"] > 100  # the caps Q changed, seen in the trace


def test_replaying_the_recording_policy_reproduces_the_trace(recorded: Recorded) -> None:
    report = replay_trace(
        recorded.trace, policy_sets=[PolicySet("power_budget", ("power_budget",))]
    )
    kpis = report.sets[0].kpis
    assert kpis["energy_kwh"] == pytest.approx(report.baseline["energy_kwh"], rel=0.01)
    assert kpis["throughput_ratio"] == pytest.approx(1.0, abs=0.02)
    assert kpis["budget_violation_s"] == 0
    assert kpis["actions"]["set_power_cap"] > 100


@pytest.mark.parametrize(
    ("policy", "settings"),
    [
        ("thermal_guard", {}),  # no budget control: what if power_budget had been off?
        ("power_budget", {"margin_frac": 0.12}),  # a more cautious budget policy: harder caps
    ],
)
def test_counterfactual_matches_the_twin_running_the_policy_live(
    recorded: Recorded, policy: str, settings: dict[str, Any]
) -> None:
    """Acceptance: replaying P over a trace recorded under Q (power_budget) gives energy and
    throughput within 5% of what the twin measures running P live from the same seed, and
    seconds above budget within one interval."""
    registry = builtin_registry()
    typed = {policy: registry.get(policy).Settings.model_validate(settings)}
    live = run_twin(recorded.spec, duration_s=DURATION_S, policies=[policy], settings=typed).kpis
    config = parse_config({"policies": {policy: settings}})
    out = replay_trace(recorded.trace, config=config).to_json()
    true_ratio = live.work_gpu_s / recorded.truth.work_gpu_s

    assert out["energy_kwh"] == pytest.approx(live.energy_kwh, rel=0.05)
    assert out["throughput_ratio"] == pytest.approx(true_ratio, rel=0.05)
    lo, hi = out["interval"]["budget_violation_s"]
    assert lo - INTERVAL_S <= live.violation_s <= hi + INTERVAL_S
    # Not trivially close: P really differs from what was recorded.
    base = out["baseline"]["energy_kwh"]
    assert abs(live.energy_kwh - base) / base > 0.05
    assert abs(out["energy_kwh"] - base) / base > 0.05
    if policy == "thermal_guard":
        assert live.violation_s > 3000  # the whole drop above budget, and the replay says so
        assert out["budget_violation_s"] > 3000


def test_json_contract_and_intervals(
    recorded: Recorded, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["replay", str(recorded.trace), "--policy", "thermal_guard", "--json"])
    assert code == 0
    out = _last_json(capsys.readouterr().out)
    for key in (*KPIS, "actions", "interval", "baseline"):
        assert key in out, key
    for key in KPIS:
        lo, hi = out["interval"][key]
        assert lo <= out[key] <= hi, key
        assert key in out["baseline"], key
    assert out["interval"]["level"] == 0.9
    assert "actions" in out["baseline"] and out["baseline"]["throughput_ratio"] == 1.0
    assert out["policies"] == ["thermal_guard"]
    assert out["assumptions"] and isinstance(out["notes"], list)


def test_compare_sets_including_a_named_one(
    recorded: Recorded, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "ooda.toml"
    config.write_text(
        '[policy_sets]\ncautious = "power_budget+thermal_guard"\n'
        "[policies.power_budget]\nmargin_frac = 0.05\n[policies.thermal_guard]\n"
    )
    code = main(
        [
            "replay", str(recorded.trace), "--config", str(config), "--compare",
            "power_budget", "cautious", "thermal_guard",
        ]
    )  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert re.search(r"^as recorded\s", text, re.M)
    for name in ("power_budget", "cautious", "thermal_guard"):
        assert re.search(rf"^{name}\s+\d", text, re.M), text
    code = main(
        ["replay", str(recorded.trace), "--config", str(config), "--compare", "cautious",
         "thermal_guard", "--json"]
    )  # fmt: skip
    out = _last_json(capsys.readouterr().out)
    assert [c["set"] for c in out["compare"]] == ["cautious", "thermal_guard"]
    assert out["compare"][0]["policies"] == ["power_budget", "thermal_guard"]
    # Without budget control the fleet goes over budget during the drop; with it, it does not.
    assert out["compare"][1]["budget_violation_s"] > out["compare"][0]["budget_violation_s"]


def test_a_trace_without_cap_variation_falls_back_to_priors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = TwinSpec(nodes=4, gpus_per_node=8, seed=3, median_job_s=3 * 3600.0)
    trace = tmp_path / "uncapped.parquet"
    record_twin(spec, trace, duration_s=1800)  # nothing capped: nothing to learn curves from
    budget = 0.7 * uncapped_demand_w(replace(spec, step_s=15.0), 1800)
    code = main(
        ["replay", str(trace), "--policy", "power_budget", "--budget-w", f"{budget:.0f}", "--json"]
    )
    assert code == 0
    out = _last_json(capsys.readouterr().out)
    assert any("prior" in note for note in out["notes"])
    assert out["estimates"]["learned_curve_share"] == 0.0
    lo, hi = out["interval"]["throughput_ratio"]
    assert hi - lo > 0.03  # wide: the curve is the GPU model's prior
    assert out["throughput_ratio"] < 1.0  # caps under a 70% budget cost throughput
    assert out["actions"]["set_power_cap"] > 0


def test_an_absurd_recorded_sample_is_not_replayed_as_energy(tmp_path: Path) -> None:
    """A trace keeps what an exporter said, 1 MW included (it fits the power column); replay
    believes what the live loop would, and says what it set aside."""
    clean, absurd = tmp_path / "clean.parquet", tmp_path / "absurd.parquet"
    record_twin(TwinSpec(nodes=2, gpus_per_node=4, seed=3), clean, duration_s=900)
    reader = TraceReader(clean)
    assert reader.row_groups == 1
    block = reader.block(0)
    power = np.array(block.values[Metric.POWER_W], dtype=np.float64)
    power[5, 2] = 1e6  # 1 MW for one 15 s step: 4.2 kWh, if believed
    with TraceWriter(
        absurd, time_base="twin", step_s=reader.meta.step_s, source={"kind": "test"}
    ) as writer:
        writer.write_block(replace(block, values={**block.values, Metric.POWER_W: power}))
    none = [PolicySet("none", ())]
    before, after = (replay_trace(path, policy_sets=none) for path in (clean, absurd))
    # The GPU's one missing step costs at most its own draw for 15 s (under 3 Wh), and the
    # figures are rounded to 1 Wh.
    assert after.baseline["energy_kwh"] == pytest.approx(before.baseline["energy_kwh"], abs=0.005)
    assert after.sets[0].kpis["energy_kwh"] == pytest.approx(
        before.sets[0].kpis["energy_kwh"], abs=0.005
    )
    assert any("1 implausible power_w samples" in e for e in after.sets[0].errors)
    assert not before.sets[0].errors


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_a_damaged_trace_is_a_one_line_error_naming_the_place(
    recorded: Recorded, tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"{damage}.parquet"
    data = bytearray(recorded.trace.read_bytes())
    if damage == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
        where = r"not a trace or truncated: the Parquet footer"
    else:
        col = next(
            c
            for c in (
                pq.ParquetFile(recorded.trace).metadata.row_group(0).column(i) for i in range(30)
            )
            if c.path_in_schema == "power_mw"
        )
        middle = col.data_page_offset + col.total_compressed_size // 2
        for i in range(middle, middle + 8):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
        where = r"row group 0 \(steps 0\.\.\d+\), column 'power_mw'"
    code = main(["replay", str(path), "--policy", "power_budget"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert re.search(rf"trace {re.escape(str(path))}: .*{where}", err), err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "no_such_policy"], "unknown policy 'no_such_policy'"),
        (["power_budget"], "policy sets go after --compare"),
        (["--compare"], "--compare: name at least one policy set"),
        (["--compare", "power_budget+nope"], "policy set 'power_budget+nope': unknown policy"),
        (["--policy", "power_budget", "--compare", "x"], "give one or the other"),
    ],
)
def test_bad_options_are_one_line_errors(
    recorded: Recorded, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["replay", str(recorded.trace), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err


def test_missing_trace_and_prometheus_without_start(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "/nonexistent/day.parquet"]) == 2
    assert "trace /nonexistent/day.parquet: no such file" in capsys.readouterr().err
    assert main(["replay", "--prometheus", "http://127.0.0.1:9"]) == 2
    assert "needs --start" in capsys.readouterr().err


def test_config_policy_sets_are_validated() -> None:
    with pytest.raises(Exception, match=r"policy_sets\.x: unknown policy 'nope'"):
        parse_config({"policy_sets": {"x": ["power_budget", "nope"]}})
    config = parse_config({"policy_sets": {"x": "power_budget + thermal_guard"}})
    assert config.policy_sets == {"x": ["power_budget", "thermal_guard"]}


def test_sim_record_with_a_policy_live(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "q.parquet"
    code = main(
        ["sim", "record", "--nodes", "2", "--gpus-per-node", "4", "--duration", "20m",
         "--budget-w", "2000", "--policy", "power_budget", "-o", str(trace), "--json"]
    )  # fmt: skip
    assert code == 0
    capsys.readouterr()
    assert main(["trace", "info", str(trace), "--json"]) == 0
    info = _last_json(capsys.readouterr().out)
    assert info["scenario"]["policies"] == ["power_budget"]
    assert info["budget_w"] == {"min": 2000.0, "max": 2000.0}
    report = replay_trace(trace, policy_sets=[PolicySet("none", ())])
    assert report.baseline["actions"]["set_power_cap"] > 0  # the live policy's caps, recorded
    assert main(["sim", "record", "--policy", "nope", "-o", str(trace)]) == 2


@pytest.mark.slow
def test_a_day_of_1000_gpus_replays(tmp_path: Path) -> None:
    """24 h of 1,000 GPUs at 15 s steps (5,760 steps, 5.76 M GPU samples) replays through
    power_budget, with the counterfactual and its intervals. How fast is bench/replay.py's
    figure (`replay_s`), not a timed test: CI machines vary."""
    nodes = 125
    spec = TwinSpec(
        nodes=nodes,
        gpus_per_node=8,
        seed=1,
        budget=BudgetSchedule.demand_response(nodes * 8 * 560, nodes * 8 * 400, 34560, 17280),
    )
    trace = tmp_path / "day.parquet"
    record_twin(spec, trace, duration_s=86400.0)
    report = replay_trace(trace, policy_sets=[PolicySet("power_budget", ("power_budget",))])
    assert report.steps == 5760 and report.gpus == 1000
    assert report.sets[0].kpis["actions"]["set_power_cap"] > 0
    assert report.sets[0].cycles == 5760


def test_progress_bar_on_a_terminal_only(recorded: Recorded) -> None:
    """On a terminal (a pseudo-terminal here) stderr shows a progress bar; piped, or with --json
    (output for a program), nothing."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "agent", "replay", str(recorded.trace)]
    args += ["--policy", "power_budget"]
    code, seen = on_a_terminal(args)
    assert code == 0
    assert b"replaying q-power_budget.parquet" in seen
    code, seen = on_a_terminal([*args, "--json"])
    assert code == 0 and b"replaying" not in seen
    piped = subprocess.run(args, capture_output=True, timeout=120, check=False)
    assert piped.returncode == 0 and b"replaying" not in piped.stderr

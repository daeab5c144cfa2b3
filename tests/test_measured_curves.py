"""Measured curves in: the CSV format's reader (refusals with line and column, the physics'
checks explained), its fit, and the twin, scenarios and commands that take it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main
from agent.core.curves import throughput_at_power
from agent.core.errors import BadInputError
from agent.core.gpu_models import A100_SXM, BUILTIN_MODELS, H100_SXM
from agent.sim.measured import parse_curves, read_curves
from agent.sim.oracle import Oracle
from agent.sim.scenario import load_scenario
from agent.sim.twin import Twin
from tests.conftest import last_json

EXAMPLE = Path(__file__).parents[1] / "examples" / "curves" / "zeus-v100-normalized.csv"
HEADER = "workload,gpu_model,power_limit_w,throughput,power_w"


def sweep(a: float = 0.8, b: float = 1.5, natural_w: float = 600.0, model: str = "H100") -> str:
    """A sweep of the family's curve, as a profiler would write it (throughput in samples/s)."""
    rows = []
    for limit in (200, 300, 400, 500, 600, 700):
        power = min(natural_w, 0.96 * limit)
        tput = 1500.0 * float(throughput_at_power(power, natural_w, a, b))
        rows.append(f"bert,{model},{limit},{tput:.2f},{power:.1f}")
    return "\n".join([HEADER, *rows])


def test_a_sweep_fits_back_its_curve() -> None:
    parsed = parse_curves(sweep().splitlines(), "curves t.csv")
    (curve,) = parsed.curves
    assert parsed.problems == ()
    assert curve.a == pytest.approx(0.8, rel=0.02)
    assert curve.b == pytest.approx(1.5, rel=0.02)
    assert curve.natural_w == pytest.approx(600.0)
    assert curve.cap_draw_frac == pytest.approx(0.96, abs=1e-3)
    wl = curve.workload_class(H100_SXM)
    assert wl.natural_frac == pytest.approx(600.0 / H100_SXM.max_cap_w)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("workload,gpu_model,power_limit_w,throughput\n", "line 1: missing column 'power_w'"),
        (HEADER + ",watts\n", "line 1, column 6: unknown column 'watts'"),
        (HEADER + "\nbert,H100,700,x,600\n", "line 2, column 'throughput': not a number ('x')"),
        (HEADER + "\nbert,H100,700,1.0\n", "line 2: 4 fields, the header has 5"),
        (HEADER + "\nbert,H100,-700,1.0,600\n", "line 2, column 'power_limit_w': must be positive"),
        (HEADER + "\nbert,H100,700,nan,600\n", "line 2, column 'throughput': not finite"),
        ("# a comment\n" + HEADER + "\nbert,H100,700,1,600\nbert,H100,700,1,600\n", "line 4"),
        (HEADER + '\nbert,H100,700,"1\n', "line 2: not CSV"),
        (HEADER + "\n$bert,H100,700,1,600\n", "line 2, column 'workload': '$bert' is not a name"),
        ("# only a comment\n", "empty"),
        (HEADER + "\n", "no rows after the header"),
    ],
)
def test_a_malformed_file_is_refused_with_its_line_and_column(text: str, message: str) -> None:
    with pytest.raises(BadInputError, match=r"curves t\.csv") as err:
        parse_curves(text.splitlines(), "curves t.csv")
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("rows", "why"),
    [
        (["700,1,600", "600,0.98,570"], "2 power limits, at least 3 needed"),
        (["300,0.5,290", "500,0.8,480", "700,1,400"], "its draw falls from 480 W"),
        (["300,0.9,290", "500,0.6,480", "700,1,600"], "its throughput falls from 0.9"),
        (["300,0.5,390", "500,0.8,480", "700,1,600"], "it draws 390 W under a 300 W limit"),
        (["300,0.7,290", "650,1,600", "700,1,600"], "one limit binds, at least two needed"),
        (["300,0.2,290", "400,0.99,390", "500,0.5,480", "700,1,600"], "throughput falls"),
    ],
)
def test_a_curve_physics_rejects_is_explained_and_left_out(rows: list[str], why: str) -> None:
    good = sweep().splitlines()[1:]
    text = [HEADER, *good, *(f"odd,H100,{r}" for r in rows)]
    parsed = parse_curves(text, "curves t.csv")
    assert [c.workload for c in parsed.curves] == ["bert"]
    (problem,) = parsed.problems
    assert problem.startswith("odd on H100 left out: ")
    assert why in problem


def test_a_curve_the_family_cannot_play_is_explained() -> None:
    # A step: nothing lost down to 500 W, then half: no a (1 - x)^b fits it.
    rows = ["200,0.5,195", "300,0.5,290", "400,0.5,390", "500,1,480", "600,1,500", "700,1,500"]
    parsed = parse_curves([HEADER, *(f"step,H100,{r}" for r in rows)], "curves t.csv")
    assert parsed.curves == ()
    assert "the curve family misses it by" in parsed.problems[0]


def test_reading_is_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big.csv"
    big.write_text(HEADER + "\n" + "bert,H100,700,1,600\n" * 10)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("agent.sim.measured.MAX_FILE_BYTES", 100)
        with pytest.raises(BadInputError, match="bytes, more than the 100 allowed"):
            read_curves(big)
        mp.setattr("agent.sim.measured.MAX_ROWS", 5)
        mp.setattr("agent.sim.measured.MAX_FILE_BYTES", 10**6)
        with pytest.raises(BadInputError, match="10 rows, more than the 5 allowed"):
            read_curves(big)
    with pytest.raises(BadInputError, match="cannot read"):
        read_curves(tmp_path / "absent.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(BadInputError, match="UTF-8"):
        read_curves(tmp_path / "bin.csv")


def test_the_example_file_gives_every_workload_on_h100_and_a100() -> None:
    parsed = read_curves(EXAMPLE)
    assert parsed.problems == ()
    for model in (H100_SXM, A100_SXM):
        names = {c.workload for c in parsed.for_model(model)}
        assert len(names) == 6
    with pytest.raises(BadInputError, match="no usable curve for GPU model H200"):
        parsed.workload_classes(BUILTIN_MODELS["H200"])


def test_the_twin_draws_its_jobs_from_the_measured_workloads_and_the_oracle_knows_them(
    tmp_path: Path,
) -> None:
    (tmp_path / "curves").mkdir()
    (tmp_path / "curves" / "mine.csv").write_text(sweep())
    scenario = tmp_path / "mine.toml"
    scenario.write_text(
        "[twin]\nnodes = 2\ngpus_per_node = 4\nworkload_label = true\n"
        '[workloads]\ncurves = "curves/mine.csv"\n'
    )
    spec = load_scenario(scenario)
    assert [w.name for w in spec.workloads] == ["bert"]
    assert spec.mix == (("bert", 1.0),)
    twin = Twin(spec)
    twin.run_until(120.0)
    busy = twin.job_row >= 0
    assert busy.any()
    assert set(twin.job_workload()[busy]) == {"bert"}
    assert set(twin.labels()["workload"][busy]) == {"bert"}
    truth = twin.true_curves()
    assert np.allclose(truth["a"][busy], read_curves(tmp_path / "curves" / "mine.csv").curves[0].a)
    Oracle()(twin)  # the oracle plays on the measured truth without complaint


def test_a_scenario_names_its_curves_problems(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text('[workloads]\ncurves = "absent.csv"\n')
    with pytest.raises(BadInputError, match=r"curves .*absent.csv: cannot read"):
        load_scenario(scenario)
    scenario.write_text('[workloads]\ncurves = "c.csv"\nmix = { nothing = 1 }\n')
    (tmp_path / "c.csv").write_text(sweep())
    with pytest.raises(BadInputError, match="unknown workload classes in mix"):
        load_scenario(scenario)
    scenario.write_text('[workloads]\ncurve = "c.csv"\n')
    with pytest.raises(BadInputError, match=r"workloads.curve: unknown key"):
        load_scenario(scenario)


def test_demo_and_sim_record_take_curves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--nodes", "2", "--gpus-per-node", "4", "--duration", "10m"]
    assert main(["demo", *args, "--curves", str(EXAMPLE), "--json"]) == 0
    summary = last_json(capsys.readouterr().out)
    measured = read_curves(EXAMPLE).for_model(H100_SXM)
    assert sorted(summary["workloads"]) == sorted(c.workload for c in measured)
    trace = tmp_path / "t.parquet"
    assert main(["sim", "record", *args, "--curves", str(EXAMPLE), "-o", str(trace)]) == 0
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "\nbert,H100,700,fast,600\n")
    capsys.readouterr()
    assert main(["demo", *args, "--curves", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "line 2, column 'throughput': not a number ('fast')" in err
    assert "Traceback" not in err


def test_the_example_scenario_runs_in_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    example = Path(__file__).parents[1] / "examples" / "scenarios" / "measured-curves.toml"
    assert main(["demo", "--scenario", str(example), "--duration", "10m", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["scenario"] == str(example)
    assert "resnet50_imagenet" in summary["workloads"]

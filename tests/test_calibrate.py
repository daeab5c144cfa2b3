"""`ooda sim calibrate`: a day's trace of the twin gives back its arrival rate, job sizes and
durations within 10% (issue 23's acceptance), and the scenario it writes runs."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main
from agent.config import default_config
from agent.replay.calibrate import calibrate, dumps_toml, duration_table, kaplan_meier
from agent.replay.twin_trace import TwinRun, run_twin
from agent.sim.jobmix import WorkTable
from agent.sim.scenario import load_scenario
from agent.sim.twin import Twin, TwinSpec
from tests.conftest import last_json

# Many small, short jobs: over a thousand arrive in a day, so sampling noise stays near 3%.
SPEC = TwinSpec(
    nodes=8,
    gpus_per_node=8,
    seed=11,
    job_sizes=((1, 0.5), (2, 0.3), (4, 0.2)),
    median_job_s=1200.0,
)
DAY_S = 24 * 3600.0


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TwinRun]:
    path = tmp_path_factory.mktemp("calibrate") / "day.parquet"
    run = run_twin(SPEC, duration_s=DAY_S, step_s=30.0, record_to=path)
    return path, run


def test_a_day_of_the_twin_gives_back_its_arrivals_sizes_and_durations(
    day: tuple[Path, TwinRun], tmp_path: Path
) -> None:
    trace, run = day
    out = tmp_path / "mine.toml"
    result = calibrate(trace, out, default_config(), learn_curves=False)
    fit, jobs = result.fit, run.twin.jobs
    arrived = jobs.submit_s[: jobs.n] > 0
    # Arrival rate: the twin's (jobs an hour), and what it realized.
    rate_h = float(np.mean(fit.arrivals_per_h))
    assert rate_h == pytest.approx(run.twin.arrival_rate_per_s * 3600, rel=0.1)
    assert rate_h == pytest.approx(arrived.sum() / 24, rel=0.1)
    # Sizes: each share, and the mean.
    shares = dict((int(s), p) for s, p in fit.sizes)
    for size, share in SPEC.job_sizes:
        assert shares[size] == pytest.approx(share, rel=0.1)
    mean_size = sum(s * p for s, p in fit.sizes)
    assert mean_size == pytest.approx(float(jobs.n_gpus[: jobs.n][arrived].mean()), rel=0.1)
    # Durations: the median and mean of the twin's draws (lognormal, median 1,200 s, clipped).
    # The trace shows the time a job ran, a little over its work at full speed (a job runs at
    # its slowest GPU's pace).
    table = WorkTable(tuple(s for s, _ in fit.durations), tuple(p for _, p in fit.durations))
    draws = np.clip(np.random.default_rng(0).lognormal(np.log(1200.0), 0.8, 200_000), 300, 43200)
    assert table.quantile_s(0.5) == pytest.approx(float(np.median(draws)), rel=0.1)
    assert table.mean_s() == pytest.approx(float(draws.mean()), rel=0.1)
    # Occupancy: the trace's own share of busy GPUs.
    assert 0.6 < result.scenario["twin"]["occupancy"] < 0.95
    # The scenario reads back and its twin arrives at the same rate.
    spec = load_scenario(out)
    assert (spec.nodes, spec.gpus_per_node, spec.model.name) == (8, 8, "H100")
    assert Twin(spec).arrival_rate_per_s * 3600 == pytest.approx(rate_h, rel=1e-6)


def test_the_calibrated_scenario_runs_in_the_demo(
    day: tuple[Path, TwinRun], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace, _ = day
    out = tmp_path / "mine.toml"
    assert main(["sim", "calibrate", str(trace), "-o", str(out), "--no-curves", "--json"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["jobs_arrived"] > 1000
    assert main(["demo", "--scenario", str(out), "--duration", "10m", "--json"]) == 0
    demo = last_json(capsys.readouterr().out)
    assert demo["gpus"] == 64
    # ... and through a recording of it, in replay.
    mine = tmp_path / "mine.parquet"
    args = ["sim", "record", "--scenario", str(out), "--duration", "20m", "--step", "30s"]
    assert main([*args, "-o", str(mine)]) == 0
    capsys.readouterr()
    assert main(["replay", str(mine), "--json", "--no-progress", "--draws", "8"]) == 0
    replayed = last_json(capsys.readouterr().out)
    assert (replayed["gpus"], replayed["steps"]) == (64, 40)
    assert replayed["budget_violation_s"] == 0.0


def test_durations_of_jobs_outlasting_the_trace_count() -> None:
    # Half the jobs run 100 s; the rest would run 1,000 s but the trace ends at 500 s.
    d = np.array([100.0] * 50 + [500.0] * 50)
    censored = np.array([False] * 50 + [True] * 50)
    times, cdf = kaplan_meier(d, censored)
    assert times.tolist() == [100.0] and cdf.tolist() == [0.5]
    table = duration_table(d, censored)
    assert table[-1][1] == 1.0 and table[-1][0] >= 1000.0  # the rest: past what was seen
    # Uncensored: the empirical distribution.
    rng = np.random.default_rng(1)
    d = rng.lognormal(np.log(600.0), 0.5, 5000)
    t = duration_table(d, np.zeros(d.size, dtype=bool))
    w = WorkTable(tuple(s for s, _ in t), tuple(p for _, p in t))
    assert w.quantile_s(0.5) == pytest.approx(600.0, rel=0.05)


def test_bad_traces_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "s.toml")
    assert main(["sim", "calibrate", str(tmp_path / "none.parquet"), "-o", out]) == 2
    assert "no such file" in capsys.readouterr().err
    short = tmp_path / "short.parquet"
    run_twin(TwinSpec(nodes=1, gpus_per_node=2, median_job_s=40000), duration_s=60, record_to=short)
    assert main(["sim", "calibrate", str(short), "-o", out]) == 2
    assert "no job starting after its first step" in capsys.readouterr().err


def test_the_toml_written_reads_back() -> None:
    data = {"twin": {"model": 'H"1', "n": 3, "f": 0.5, "ok": True}, "w": {"mix": {"a b": 1.0}}}
    assert tomllib.loads(dumps_toml(data)) == data

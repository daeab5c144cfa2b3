"""Real job mixes: the tables derived from public traces, their sampling, and the twin and
scenarios that play them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.core.errors import BadInputError
from agent.sim.jobmix import JOB_MIXES, WorkTable, named_mix, sizes_for
from agent.sim.scenario import load_scenario
from agent.sim.twin import Twin, TwinSpec

# Medians of the four traces' GPU-job durations (AcmeTrace data/cluster_summary.csv), which the
# tables were cross-checked against (agent/sim/jobmix.py).
PUBLISHED_MEDIAN_S = {"philly": 874.0, "helios": 206.0, "pai": 481.0, "acme": 122.0}
# ... and their means (avg_run_time_gpu; Acme's cluster there is Seren), a check the tables'
# tails are right too: they come from the CDFs' ends, which the medians do not see.
PUBLISHED_MEAN_S = {"philly": 18006.0, "helios": 6652.0, "pai": 4787.0, "acme": 1414.0}


@pytest.mark.parametrize("name", JOB_MIXES)
def test_each_mix_keeps_its_trace_median_and_samples_its_table(name: str) -> None:
    mix = named_mix(name)
    assert mix.durations.quantile_s(0.5) == pytest.approx(PUBLISHED_MEDIAN_S[name], rel=0.15)
    assert mix.durations.mean_s() == pytest.approx(PUBLISHED_MEAN_S[name], rel=0.2)
    draws = np.array([mix.durations.sample(np.random.default_rng(i)) for i in range(4000)])
    assert float(np.median(draws)) == pytest.approx(mix.durations.quantile_s(0.5), rel=0.15)
    assert sum(p for _, p in mix.sizes) == pytest.approx(1.0, abs=1e-3)
    assert mix.sizes[0][0] == 1 and mix.sizes[0][1] > 0.5  # most jobs take one GPU
    if mix.arrival_shape:
        assert len(mix.arrival_shape) == 24
        assert np.mean(mix.arrival_shape) == pytest.approx(1.0, abs=0.01)


def test_a_duration_table_mean_matches_its_samples() -> None:
    table = WorkTable((60.0, 600.0, 6000.0), (0.2, 0.7, 1.0))
    rng = np.random.default_rng(3)
    draws = np.array([table.sample(rng) for _ in range(20000)])
    assert float(draws.mean()) == pytest.approx(table.mean_s(), rel=0.05)
    with pytest.raises(ValueError, match="end at 1"):
        WorkTable((60.0, 600.0), (0.2, 0.9))
    with pytest.raises(ValueError, match="increase"):
        WorkTable((600.0, 60.0), (0.2, 1.0))


def test_sizes_above_a_node_take_whole_nodes_or_are_left_out() -> None:
    sizes = ((1, 0.5), (4, 0.2), (12, 0.2), (64, 0.1))
    kept, p = sizes_for(sizes, gpus_per_node=8, gpus=32, multi_node=True)
    assert kept.tolist() == [1, 4, 16]  # 12 on whole nodes; 64 is over half the twin
    assert p.tolist() == pytest.approx([0.5 / 0.9, 0.2 / 0.9, 0.2 / 0.9])
    kept, _ = sizes_for(sizes, gpus_per_node=8, gpus=32, multi_node=False)
    assert kept.tolist() == [1, 4]


def test_the_twin_plays_a_named_mix(tmp_path: Path) -> None:
    scenario = tmp_path / "philly.toml"
    scenario.write_text('[twin]\nnodes = 4\ngpus_per_node = 8\njob_mix = "philly"\n')
    spec = load_scenario(scenario)
    assert spec.job_mix == "philly" and spec.multi_node and spec.occupancy == 0.74
    twin = Twin(spec)
    twin.run_until(3 * 3600.0, control=None)
    jobs = twin.jobs
    # Philly's jobs are long (a mean of 5 h): few arrive in 3 h; those found running count too.
    sizes = jobs.n_gpus[: jobs.n]
    assert jobs.n > 8 and (jobs.submit_s[: jobs.n] > 0).any()
    assert set(sizes.tolist()) <= {1, 2, 4, 8, 16}
    assert (sizes == 1).any()
    # A multi-node job runs on whole nodes.
    for row in np.flatnonzero(jobs.n_gpus[: jobs.n] > 8):
        nodes = twin.node_of[twin.job_row == row]
        if nodes.size:
            assert np.bincount(nodes).max() == 8


def test_arrivals_follow_the_hour_of_day() -> None:
    shape = tuple([0.2] * 12 + [1.8] * 12)
    twin = Twin(TwinSpec(nodes=2, gpus_per_node=8, arrival_shape=shape))
    assert twin.arrival_rate_at(3600.0) == pytest.approx(0.2 * twin.arrival_rate_per_s)
    assert twin.arrival_rate_at(13 * 3600.0) == pytest.approx(1.8 * twin.arrival_rate_per_s)
    per_h = tuple(float(h) for h in range(24))
    twin = Twin(TwinSpec(nodes=2, gpus_per_node=8, arrivals_per_h=per_h))
    assert twin.arrival_rate_at(5 * 3600.0 + 10) == pytest.approx(5 / 3600.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[twin]\njob_mix = "google"\n', "twin.job_mix: unknown job mix 'google'"),
        ("[jobs]\nsizes = [[0, 1]]\n", "jobs.sizes: [GPUs >= 1, share >= 0] pairs"),
        ("[jobs]\nsizes = [1, 2]\n", "jobs.sizes[0]: not a [number, number] pair"),
        ("[jobs]\ndurations = [[60, 0.5], [600, 0.9]]\n", "jobs.durations: duration table"),
        ("[jobs]\narrivals_per_h = [1, 2]\n", "jobs.arrivals_per_h: 24 numbers"),
        ("[jobs]\nqueue = 1\n", "jobs.queue: unknown key"),
        ("[twin]\nworkload_label = 1\n", "twin.workload_label: true or false"),
    ],
)
def test_a_bad_job_mix_is_refused(tmp_path: Path, text: str, message: str) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text(text)
    with pytest.raises(BadInputError) as err:
        load_scenario(scenario)
    assert message in str(err.value)

"""The twin's normal-but-surprising phases (agent/sim/phases.py): each one's shape and timing, that
they are seeded and columnar, what DCGM reports under them, and their scenario section."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from agent.core.errors import BadInputError
from agent.core.snapshot import Metric
from agent.sim.adapters import TwinSource
from agent.sim.devices import TwinGpu
from agent.sim.exporter import NodeExporter, dcgm_snapshot, served_fields
from agent.sim.phases import (
    BURST_EXTRA,
    CHECKPOINT_DURATION_S,
    CHECKPOINT_PERIOD_S,
    EVAL_DURATION_S,
    FLATLINE_DURATION_S,
    LOADER_DURATION_S,
    NO_PHASES,
    NORMAL_DAY,
    RESTART_DURATION_S,
    WARMUP_S,
    Phase,
    PhaseSpec,
    uniform,
)
from agent.sim.scenario import load_scenario
from agent.sim.twin import Twin, TwinSpec

FloatArray = npt.NDArray[np.float64]


@dataclass
class Played:
    twin: Twin
    mask: npt.NDArray[np.int64]  # steps x GPUs
    power: FloatArray
    throughput: FloatArray
    job_id: npt.NDArray[np.int64]  # -1: idle

    def has(self, phase: Phase) -> npt.NDArray[np.bool_]:
        return (self.mask & int(phase)) != 0


def play(
    phases: PhaseSpec, seconds: int = 7200, seed: int = 3, nodes: int = 2, job_s: float = 2400.0
) -> Played:
    spec = TwinSpec(nodes=nodes, gpus_per_node=4, seed=seed, phases=phases, median_job_s=job_s)
    twin = Twin(spec)
    mask, power, tput, jobs = [], [], [], []
    for _ in range(seconds):
        twin.step()
        mask.append(twin.phase_mask.copy())
        power.append(twin.power_w.copy())
        tput.append(twin.throughput.copy())
        jobs.append(np.where(twin.job_row >= 0, twin.jobs.job_id[np.maximum(twin.job_row, 0)], -1))
    return Played(twin, np.array(mask), np.array(power), np.array(tput), np.array(jobs))


def runs(on: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """(first step, length) of each run of True in a 1-D series."""
    edges = np.diff(np.concatenate([[0], on.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return list(zip(starts.tolist(), (ends - starts).tolist(), strict=True))


def job_runs(played: Played, phase: Phase) -> dict[int, list[tuple[int, int]]]:
    """Per job: the runs of `phase` on its first GPU (complete ones: not cut by the window)."""
    out: dict[int, list[tuple[int, int]]] = {}
    steps = played.mask.shape[0]
    for job in np.unique(played.job_id[played.job_id >= 0]).tolist():
        gpu = int(np.flatnonzero((played.job_id == job).any(axis=0))[0])
        on = played.has(phase)[:, gpu] & (played.job_id[:, gpu] == job)
        out[job] = [(s, n) for s, n in runs(on) if s > 0 and s + n < steps]
    return out


@pytest.fixture(scope="module")
def checkpoints() -> Played:
    return play(PhaseSpec(checkpoint=True), job_s=4 * 3600.0)  # long jobs: several checkpoints


def test_no_phases_report_the_truth() -> None:
    twin = Twin(TwinSpec(nodes=2, seed=1))
    twin.run_until(300)
    assert twin.spec.phases == NO_PHASES and not NO_PHASES.any
    assert twin.reported_power_w is twin.power_w and twin.reported_temp_c is twin.temp_c
    assert twin.reported_energy_j is twin.energy_j
    assert not twin.phase_mask.any()


def test_checkpoints_stall_every_gpu_of_the_job_together(checkpoints: Played) -> None:
    played = checkpoints
    ckpt = played.has(Phase.CHECKPOINT)
    assert ckpt.any()
    for job in np.unique(played.job_id[ckpt]).tolist():
        rows = played.job_id == job
        # Every GPU of the job is in its checkpoint at the same steps, or none is.
        per_step = np.where(rows, ckpt, False).sum(axis=1)
        assert np.all((per_step == 0) | (per_step == rows.sum(axis=1)))
    model = played.twin.spec.model
    assert played.power[ckpt].max() < model.idle_w + 0.1 * (model.max_cap_w - model.idle_w)
    assert np.all(played.throughput[ckpt] == 0.0)  # the job makes no progress meanwhile
    lo_d, hi_d = CHECKPOINT_DURATION_S
    lo_p, hi_p = CHECKPOINT_PERIOD_S
    seen = 0
    for spans in job_runs(played, Phase.CHECKPOINT).values():
        for _start, length in spans:
            assert lo_d - 1 <= length <= hi_d + 1
        for (a, _), (b, _) in itertools.pairwise(spans):
            assert lo_p - 1 <= b - a <= hi_p + 1
            seen += 1
    assert seen >= 1  # at least one job checkpointed twice in the window


def test_evaluation_draws_less_and_keeps_progressing() -> None:
    played = play(PhaseSpec(evaluation=True), seconds=9000)
    ev = played.has(Phase.EVALUATION)
    assert ev.any()
    twin = played.twin
    idle = twin.spec.model.idle_w
    natural = np.where(played.job_id >= 0, 0.0, np.nan)
    for job in np.unique(played.job_id[ev]).tolist():
        row = int(np.flatnonzero(twin.jobs.job_id[: twin.jobs.n] == job)[0])
        natural[played.job_id == job] = twin.jobs.natural_w[row]
    share = (played.power[ev] - idle) / (natural[ev] - idle)
    assert 0.35 < np.median(share) < 0.85
    assert np.all(played.throughput[ev] > 0)
    for spans in job_runs(played, Phase.EVALUATION).values():
        for _start, length in spans:
            assert EVAL_DURATION_S[0] - 1 <= length <= EVAL_DURATION_S[1] + 1


def test_loader_stalls_are_short_jittery_dips() -> None:
    played = play(PhaseSpec(loader_stalls=True), seconds=3600, nodes=4)
    stalls = [s for spans in job_runs(played, Phase.LOADER_STALL).values() for s in spans]
    assert len(stalls) >= 5
    lengths = np.array([n for _, n in stalls])
    assert lengths.min() >= LOADER_DURATION_S[0] - 1 and lengths.max() <= LOADER_DURATION_S[1] + 1
    assert len(set(lengths.tolist())) > 3  # jittery: not one fixed length
    on = played.has(Phase.LOADER_STALL)
    dips = [
        played.power[start, gpu] / played.power[start - 1, gpu]
        for gpu in range(on.shape[1])
        for start, _n in runs(on[:, gpu])
        if start > 0
    ]
    assert np.median(dips) < 0.85  # a dip of 20-70 % of the dynamic draw


def test_warmup_ramps_over_minutes() -> None:
    played = play(PhaseSpec(warmup=True), seconds=7200, nodes=4)
    warm = played.has(Phase.WARMUP)
    spans = [s for spans in job_runs(played, Phase.WARMUP).values() for s in spans]
    assert spans, "no job started in the window"
    for _start, length in spans:
        assert WARMUP_S[0] - 1 <= length <= WARMUP_S[1] + 1
    # Jobs the twin starts with are past their warm-up.
    assert not warm[0].any()
    # Early in a warm-up the draw is near idle; at its end, the job's.
    start, length = spans[0]
    job = next(j for j, s in job_runs(played, Phase.WARMUP).items() if (start, length) in s)
    gpu = int(np.flatnonzero((played.job_id == job).any(axis=0))[0])
    idle = played.twin.spec.model.idle_w
    assert played.power[start + 5, gpu] < idle * 1.2
    assert played.power[start + length + 5, gpu] > played.power[start + 5, gpu] + 50


def test_inference_services_follow_the_day_and_burst() -> None:
    phases = PhaseSpec(inference_share=0.5)
    night = Twin(TwinSpec(nodes=2, gpus_per_node=4, seed=2, phases=replace(phases, day_start_h=3)))
    noon = Twin(TwinSpec(nodes=2, gpus_per_node=4, seed=2, phases=replace(phases, day_start_h=14)))
    served = np.arange(4, 8)  # the last node
    night_w, noon_w, lift = [], [], []
    for _ in range(3600):
        night.step()
        noon.step()
        night_w.append(night.power_w[served].mean())
        noon_w.append(noon.power_w[served].mean())
        if (noon.phase_mask[served] & int(Phase.BURST)).any():
            daily = noon.phases.daily_load(noon.t_s, noon.job_row[served])
            lift.append(float(np.mean(noon._activity[served] - daily)))
    assert np.all(night.phase_mask[served] & int(Phase.INFERENCE))
    assert not (night.phase_mask[:4] & int(Phase.INFERENCE)).any()
    assert np.mean(noon_w) > 1.3 * np.mean(night_w)
    # Services run all day: never done, always placed.
    assert np.all(noon.job_row[served] >= 0) and noon.jobs.service[noon.job_row[served]].all()
    # A burst lifts the load by its extra share of the peak (less the jitter; capped at 1).
    assert lift and np.median(lift) > BURST_EXTRA[0] / 2


def test_flatline_freezes_what_dcgm_reports_not_the_gpu() -> None:
    spec = TwinSpec(nodes=2, gpus_per_node=4, seed=5, phases=PhaseSpec(flatlines_per_gpu_day=4.0))
    twin = Twin(spec)
    reported, true, flat = [], [], []
    for _ in range(4 * 3600):
        twin.step()
        reported.append(twin.reported_power_w.copy())
        true.append(twin.power_w.copy())
        flat.append((twin.phase_mask & int(Phase.FLATLINE)) != 0)
    rep, tru, on = np.array(reported), np.array(true), np.array(flat)
    assert on.any()
    gpu = int(np.flatnonzero(on.any(axis=0))[0])
    (start, length), *_ = runs(on[:, gpu])
    assert FLATLINE_DURATION_S[0] - 1 <= length <= FLATLINE_DURATION_S[1] + 1 or start == 0
    frozen = rep[start : start + length, gpu]
    assert np.all(frozen == frozen[0]) and frozen[0] == rep[start - 1, gpu]
    assert np.ptp(tru[start : start + length, gpu]) > 0  # the GPU itself goes on
    assert np.array_equal(rep[~on], tru[~on])
    # The agent's view and the exporter show the frozen reading; NVML reads the truth.
    if on[-1, gpu]:
        snap = TwinSource(twin).observe(twin.t_s)
        assert snap.column(Metric.POWER_W)[0][gpu] == rep[-1, gpu]
        assert TwinGpu(twin, gpu).power_usage_w() == twin.power_w[gpu]


def test_exporter_restart_vanishes_the_node_briefly_and_resets_energy() -> None:
    spec = TwinSpec(
        nodes=2, gpus_per_node=4, seed=5, phases=PhaseSpec(exporter_restarts_per_node_day=24.0)
    )
    twin = Twin(spec)
    source = TwinSource(twin)
    fields = served_fields()
    exporter = NodeExporter(twin, 1, fields)
    stale, up, energy, restart = [], [], [], []
    for _ in range(3600):
        twin.step()
        stale.append(source.observe(twin.t_s).stale[:4].all())
        assert dcgm_snapshot(twin, fields).stale[:4].all() == stale[-1]
        up.append(exporter.up)
        energy.append(twin.reported_energy_j[0])
        restart.append(bool(twin.exporter_restarting[0]))
    stale_a, up_a, restart_a = np.array(stale), np.array(up), np.array(restart)
    assert restart_a.any() and np.array_equal(stale_a, restart_a)
    assert np.array_equal(~up_a, restart_a)  # its /metrics does not answer meanwhile
    (start, length), *_ = runs(restart_a)
    assert RESTART_DURATION_S[0] - 1 <= length <= RESTART_DURATION_S[1] + 1
    # Back: the energy counter restarted from zero; the twin's own energy went on.
    after = start + length
    assert energy[after] < energy[start - 1] and energy[after] < 700.0 * 2
    assert twin.energy_j[0] > twin.reported_energy_j[0]
    # The node daemon stays reachable: caps still apply.
    assert twin.exporter_up.all()


def test_phases_are_seeded() -> None:
    a = play(NORMAL_DAY, seconds=900, seed=4)
    b = play(NORMAL_DAY, seconds=900, seed=4)
    c = play(NORMAL_DAY, seconds=900, seed=5)
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.power, b.power)
    assert not np.array_equal(a.mask, c.mask)
    assert np.array_equal(uniform(1, 2, np.arange(5)), uniform(1, 2, np.arange(5)))
    u = uniform(7, 0, np.arange(100_000))
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.01


def test_normal_day_scenario_section(tmp_path: Path) -> None:
    path = tmp_path / "day.toml"
    path.write_text('[phases]\npreset = "normal-day"\nflatlines_per_gpu_day = 0\n')
    spec = load_scenario(path)
    assert spec.phases == replace(NORMAL_DAY, flatlines_per_gpu_day=0.0)
    path.write_text("[phases]\ncheckpoint = true\ninference_share = 0.25\n")
    assert load_scenario(path).phases == PhaseSpec(checkpoint=True, inference_share=0.25)
    path.write_text('[twin]\nnodes = 2\n[phases]\npreset = "none"\n')
    assert load_scenario(path).phases == NO_PHASES


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('preset = "busy-day"', "phases.preset: unknown phase preset 'busy-day' (known: none"),
        ("checkpoint = 1", "phases.checkpoint: true or false, not 1"),
        ('inference_share = "a lot"', "phases.inference_share: not a number ('a lot')"),
        ("coffee_breaks = true", "phases.coffee_breaks: unknown key (known: preset, checkpoint"),
        ("inference_share = 2", "phases.inference_share is a share of the nodes in [0, 1]"),
        ("exporter_restarts_per_node_day = 100", "must lie in [0, 24]"),
    ],
)
def test_bad_phases_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f"[phases]\n{text}\n")
    with pytest.raises(BadInputError) as err:
        load_scenario(path)
    assert f"scenario {path}" in str(err.value) and message in str(err.value)


def test_a_twin_trace_says_which_phases_it_played() -> None:
    from agent.replay.twin_trace import scenario_of

    assert "phases" not in scenario_of(TwinSpec(nodes=1))
    assert scenario_of(TwinSpec(nodes=1, phases=NORMAL_DAY))["phases"] == NORMAL_DAY.as_dict()

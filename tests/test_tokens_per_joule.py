"""Tokens per joule, the one definition (agent.core.efficiency): tokens over the energy of the
GPUs that served them, per job from a snapshot joined with the application's figures, and
unknown (NaN / None), never 0, where no job reports tokens or their draw is not known."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.core.app_metrics import SERVERS, ThroughputKind
from agent.core.clock import FakeClock
from agent.core.efficiency import (
    TokenRates,
    token_rates,
    tokens_per_joule,
    tokens_per_joule_or_none,
)
from agent.core.snapshot import Metric, Snapshot
from agent.daemon.telemetry import DaemonMetrics
from agent.observe.app_throughput import AppSourceConfig, AppThroughputSource
from tests.daemon_helpers import START_UNIX, in_process, serve_tokens, twin_config, write
from tests.fakes import FakePrometheus, FakeSource
from tests.fakes import app_fleet as fleet


def joined(snap: Snapshot, answers: dict[str, dict[str, float]]) -> Snapshot:
    """The snapshot through the real join (vLLM first, then training), a fake Prometheus."""
    specs = [
        AppSourceConfig(server="vllm").spec(),  # type: ignore[arg-type]
        AppSourceConfig(server="training").spec(),  # type: ignore[arg-type]
    ]
    return AppThroughputSource(FakeSource([snap]), FakePrometheus(answers), specs).observe(100.0)


def test_the_quotient_is_tokens_over_joules_and_unknown_without_energy() -> None:
    out = tokens_per_joule(np.array([600.0, 5.0, np.nan, 3.0]), np.array([300.0, 0.0, 1.0, np.nan]))
    assert out[0] == 2.0
    assert np.isnan(out[1:]).all()  # no energy, no tokens known, no energy known: unknown
    assert tokens_per_joule_or_none(0.0, 100.0) == 0.0  # served nothing while drawing: truly 0
    assert tokens_per_joule_or_none(10.0, 0.0) is None


def test_per_job_tokens_and_the_draw_of_their_gpus() -> None:
    vllm, train = SERVERS[ThroughputKind.VLLM], SERVERS[ThroughputKind.TRAINING]
    snap = fleet(["7", "7", "8", "9", ""], [200.0, 400.0, 500.0, 650.0, 90.0])
    out = joined(snap, {vllm.rate: {"7": 1800.0, "8": 250.0}, train.rate: {"9": 2.0}})
    rates = token_rates(out)
    assert rates.job.tolist() == ["7", "8"]  # 9 counts steps, not tokens; "" has no job
    assert rates.tokens_per_s.tolist() == [1800.0, 250.0]
    assert rates.power_w.tolist() == [600.0, 500.0]
    assert rates.tokens_per_joule().tolist() == [3.0, 0.5]
    assert rates.total() == (2050.0, 1100.0)
    assert rates.cluster_tokens_per_joule() == pytest.approx(2050.0 / 1100.0)


def test_unknown_where_no_job_reports_tokens_or_a_gpus_draw_is_missing() -> None:
    snap = fleet(["7", "7"], [200.0, 400.0])
    none = token_rates(snap)  # no application sources at all
    assert none.job.size == 0 and np.isnan(none.cluster_tokens_per_joule())
    vllm = SERVERS[ThroughputKind.VLLM]
    blind = fleet(["7", "7"], [200.0, np.nan])
    rates = token_rates(joined(blind, {vllm.rate: {"7": 100.0}}))
    assert rates.job.tolist() == ["7"] and np.isnan(rates.tokens_per_joule()).all()
    assert rates.total() == (0.0, 0.0) and np.isnan(rates.cluster_tokens_per_joule())


def _scrape(tmp_path: Path, tokens: bool) -> tuple[str, Snapshot]:
    cfg = write(tmp_path / f"t{tokens}.toml", twin_config())
    wall = FakeClock(START_UNIX)
    daemon = in_process(cfg, tmp_path / f"state{tokens}", wall=wall)
    if tokens:
        serve_tokens(daemon, tokens_per_s=1000.0)
    try:
        for _ in range(3):
            wall.advance(daemon.interval_s)
            report = daemon.run_cycle()
        text = generate_latest(daemon.metrics.registry).decode()
    finally:
        daemon.shutdown()
    assert report is not None
    return text, report.snapshot


def _samples(text: str, name: str) -> dict[str, float]:
    return {
        m.group(1) or "": float(m.group(2))
        for m in re.finditer(rf'^{name}(?:{{hpc_job="([^"]*)"}})? (\S+)$', text, re.MULTILINE)
    }


def test_metrics_export_each_jobs_tokens_per_joule_and_the_clusters(tmp_path: Path) -> None:
    text, snap = _scrape(tmp_path, tokens=True)
    per_job = _samples(text, "ooda_tokens_per_joule")
    power, ok = snap.column(Metric.POWER_W)
    jobs = sorted({str(j) for j in snap.job.tolist() if j})
    assert jobs and set(per_job) == set(jobs)
    for job in jobs:  # each job's 1000 tokens/s over the draw of its own GPUs
        rows = (snap.job == job) & ok
        assert per_job[job] == pytest.approx(1000.0 / power[rows].sum(), rel=1e-9)
    cluster = _samples(text, "ooda_cluster_tokens_per_joule")[""]
    served = np.isin(snap.job, jobs) & ok
    assert cluster == pytest.approx(1000.0 * len(jobs) / power[served].sum(), rel=1e-9)


def test_metrics_leave_tokens_per_joule_absent_where_no_job_reports_tokens(
    tmp_path: Path,
) -> None:
    text, _ = _scrape(tmp_path, tokens=False)
    assert "# TYPE ooda_tokens_per_joule gauge" in text  # described, with no series: not 0
    assert not _samples(text, "ooda_tokens_per_joule")
    assert not _samples(text, "ooda_cluster_tokens_per_joule")


def test_metrics_keep_the_busiest_jobs_within_the_per_gpu_bound() -> None:
    metrics = DaemonMetrics(CollectorRegistry(), per_gpu_max=2)
    rates = TokenRates(
        job=np.array(["a", "b", "c", "d"]),
        tokens_per_s=np.array([100.0, 900.0, 500.0, 1000.0]),
        power_w=np.array([100.0, 300.0, 250.0, np.nan]),  # d: a GPU without a reading
    )
    metrics._token_rates = rates  # what observe_cycle keeps of the last snapshot
    text = generate_latest(metrics.registry).decode()
    assert _samples(text, "ooda_tokens_per_joule") == {"b": 3.0, "c": 2.0}  # d unknown: absent
    assert _samples(text, "ooda_cluster_tokens_per_joule") == {"": 1500.0 / 650.0}

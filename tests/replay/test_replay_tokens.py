"""Replay's tokens per joule (agent.core.efficiency): from a trace whose inference service
reports vLLM tokens, as recorded and under the replayed caps, in the KPIs, the text answer and
the HTML report; plainly unknown (None, never 0) for a trace where no job reports tokens."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from agent.cli import main
from agent.core.app_metrics import THROUGHPUT_KIND_LABEL, THROUGHPUT_UNIT_LABEL
from agent.core.gpu_models import H100_SXM
from agent.core.snapshot import Metric, build_snapshot
from agent.observe.trace import TraceWriter
from agent.replay.engine import PolicySet, replay_trace
from agent.replay.report import render_html

T0 = 1_714_564_800.0
METRICS = (Metric.POWER_W, Metric.SM_CLOCK_MHZ, Metric.UTIL_PCT, Metric.APP_RATE_PER_S)
TOKENS_PER_GPU_S = 1200.0


def write_trace(path: Path, tokens: bool) -> Path:
    """Job 7 on two GPUs serving vLLM tokens (where `tokens`), job 8 training, a budget under
    their draw: power_budget caps."""
    kind = ["vllm", "vllm", "sm_clock"] if tokens else ["sm_clock"] * 3
    unit = ["tokens", "tokens", "relative"] if tokens else ["relative"] * 3
    rate = [TOKENS_PER_GPU_S, TOKENS_PER_GPU_S, float("nan")]
    labels = (THROUGHPUT_KIND_LABEL, THROUGHPUT_UNIT_LABEL)
    with TraceWriter(
        path, time_base="unix", step_s=15, source={}, metrics=METRICS, labels=labels
    ) as w:
        for k in range(40):
            w.append(
                build_snapshot(
                    time_s=T0 + 15 * k,
                    node_of_gpu=["a", "a", "b"],
                    gpu=[0, 1, 0],
                    uuid=["GPU-a0", "GPU-a1", "GPU-b"],
                    model=[H100_SXM.model_name] * 3,
                    job=["7", "7", "8"],
                    values={
                        Metric.POWER_W: [600.0, 600.0, 650.0],
                        Metric.SM_CLOCK_MHZ: [1900.0, 1900.0, 1900.0],
                        Metric.UTIL_PCT: [99.0, 99.0, 99.0],
                        Metric.APP_RATE_PER_S: rate if tokens else [float("nan")] * 3,
                    },
                    age_s=[0.0] * 3,
                    stale=[False] * 3,
                    budget_w=1650.0,
                    labels={THROUGHPUT_KIND_LABEL: kind, THROUGHPUT_UNIT_LABEL: unit},
                )
            )
    return path


SETS = [PolicySet("power_budget", ("power_budget",))]


def test_replay_counts_tokens_per_joule_as_recorded_and_under_its_caps(tmp_path: Path) -> None:
    report = replay_trace(write_trace(tmp_path / "tokens.parquet", True), policy_sets=SETS)
    base, kpis = report.baseline, report.sets[0].kpis
    # As recorded: 2 x 1200 tokens/s over 2 x 600 W, every step.
    assert base["tokens_per_joule"] == pytest.approx(2.0)
    assert base["tokens_per_s"] == pytest.approx(2400.0)
    assert base["tokens_energy_kwh"] == pytest.approx(1200.0 * 40 * 15 / 3.6e6, abs=1e-3)
    assert kpis["actions"]["set_power_cap"] > 0  # the replayed caps changed the serving GPUs
    assert kpis["tokens_energy_kwh"] < base["tokens_energy_kwh"]
    assert kpis["tokens_per_joule"] is not None and kpis["tokens_per_joule"] > 0
    assert kpis["tokens_per_joule"] != base["tokens_per_joule"]
    page = render_html(report)
    assert "tokens per joule: as recorded 2.000 tokens/J (2,400 tokens/s" in page
    assert "<th>tokens per joule</th>" in page


def test_a_trace_without_tokens_says_unknown_never_zero(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "none.parquet", False)
    report = replay_trace(trace, policy_sets=SETS)
    for kpis in (report.baseline, report.sets[0].kpis):
        assert kpis["tokens_per_joule"] is None
        assert kpis["tokens_per_s"] is None and kpis["tokens_energy_kwh"] is None
    assert "tokens per joule: unknown: no job in the trace reports" in render_html(report)
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["replay", str(trace), "--compare", "power_budget"]) == 0
    assert "tokens per joule: unknown" in " ".join(out.getvalue().split())

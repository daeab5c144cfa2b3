"""`ooda replay --prometheus`: a range straight from a real Prometheus (range queries into a
temporary trace) replays like the trace the range was backfilled from."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.observe.trace import TraceReader
from agent.replay.prometheus import prometheus_config, record_range
from agent.replay.twin_trace import record_twin, run_twin
from agent.sim.kpis import uncapped_demand_w
from agent.sim.twin import BudgetSchedule, TwinSpec
from tests.conftest import last_json
from tests.integration.conftest import PrometheusFactory, ooda, tsdb_blocks

pytestmark = pytest.mark.integration


def test_replay_from_prometheus_matches_the_trace(
    prometheus_factory: PrometheusFactory, tmp_path: Path
) -> None:
    spec = TwinSpec(nodes=2, gpus_per_node=4, seed=4, median_job_s=3 * 3600.0, occupancy=1.0)
    budget = round(0.75 * uncapped_demand_w(TwinSpec(**{**spec.__dict__, "step_s": 15.0}), 1200))
    trace = tmp_path / "q.parquet"
    run_twin(
        TwinSpec(**{**spec.__dict__, "budget": BudgetSchedule.constant(budget)}),
        duration_s=1200,
        policies=["power_budget"],
        record_to=trace,
    )
    start = int(time.time()) // 15 * 15 - 1800  # 80 steps, well inside Prometheus's lookback
    end = start + 15 * 79
    openmetrics = tmp_path / "q.om"
    done = ooda("trace", "export", "--openmetrics", str(trace), "-o", str(openmetrics),
                "--start", str(start))  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = tsdb_blocks(openmetrics, tmp_path / "data")
    prom = prometheus_factory({}, data=data)  # scrapes nothing: only the backfilled range

    common = ["--policy", "thermal_guard", "--budget-w", str(budget), "--json"]
    from_prom = ooda("replay", "--prometheus", prom.url, "--start", str(start), "--end",
                     str(end), "--step", "15s", *common, timeout_s=120)  # fmt: skip
    assert from_prom.returncode == 0, from_prom.stderr
    from_file = ooda("replay", str(trace), *common, timeout_s=120)
    assert from_file.returncode == 0, from_file.stderr
    a, b = last_json(from_prom.stdout), last_json(from_file.stdout)
    assert prom.url in a["trace"]
    assert a["steps"] == b["steps"] == 80
    assert a["gpus"] == b["gpus"] == 8
    for key in ("energy_kwh", "throughput_ratio"):
        assert a[key] == pytest.approx(b[key], rel=0.01), key
        assert a["baseline"][key] == pytest.approx(b["baseline"][key], rel=0.01), key
    assert abs(a["budget_violation_s"] - b["budget_violation_s"]) <= 15
    assert a["budget_violation_s"] > 0  # without power_budget the budget is not held


def test_replay_from_an_unreachable_prometheus_says_so(tmp_path: Path) -> None:
    done = ooda("replay", "--prometheus", "http://127.0.0.1:9", "--start", "-10m", "--json")
    assert done.returncode != 0
    assert "127.0.0.1:9" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_range_is_recorded_with_the_group_label(
    prometheus_factory: PrometheusFactory, tmp_path: Path
) -> None:
    """`ooda record` and `ooda replay --prometheus` record a range the same way, each GPU with
    the configured group label: replay's range had none, so a config's per-label budgets
    (`cluster.label_budgets_w`) held nothing when replayed straight from Prometheus."""
    trace = tmp_path / "t.parquet"
    record_twin(TwinSpec(nodes=2, gpus_per_node=2, seed=5), trace, duration_s=300)
    start = int(time.time()) // 15 * 15 - 900
    openmetrics = tmp_path / "t.om"
    done = ooda("trace", "export", "--openmetrics", str(trace), "-o", str(openmetrics),
                "--start", str(start))  # fmt: skip
    assert done.returncode == 0, done.stderr
    # Each node in a rack of its own (relabelling does this in a real cluster).
    text = re.sub(r'Hostname="node(\d+)"', r'Hostname="node\1",rack="r\1"', openmetrics.read_text())
    openmetrics.write_text(text)
    data = tsdb_blocks(openmetrics, tmp_path / "data")
    prom = prometheus_factory({}, data=data)
    grouped = parse_config(
        {
            "source": {"kind": "prometheus"},
            "cluster": {"group_label": "rack", "label_budgets_w": {"r1": 1000.0}},
        }
    )
    recorded = tmp_path / "range.parquet"
    _stats, summary = record_range(
        prometheus_config(prom.url, grouped), recorded, start_s=start, end_s=start + 285, step_s=15
    )
    assert summary.steps == 20 and summary.gpus == 4
    reader = TraceReader(recorded)
    assert reader.meta.labels == ("rack",)
    racks = reader.snapshot(reader.meta.steps - 1).labels["rack"]
    assert sorted(set(racks.tolist())) == ["r1", "r2"]

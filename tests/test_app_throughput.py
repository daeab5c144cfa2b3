"""Application throughput: the join of each job's own figures to its GPUs (a hand-written fake
Prometheus answering the queries), the SM-clock fallback, the config section, and the twin's
inference services (prefill and decode under clock locks and caps)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.config import parse_config
from agent.core.app_metrics import SERVERS, THROUGHPUT_KIND_LABEL, ThroughputKind
from agent.core.errors import ConfigError
from agent.core.snapshot import Metric
from agent.core.throughput import throughput_view
from agent.observe.app_throughput import AppSourceConfig, AppThroughputSource
from agent.sim.inference import service_state
from agent.sim.kpis import service_gpus
from agent.sim.phases import PhaseSpec
from agent.sim.twin import Twin, TwinSpec
from tests.fakes import FakePrometheus, FakeSource
from tests.fakes import app_fleet as fleet

VLLM = SERVERS[ThroughputKind.VLLM]


def test_a_services_tokens_are_shared_by_its_gpus_and_others_use_the_proxy() -> None:
    snap = fleet(["7", "7", "8", "8", ""])
    prom = FakePrometheus(
        {VLLM.rate: {"7": 3000.0, "99": 5.0}, VLLM.ttft: {"7": 0.2}, VLLM.tpot: {"7": 0.02}}
    )
    spec = AppSourceConfig(server="vllm").spec()  # type: ignore[arg-type]
    out = AppThroughputSource(FakeSource([snap]), prom, [spec]).observe(100.0)
    rate, ok = out.column(Metric.APP_RATE_PER_S)
    assert rate[:2].tolist() == [1500.0, 1500.0]
    assert ok.tolist() == [True, True, False, False, False]
    kinds = ["vllm", "vllm", "sm_clock", "sm_clock", ""]
    assert out.labels[THROUGHPUT_KIND_LABEL].tolist() == kinds
    assert out.column(Metric.TTFT_P90_S)[0][0] == 0.2
    # Three aggregated queries, never one per GPU; the rate over the configured window.
    assert len(prom.queries) == 3 and "[60s]" in prom.queries[0]
    assert prom.queries[0].startswith("sum by (hpc_job) (rate(vllm:generation_tokens_total")
    view = throughput_view(out, np.full(5, 1980.0))
    assert view.kind.tolist() == ["vllm", "vllm", "sm_clock", "sm_clock", ""]
    assert view.unit.tolist() == ["tokens", "tokens", "relative", "relative", ""]
    assert view.rate_per_s[2] == pytest.approx(1800.0 / 1980.0)
    assert np.isnan(view.rate_per_s[4]) and view.by_job(out.job) == {"7": "vllm", "8": "sm_clock"}


def test_a_failed_query_leaves_the_figures_missing_and_says_why() -> None:
    snap = fleet(["7", "7"])
    prom = FakePrometheus({VLLM.rate: {"7": 10.0}}, fail=(VLLM.rate,))
    spec = AppSourceConfig(server="vllm").spec()  # type: ignore[arg-type]
    out = AppThroughputSource(FakeSource([snap]), prom, [spec]).observe(100.0)
    assert not out.column(Metric.APP_RATE_PER_S)[1].any()  # missing, never 0.0
    assert out.labels[THROUGHPUT_KIND_LABEL].tolist() == ["sm_clock", "sm_clock"]
    assert any("throughput (vllm)" in e and "connection refused" in e for e in out.errors)
    assert out.column(Metric.POWER_W)[1].all()  # the GPUs' telemetry is passed on


def test_the_first_source_with_a_job_wins_and_units_follow_it() -> None:
    snap = fleet(["7", "9"])
    train = SERVERS[ThroughputKind.TRAINING]
    prom = FakePrometheus({VLLM.rate: {"7": 100.0}, train.rate: {"7": 1.0, "9": 2.0}})
    specs = [
        AppSourceConfig(server="vllm").spec(),  # type: ignore[arg-type]
        AppSourceConfig(server="training").spec(),  # type: ignore[arg-type]
    ]
    out = AppThroughputSource(FakeSource([snap]), prom, specs).observe(100.0)
    assert out.labels[THROUGHPUT_KIND_LABEL].tolist() == ["vllm", "training"]
    assert out.labels["throughput_unit"].tolist() == ["tokens", "steps"]
    assert out.column(Metric.APP_RATE_PER_S)[0].tolist() == [100.0, 2.0]


def test_the_config_section_names_servers_and_needs_a_prometheus() -> None:
    with pytest.raises(ConfigError, match="unknown server 'sglang'"):
        parse_config({"throughput": {"sources": [{"server": "sglang"}]}})
    with pytest.raises(ConfigError, match=r"throughput\.prometheus_url"):
        parse_config({"throughput": {"sources": [{"server": "vllm"}]}})
    cfg = parse_config(
        {
            "throughput": {
                "prometheus_url": "http://127.0.0.1:9090",
                "sources": [{"server": "triton", "job_label": "slurm_job", "window_s": 30.0}],
            }
        }
    )
    spec = cfg.throughput.sources[0].spec()
    assert spec.ttft == "nv_inference_first_response_histogram_ms" and spec.latency_to_s == 1e-3
    assert "sum by (slurm_job, le)" in spec.quantile_query(spec.ttft, 0.9)


# -- the twin's inference services -----------------------------------------------------------


def test_a_clock_lock_lowers_decode_power_far_more_than_its_tokens() -> None:
    one = np.ones(1)
    free = service_state(0.6 * one, one, 700.0 * one, 75.0, 700.0, one)
    locked = service_state(0.6 * one, 0.6 * one, 700.0 * one, 75.0, 700.0, one)
    assert free.power_w[0] < 0.5 * 700.0  # decode draws well under the cap
    saving = 1.0 - locked.power_w[0] / free.power_w[0]
    assert saving > 0.2  # arXiv:2605.11999: up to 32 % of decode's energy
    assert locked.tokens_per_s[0] == pytest.approx(free.tokens_per_s[0])  # keeps up
    assert 1.0 < locked.tpot_median_s[0] / free.tpot_median_s[0] < 1.06  # memory-bound
    assert locked.ttft_median_s[0] / free.ttft_median_s[0] > 1.4  # compute-bound prefill


def test_a_cap_saving_as_much_slows_prefill_more_than_a_clock_lock() -> None:
    one = np.ones(1)
    locked = service_state(0.6 * one, 0.6 * one, 700.0 * one, 75.0, 700.0, one)
    capped = service_state(0.6 * one, one, locked.power_w * 1.0, 75.0, 700.0, one)
    assert capped.power_w[0] <= locked.power_w[0] + 1e-6
    assert capped.ttft_median_s[0] > 1.3 * locked.ttft_median_s[0]


def test_the_twins_services_serve_tokens_and_obey_locks() -> None:
    spec = TwinSpec(nodes=2, gpus_per_node=2, seed=1, phases=PhaseSpec(inference_share=0.5))
    twin = Twin(spec)
    twin.run_until(60)
    served = service_gpus(twin)
    assert served.tolist() == [2, 3]
    before = twin.services.generation_tokens.copy()
    with pytest.raises(ValueError, match="supported clocks"):
        twin.lock_clocks(served, 100.0, 1200.0)
    twin.lock_clocks(served, 210.0, 1200.0)
    twin.run_until(120)
    assert np.all(twin.sm_clock_mhz[served] <= 1200.0)
    assert twin.services.generation_tokens[0] > before[0]
    twin.reset_clocks(served)
    twin.run_until(180)
    assert np.all(twin.sm_clock_mhz[served] > 1200.0)


def test_a_clock_lock_holds_a_training_gpus_draw_and_a_cap_still_says_it_binds() -> None:
    twin = Twin(TwinSpec(nodes=1, gpus_per_node=4, seed=3, occupancy=1.0))
    twin.run_until(30)
    busy = np.flatnonzero((twin.job_row >= 0) & (twin.power_w > 300.0))
    assert busy.size
    gpu = busy[:1]
    before = float(twin.power_w[gpu][0])
    twin.lock_clocks(gpu, 210.0, 990.0)
    twin.run_until(60)
    assert twin.power_w[gpu][0] < 0.8 * before and twin.sm_clock_mhz[gpu][0] <= 990.0
    assert not twin.clocks_event_reasons[gpu][0] & 0x4  # the lock, not the cap, holds it
    twin.reset_clocks(gpu)
    twin.set_caps(gpu, [200.0])
    twin.run_until(90)
    assert twin.clocks_event_reasons[gpu][0] & 0x4  # NVML's power-cap reason

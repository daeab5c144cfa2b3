"""Application throughput for real: a real Prometheus scraping the twin's dcgm-exporter endpoints
and its inference services' vLLM endpoints (1 s scrapes), the scrape configuration naming each
service's job on its target (vLLM does not know its job), read by the throughput join and by
`ooda once` with a `[throughput]` section: the services' GPUs go by vLLM's tokens, every other
job's by the SM-clock proxy, and the tokens Prometheus rates are the tokens the twin served."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.core.app_metrics import THROUGHPUT_KIND_LABEL, THROUGHPUT_UNIT_LABEL
from agent.core.efficiency import token_rates
from agent.core.snapshot import Metric
from agent.observe.app_throughput import AppSourceConfig, AppThroughputSource
from agent.sim.exporter import VLLM_PATH, SimServer
from agent.sim.phases import PhaseSpec
from agent.sim.twin import TwinSpec
from tests.conftest import last_json
from tests.integration.conftest import SCRAPE_S, Prometheus, ooda

pytestmark = pytest.mark.integration

WINDOW_S = 5.0


def scrape_yaml(dcgm: list[str], vllm: dict[str, str]) -> str:
    """dcgm-exporter's targets, and each vLLM target with its job as a target label (what a
    file_sd or Kubernetes relabelling does for a real service)."""
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S:g}s", "scrape_timeout": f"{SCRAPE_S:g}s"},
        "scrape_configs": [
            {"job_name": "dcgm", "static_configs": [{"targets": dcgm}]},
            {
                "job_name": "vllm",
                "metrics_path": VLLM_PATH,
                "static_configs": [
                    {"targets": [target], "labels": {"hpc_job": job}}
                    for target, job in vllm.items()
                ],
            },
        ],
    }
    return json.dumps(config)  # YAML is a superset of JSON


@dataclass
class Served:
    sim: SimServer
    prometheus: Prometheus
    services: dict[str, str]  # vLLM target -> job


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    # Half the nodes serve (one service per node), in the afternoon's peak.
    spec = TwinSpec(
        nodes=4, gpus_per_node=2, seed=5, phases=PhaseSpec(inference_share=0.5, day_start_h=14.0)
    )
    base = tmp_path_factory.mktemp("prometheus-app")
    with SimServer(spec, port_base=0, speed=1.0) as sim:
        services = sim.vllm_targets()
        config = base / "prometheus.yml"
        config.write_text(scrape_yaml(sim.targets(), services))
        prom = Prometheus.under(base).start()
        try:
            prom.wait_for_gpus(8)
            time.sleep(WINDOW_S + 2 * SCRAPE_S)  # a rate window of vLLM samples
            yield Served(sim, prom, services)
        finally:
            prom.stop()


def test_vllm_tokens_mapped_to_the_services_jobs(served: Served) -> None:
    prom = served.prometheus
    spec = AppSourceConfig(server="vllm", window_s=WINDOW_S).spec()  # type: ignore[arg-type]
    source = AppThroughputSource(prom.source(), prom.source(), [spec])
    snap = source.observe(time.time())
    assert not snap.errors
    service_jobs = set(served.services.values())
    assert len(service_jobs) == 2
    kind = snap.labels[THROUGHPUT_KIND_LABEL]
    serving = np.isin(snap.job, list(service_jobs))
    assert int(serving.sum()) == 4  # two services of two GPUs
    assert set(kind[serving].tolist()) == {"vllm"}
    assert set(snap.labels[THROUGHPUT_UNIT_LABEL][serving].tolist()) == {"tokens"}
    others = (snap.job != "") & ~serving
    assert others.any() and set(kind[others].tolist()) == {"sm_clock"}
    rate, ok = snap.column(Metric.APP_RATE_PER_S)
    assert ok[serving].all() and not ok[~serving].any()  # never 0.0 where nothing is read
    ttft, ttft_ok = snap.column(Metric.TTFT_P90_S)
    tpot, tpot_ok = snap.column(Metric.TPOT_P90_S)
    assert ttft_ok[serving].all() and tpot_ok[serving].all()

    # The tokens Prometheus rates are the tokens the twin served: per service, its GPUs' shares
    # add up to what the twin counted over the same window (the twin runs in real time).
    twin = served.sim.twin
    with served.sim.lock:
        meters = twin.services
        truth = {
            str(int(twin.jobs.job_id[row])): (tokens, p90_ttft, p90_tpot)
            for row, tokens, p90_ttft, p90_tpot in zip(
                meters.rows.tolist(),
                meters.last.tokens_per_s.tolist(),  # type: ignore[union-attr]
                meters.last.ttft_p90_s.tolist(),  # type: ignore[union-attr]
                meters.last.tpot_p90_s.tolist(),  # type: ignore[union-attr]
                strict=True,
            )
        }
    for job in service_jobs:
        rows = snap.job == job
        tokens_per_s, p90_ttft, p90_tpot = truth[job]
        assert math.isclose(float(rate[rows].sum()), tokens_per_s, rel_tol=0.15), job
        # Quantiles from buckets interpolate linearly inside one: within the bucket's width.
        assert 0.5 * p90_ttft < float(ttft[rows][0]) < 2.0 * p90_ttft
        assert 0.5 * p90_tpot < float(tpot[rows][0]) < 2.0 * p90_tpot


def test_once_says_per_job_which_throughput_is_in_use(served: Served, tmp_path: Path) -> None:
    config = tmp_path / "ooda.toml"
    config.write_text(
        "[source]\n"
        'kind = "prometheus"\n'
        "[source.prometheus]\n"
        f'url = "{served.prometheus.url}"\n'
        f"scrape_interval_s = {SCRAPE_S}\n"
        "[[throughput.sources]]\n"
        'server = "vllm"\n'
        f"window_s = {WINDOW_S}\n"
    )
    done = ooda("once", "--config", str(config), "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    out = last_json(done.stdout)
    by_job = out["throughput_by_job"]
    service_jobs = set(served.services.values())
    assert {job for job, kind in by_job.items() if kind == "vllm"} == service_jobs
    assert {kind for job, kind in by_job.items() if job not in service_jobs} == {"sm_clock"}
    for gpu in out["per_gpu"]:
        if gpu["job"] in service_jobs:
            assert gpu["throughput_unit"] == "tokens" and gpu["throughput"] > 0
            assert gpu["ttft_p90_s"] > 0 and gpu["tpot_p90_s"] > 0
        elif gpu["job"]:
            assert gpu["throughput_source"] == "sm_clock" and gpu["ttft_p90_s"] is None


def test_tokens_per_joule_from_a_real_prometheus(served: Served) -> None:
    """The one definition (agent.core.efficiency) on the real join: each service's tokens a
    second over the draw DCGM reports for its GPUs, as the twin served and drew them."""
    prom = served.prometheus
    spec = AppSourceConfig(server="vllm", window_s=WINDOW_S).spec()  # type: ignore[arg-type]
    snap = AppThroughputSource(prom.source(), prom.source(), [spec]).observe(time.time())
    rates = token_rates(snap)
    assert set(rates.job.tolist()) == set(served.services.values())  # the services, no other
    twin = served.sim.twin
    with served.sim.lock:
        meters = twin.services
        tokens = dict(zip(meters.rows.tolist(), meters.last.tokens_per_s.tolist(), strict=True))  # type: ignore[union-attr]
        truth = {
            str(int(twin.jobs.job_id[row])): tokens[row]
            / float(twin.power_w[twin.job_row == row].sum())
            for row in meters.rows.tolist()
        }
    figure = rates.tokens_per_joule()
    for job, value in zip(rates.job.tolist(), figure.tolist(), strict=True):
        assert math.isclose(value, truth[job], rel_tol=0.2), (job, value, truth[job])
    assert rates.cluster_tokens_per_joule() > 0

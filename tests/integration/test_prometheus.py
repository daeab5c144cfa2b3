"""Observe for real: a real Prometheus scraping the twin's dcgm-exporter endpoints (1 s scrapes).

- the acceptance run: `ooda sim serve` + Prometheus + `ooda once`, a dropout turning a node's GPUs
  stale within two scrape intervals with nothing proposed for them;
- every GPU seen with exactly the values the twin serves; dcgm-exporter's default counters
  (no power limits) give missing fields, not zeros;
- Prometheus stopped mid-run: an explicit outage, and the loop carries on when it is back;
- a recorded trace backfilled into a fresh Prometheus returns the same series;
- hostile host names and stale GPUs against Prometheus's own PromQL parser.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.assembly import assemble
from agent.config import parse_config
from agent.core.snapshot import Metric, build_snapshot
from agent.observe.openmetrics import write_openmetrics
from agent.observe.trace import TraceWriter
from agent.sim.exporter import SimServer, dcgm_metric_values
from agent.sim.twin import TwinSpec
from tests.conftest import last_json
from tests.integration.conftest import (
    SCRAPE_S,
    Prometheus,
    PrometheusFactory,
    ooda,
    scrape_yaml,
    tsdb_blocks,
)
from tests.node_helpers import sim_serve_line

pytestmark = pytest.mark.integration

H100 = "NVIDIA H100 80GB HBM3"


# -- the acceptance run, through the command line ------------------------------------------------


def test_acceptance_sim_serve_once_and_a_dropout(prometheus_factory: PrometheusFactory) -> None:
    dropout_at_s = 20
    serve = subprocess.Popen(
        [sys.executable, "-m", "agent", "sim", "serve", "--nodes", "4", "--gpus-per-node", "4",
         "--port-base", "0", "--json", "--fault", f"dropout:node2@{dropout_at_s}+600"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        info = last_json(sim_serve_line(serve, 30))
        dropout_wall = info["started_unix_s"] + dropout_at_s
        prom = prometheus_factory({"dcgm": info["targets"]})
        prom.wait_for_gpus(16)
        assert time.time() < dropout_wall - 2, "too slow to observe before the dropout"

        # 16 GPUs with the power and limits the twin serves.
        done = ooda("once", "--prometheus", prom.url, "--dry-run", "--json", "--budget-w", "6000")
        assert done.returncode == 0, done.stderr
        out = last_json(done.stdout)
        assert (out["gpus"], out["nodes"], out["stale"], out["missing"]) == (16, 4, 0, 0)
        assert out["missing_fields"] == {}  # every field read is served (energy is not read)
        assert out["dry_run"] is True and not out["errors"]
        assert {g["node"] for g in out["per_gpu"]} == {"node1", "node2", "node3", "node4"}
        assert all(g["power_limit_w"] == 700.0 for g in out["per_gpu"])
        served = prom.source().query(
            "DCGM_FI_DEV_POWER_USAGE[10s]", out["time_s"]
        )  # raw samples Prometheus scraped from the twin
        raw = {
            (r["metric"]["Hostname"], int(r["metric"]["gpu"])): {float(v) for _, v in r["values"]}
            for r in served
        }
        for g in out["per_gpu"]:
            assert g["power_w"] in raw[(g["node"], g["gpu"])]
        assert math.isclose(
            out["fleet_power_w"], sum(g["power_w"] for g in out["per_gpu"]), abs_tol=0.5
        )
        assert out["intents"] and all(i["kind"] == "set_power_cap" for i in out["intents"])

        # node2's exporter stops: its 4 GPUs are stale within two scrape intervals.
        source = prom.source()
        while time.time() < dropout_wall:
            time.sleep(0.05)
        while True:
            snap = source.observe(time.time())
            stale = set(snap.node_of()[snap.stale])
            if stale:
                break
            assert time.time() - dropout_wall < 10, "node2 never went stale"
            time.sleep(0.05)
        delay_s = time.time() - dropout_wall
        assert stale == {"node2"} and int(snap.stale.sum()) == 4
        assert delay_s <= 2 * SCRAPE_S + 0.5, f"stale after {delay_s:.2f} s"

        done = ooda("once", "--prometheus", prom.url, "--dry-run", "--json", "--budget-w", "6000")
        assert done.returncode == 0, done.stderr
        out = last_json(done.stdout)
        assert out["gpus"] == 16 and out["stale"] == 4
        node2 = [g for g in out["per_gpu"] if g["node"] == "node2"]
        assert all(g["stale"] and g["power_w"] is None and g["age_s"] > 0 for g in node2)
        assert out["intents"], "the visible GPUs still get caps"
        assert not [i for i in out["intents"] if i["target"].startswith("node2")]
        assert math.isclose(
            out["fleet_power_w"],
            sum(g["power_w"] for g in out["per_gpu"] if not g["stale"]),
            abs_tol=0.5,
        )
    finally:
        serve.terminate()
        serve.wait(timeout=10)
    assert serve.returncode in (0, -15)


# -- one twin, two exporter flavours, one Prometheus ----------------------------------------------


@dataclass
class Cluster:
    full: SimServer  # every field
    default: SimServer  # dcgm-exporter's default counters: no power limits
    prometheus: Prometheus
    started_s: float


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    full = SimServer(TwinSpec(nodes=4, gpus_per_node=4, seed=5), port_base=0, speed=1).start()
    default = SimServer(
        TwinSpec(nodes=2, gpus_per_node=2, seed=6), port_base=0, speed=1, counters="default"
    ).start()
    base = tmp_path_factory.mktemp("cluster")
    (base / "prometheus.yml").write_text(
        scrape_yaml({"full": full.targets(), "default": default.targets()})
    )
    prom = Prometheus.under(base)
    try:
        prom.start()
        prom.wait_for_gpus(16, match={"job": "full"})
        prom.wait_for_gpus(4, match={"job": "default"})
        yield Cluster(full, default, prom, time.time())
    finally:
        prom.stop()
        full.stop()
        default.stop()


def test_every_gpu_seen_with_the_values_the_twin_serves(cluster: Cluster) -> None:
    server = cluster.full
    server.pause()  # the twin stands still: what Prometheus holds is what it serves now
    try:
        time.sleep(2.5 * SCRAPE_S)
        with server.lock:
            twin = server.twin
            served = dcgm_metric_values(twin, server.fields)
            jobs = twin.job_labels()
        snap = cluster.prometheus.source(match={"job": "full"}).observe(time.time())
    finally:
        server.resume()
    assert snap.n_gpus == 16 and not snap.stale.any() and not snap.errors
    assert list(snap.node_of()) == list(twin.node_names[twin.node_of])
    assert list(snap.gpu) == list(twin.gpu_idx)
    assert list(snap.uuid) == list(twin.uuid)
    assert set(snap.model) == {H100}
    assert list(snap.job) == list(jobs)
    assert (snap.age_s < 2 * SCRAPE_S).all()
    for metric, values in served.items():
        got, ok = snap.column(metric)
        assert ok.all(), metric
        np.testing.assert_allclose(got, values, rtol=0, atol=1e-9, err_msg=str(metric))


def test_default_counters_leave_power_limits_missing(cluster: Cluster) -> None:
    snap = cluster.prometheus.source(match={"job": "default"}).observe(time.time())
    assert snap.n_gpus == 4 and not snap.stale.any()
    assert snap.column(Metric.POWER_W)[1].all()
    for metric in (Metric.POWER_LIMIT_W, Metric.ENFORCED_LIMIT_W, Metric.MAX_LIMIT_W):
        values, ok = snap.column(metric)
        assert not ok.any() and np.isnan(values).all()  # missing, never 0


def test_budget_from_a_promql_expression(cluster: Cluster) -> None:
    source = cluster.prometheus.source(
        match={"job": "full"},
        budget_query='0.5 * sum(DCGM_FI_DEV_POWER_MGMT_LIMIT{job="full"})',
    )
    snap = source.observe(time.time())
    assert snap.budget_w == 0.5 * 16 * 700.0 and not snap.errors
    bad = cluster.prometheus.source(budget_query="sum(rate(")
    snap = bad.observe(time.time())
    assert snap.budget_w is None
    assert any("budget: prometheus" in e and "HTTP 400" in e for e in snap.errors)


def test_prometheus_stopped_mid_run_is_an_outage_and_the_loop_lives_on(
    cluster: Cluster, prometheus_factory: PrometheusFactory
) -> None:
    prom = prometheus_factory({"full": cluster.full.targets()})
    prom.wait_for_gpus(16)
    config = parse_config(
        {
            "source": {
                "kind": "prometheus",
                "prometheus": {"url": prom.url, "scrape_interval_s": SCRAPE_S, "retries": 1},
            },
            "cluster": {"budget_w": 6000},
        }
    )
    runtime = assemble(config)
    try:
        report = runtime.loop.cycle()
        assert report.snapshot.n_gpus == 16 and report.intents and not report.errors

        prom.stop()
        stopped = time.time()
        report = runtime.loop.cycle()
        assert report.snapshot.n_gpus == 0 and not report.intents and not report.actions
        assert report.errors[0].startswith(f"observe failed: prometheus {prom.url}: ")
        assert "connection refused" in report.errors[0]

        time.sleep(4 * SCRAPE_S)  # down for longer than the staleness limit (3 scrapes)
        assert runtime.loop.cycle().snapshot.n_gpus == 0  # still down, and still running

        prom.start()  # same port, same data: it comes back
        report = runtime.loop.cycle()
        snap = report.snapshot
        # The GPUs are known again, but nothing new was scraped while it was down: stale.
        assert snap.n_gpus == 16 and snap.stale.all()
        assert (snap.age_s >= time.time() - stopped - 1).all()
        assert not report.intents or all(
            not hasattr(i, "targets") or len(i.targets) == 0 for i in report.intents
        )
        prom.wait_for_gpus(16)
        report = runtime.loop.cycle()
        assert report.snapshot.fresh.all() and report.intents
    finally:
        runtime.close()


def test_recorded_trace_backfilled_returns_the_same_series(
    cluster: Cluster, prometheus_factory: PrometheusFactory, tmp_path: Path
) -> None:
    # Eight seconds of history that began after the cluster's first scrape (run first, this
    # test once recorded from before it), ingested even on a loaded machine.
    while time.time() < cluster.started_s + 8 + 2 + 3:
        time.sleep(0.2)
    end = int(time.time()) - 3
    start = end - 8
    original = cluster.prometheus.source(match={"job": "full"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (
        original.observe(float(start)).n_gpus < 16 or original.observe(float(end)).n_gpus < 16
    ):
        time.sleep(0.5)
    trace = tmp_path / "rec.parquet"
    done = ooda(
        "record", "--prometheus", cluster.prometheus.url, "--start", str(start), "--end",
        str(end), "--step", "1s", "-o", str(trace), "--config", str(_config(tmp_path)), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert last_json(done.stdout)["steps"] == 9

    openmetrics = tmp_path / "rec.om"
    done = ooda("trace", "export", "--openmetrics", str(trace), "-o", str(openmetrics))
    assert done.returncode == 0, done.stderr
    data = tsdb_blocks(openmetrics, tmp_path / "backfilled")
    fresh = prometheus_factory({}, data=data)  # scrapes nothing: only the backfilled blocks

    backfilled = fresh.source()
    for t in range(start, end + 1, 2):
        a, b = original.observe(float(t)), backfilled.observe(float(t))
        assert a.n_gpus == b.n_gpus == 16
        for name in ("uuid", "gpu", "model", "job", "stale"):
            assert list(getattr(a, name)) == list(getattr(b, name)), name
        assert list(a.node_of()) == list(b.node_of())
        for metric in a.values:
            np.testing.assert_array_equal(a.values[metric], b.values[metric], err_msg=str(metric))
    # And series by series, sample by sample, for one family.
    expr = "max by (Hostname, gpu, UUID, modelName, hpc_job) (DCGM_FI_DEV_GPU_TEMP{job=~'full|'})"
    assert _range(cluster.prometheus, expr, start, end) == _range(fresh, expr, start, end)


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "record.toml"
    path.write_text(
        '[source]\nkind = "prometheus"\n[source.prometheus]\nscrape_interval_s = 1\n'
        '[source.prometheus.match]\njob = "full"\n'
    )
    return path


def _range(prom: Prometheus, expr: str, start: int, end: int) -> dict[str, Any]:
    from datetime import UTC, datetime

    result = prom.source().client.custom_query_range(
        expr,
        start_time=datetime.fromtimestamp(start, UTC),
        end_time=datetime.fromtimestamp(end, UTC),
        step="1",
    )
    return {str(sorted(r["metric"].items())): r["values"] for r in result}


# -- label values Prometheus must not read as PromQL ----------------------------------------------


def test_hostile_host_names_and_stale_gpus_in_a_real_prometheus(
    prometheus_factory: PrometheusFactory, tmp_path: Path
) -> None:
    hosts = ['node"1', "a|b", "x.*", "n\\1", "nø 2", "}) or vector(1)"]
    t0 = float(int(time.time()) - 900)
    trace = tmp_path / "hostile.parquet"
    with TraceWriter(trace, time_base="unix", step_s=15, source={}, metrics=(Metric.POWER_W,)) as w:
        for k in range(33):  # 8 minutes; the first three hosts stop answering after 1 minute
            keep = hosts if k <= 4 else hosts[3:]
            w.append(
                build_snapshot(
                    time_s=t0 + 15 * k,
                    node_of_gpu=keep,
                    gpu=[0] * len(keep),
                    uuid=[f"GPU-{i}" for i in range(len(hosts))][-len(keep) :],
                    model=[H100] * len(keep),
                    job=[""] * len(keep),
                    values={Metric.POWER_W: [100.0 + k] * len(keep)},
                    age_s=[0.0] * len(keep),
                    stale=[False] * len(keep),
                )
            )
    openmetrics = tmp_path / "hostile.om"
    with openmetrics.open("w") as out:
        write_openmetrics(trace, out)
    data = tsdb_blocks(openmetrics, tmp_path / "data")
    prom = prometheus_factory({}, data=data)
    now = t0 + 15 * 32
    snap = prom.source(scrape_interval_s=15.0).observe(now)
    assert not snap.errors
    assert sorted(snap.node_of()) == sorted(hosts)
    gone = np.isin(snap.node_of(), hosts[:3])
    assert list(snap.stale) == list(gone)
    # Their newest sample, 7 minutes old, was found by the escaped-regex query.
    np.testing.assert_allclose(snap.age_s[gone], now - (t0 + 60), atol=15)
    assert (snap.age_s[~gone] == 0).all()
    assert (snap.column(Metric.POWER_W)[0][~gone] == 132.0).all()

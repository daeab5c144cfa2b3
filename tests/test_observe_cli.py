"""The observe commands without a Prometheus: config, bad input, outages, twin traces."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agent.assembly import assemble, prometheus_settings
from agent.cli import main
from agent.cli.trace import parse_time
from agent.config import parse_config
from agent.core.clock import SystemClock
from agent.core.errors import BadInputError, ConfigError, GpuError
from agent.core.snapshot import Metric
from agent.node.nvml import NvmlBackend
from agent.observe.prometheus import PrometheusSource
from tests.conftest import free_port, last_json


def test_prometheus_config_merges_names_and_defaults_to_advice() -> None:
    config = parse_config(
        {
            "source": {
                "kind": "prometheus",
                "prometheus": {"metrics": {"power_w": "my_power"}, "match": {"cluster": "a"}},
            },
            "cluster": {"budget_query": "facility_watts"},
        }
    )
    settings = prometheus_settings(config)
    assert settings.metrics[Metric.POWER_W] == "my_power"
    assert settings.metrics[Metric.TEMP_C] == "DCGM_FI_DEV_GPU_TEMP"  # the rest kept
    assert settings.budget_query == "facility_watts"
    assert (config.actuators.caps, config.actuators.placement) == ("none", "none")
    runtime = assemble(config)
    try:
        assert isinstance(runtime.loop.source, PrometheusSource)
        # No orient model or policy reads the energy counter: the loop does not ask for it.
        assert Metric.ENERGY_J not in runtime.loop.source.value_metrics.values()
        assert Metric.TEMP_C in runtime.loop.source.value_metrics.values()
        # The enforced limit only where a GPU lacks its power management limit.
        assert runtime.loop.source.fallbacks == {Metric.ENFORCED_LIMIT_W: Metric.POWER_LIMIT_W}
        # Memory utilization (it tells a job's workload class, once) and the health counters
        # an XID comes with only every minute.
        assert runtime.loop.source.slow_fields == {
            Metric.MEM_UTIL_PCT: 60.0,
            Metric.ECC_DBE_TOTAL: 60.0,
            Metric.REMAPPED_ROWS_UNCORRECTABLE: 60.0,
            Metric.ROW_REMAP_FAILURE: 60.0,
        }
        recording = prometheus_settings(config)  # a recording reads every field every step
        assert recording.fallbacks == {} and recording.slow_fields == {}
        assert isinstance(runtime.loop.clock, SystemClock)
        assert runtime.twin is None
    finally:
        runtime.close()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"prometheus": {"metrics": {"power_w": "bad name"}}},
            "source.prometheus.metrics: Value error, not a Prometheus metric name",
        ),
        ({"prometheus": {"metrics": {"watts": "x"}}}, "source.prometheus.metrics.watts"),
        ({"prometheus": {"host_labels": ["ok", "no-dash"]}}, "source.prometheus.host_labels"),
        ({"prometheus": {"metrics": {"power_w": ""}}}, "power_w needs a metric name"),
    ],
)
def test_bad_prometheus_config_names_the_key(data: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=re.escape(message.replace("Value error, ", ""))):
        parse_config({"source": {"kind": "prometheus", **data}})


def test_twin_actuators_with_prometheus_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"actuators\.caps: 'twin' acts on an in-process twin"):
        parse_config({"source": {"kind": "prometheus"}, "actuators": {"caps": "twin"}})
    config = parse_config({"source": {"kind": "prometheus"}, "actuators": {"lease_s": 60}})
    assert (config.actuators.caps, config.actuators.placement) == ("none", "none")


def test_the_nvml_source_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """This node's GPUs through NVML: the twin's actuators cannot act on them, a group label
    they cannot carry is refused, and a node without NVML is an error naming the source (the
    source on a real GPU: tests/hardware)."""
    with pytest.raises(ConfigError, match=r"placement: 'twin' .* which an NVML source"):
        parse_config({"source": {"kind": "nvml"}, "actuators": {"placement": "twin"}})
    config = parse_config({"source": {"kind": "nvml", "nvml": {"node": "dgx7"}}})
    assert (config.actuators.caps, config.actuators.placement) == ("none", "none")
    assert config.source.nvml.node == "dgx7"
    with pytest.raises(ConfigError, match=r"source\.nvml\.node"):
        parse_config({"source": {"kind": "nvml", "nvml": {"node": ""}}})
    with pytest.raises(ConfigError, match=r"group_label: NVML's GPUs carry no 'rack'"):
        parse_config({"source": {"kind": "nvml"}, "cluster": {"group_label": "rack"}})
    try:
        NvmlBackend().close()
    except GpuError:  # this machine has no NVML
        with pytest.raises(ConfigError, match=r"source.kind = 'nvml': NVML could not initialise"):
            assemble(config)
        monkeypatch.setenv("INVOCATION_ID", "0123abcd")  # as under systemd
        with pytest.raises(ConfigError, match=r"add its drop-in ooda-agent.service.d/nvml.conf"):
            assemble(config)
    else:
        pytest.skip("this machine has NVML: tests/hardware builds the source for real")


def test_once_needs_a_source_and_a_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["once"]) == 2
    assert "give --config FILE or --prometheus URL" in capsys.readouterr().err
    assert main(["once", "--prometheus", "localhost:9090"]) == 2
    assert "--prometheus: not an http(s) URL" in capsys.readouterr().err


def test_once_reports_an_outage_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["once", "--prometheus", url, "--budget-w", "5000", "--json"]) == 1
    out = last_json(capsys.readouterr().out)
    assert out["outage"] is True and out["gpus"] == 0 and out["intents"] == []
    assert out["errors"][0].startswith(f"observe failed: prometheus {url}: connection refused")
    assert out["per_gpu"] == [] and out["fleet_power_w"] == 0


def test_once_with_a_twin_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[source]\nkind = "twin"\n[twin]\nnodes = 2\ngpus_per_node = 2\nbudget_w = 900\n'
    )
    assert main(["once", "--config", str(cfg), "--dry-run", "--json"]) == 0
    out = last_json(capsys.readouterr().out)
    assert out["gpus"] == 4 and out["nodes"] == 2 and out["stale"] == 0
    assert {"node", "gpu", "uuid", "power_w", "power_limit_w", "temp_c", "util", "stale",
            "age_s"} <= set(out["per_gpu"][0])  # fmt: skip
    assert out["intents"] and {"kind", "target", "policy", "reason"} <= set(out["intents"][0])
    assert re.fullmatch(r"node\d/gpu\d", out["intents"][0]["target"])
    assert main(["once", "--config", str(cfg), "--dry-run"]) == 0
    assert "seen:     4 GPUs on 2 nodes" in capsys.readouterr().out


def test_parse_time() -> None:
    now = 1_700_000_000.0
    assert parse_time("now", "--start", now) == now
    assert parse_time("-2h", "--start", now) == now - 7200
    assert parse_time("now-90m", "--start", now) == now - 5400
    assert parse_time("2023-11-14T22:13:20Z", "--start", now) == 1_700_000_000.0
    assert parse_time("1699999999.5", "--start", now) == 1_699_999_999.5
    with pytest.raises(BadInputError, match="--end: not a time: 'yesterday'"):
        parse_time("yesterday", "--end", now)
    with pytest.raises(BadInputError, match="no time zone"):
        parse_time("2023-11-14T22:13:20", "--end", now)
    # Floats to Python, but no time: refused as bad input, not a crash later on.
    for text in ("nan", "inf", "+Infinity", "1e300", "1e20"):
        with pytest.raises(BadInputError, match=re.escape(f"--start: not a time: '{text}'")):
            parse_time(text, "--start", now)
    with pytest.raises(BadInputError, match="--end: not a time: '-999999999h'"):
        parse_time("-999999999h", "--end", now)


@pytest.mark.parametrize(("start", "end"), [("nan", "now"), ("-2h", "inf"), ("-2h", "nan")])
def test_record_refuses_a_time_that_is_not_one_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], start: str, end: str
) -> None:
    out = tmp_path / "t.parquet"
    url = f"http://127.0.0.1:{free_port()}"  # never asked: the times are refused first
    assert (
        main(["record", "--prometheus", url, "--start", start, "--end", end, "-o", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("ooda: error: --") and "not a time" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_record_leaves_no_partial_trace_whatever_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import agent.replay.prometheus

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("a bug")

    # The one recorder `ooda record` and `ooda replay --prometheus` share.
    monkeypatch.setattr(agent.replay.prometheus, "record_prometheus", broken)
    out = tmp_path / "t.parquet"
    url = f"http://127.0.0.1:{free_port()}"
    # A bug is a failure (exit 1) said in one line, not a traceback (issue 22).
    assert main(["record", "--prometheus", url, "--start", "-1h", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ooda: error: unexpected failure (a bug)") and err.count("\n") == 1
    assert not out.exists()


def test_the_recorder_refuses_non_finite_times(tmp_path: Path) -> None:
    from agent.observe.prometheus import PrometheusSettings
    from agent.observe.record import record_prometheus
    from agent.observe.trace import TraceWriter

    source = PrometheusSource(PrometheusSettings(url=f"http://127.0.0.1:{free_port()}"))
    writer = TraceWriter(tmp_path / "t.parquet", time_base="unix", step_s=15, source={})
    for start, end in ((float("nan"), 1e9), (1e9, float("inf"))):
        with pytest.raises(ValueError, match="finite"):
            record_prometheus(source, writer, start_s=start, end_s=end, step_s=15)
    writer.abort()
    source.close()


def test_sim_record_info_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.parquet"
    args = [
        "sim",
        "record",
        "--nodes",
        "2",
        "--gpus-per-node",
        "2",
        "--duration",
        "5m",
        "--step",
        "15s",
    ]
    args += ["--fault", "dropout:node2@60+60", "-o", str(trace), "--json"]
    assert main(args) == 0
    out = last_json(capsys.readouterr().out)
    assert out["steps"] == 20 and out["gpus"] == 4
    assert main(["trace", "info", str(trace), "--json"]) == 0
    info = last_json(capsys.readouterr().out)
    assert info["time_base"] == "twin" and info["scenario"]["faults"][0]["kind"] == "dropout"
    om = tmp_path / "t.om"
    assert main(["trace", "export", "--openmetrics", str(trace), "-o", str(om)]) == 0
    assert om.read_text().endswith("# EOF\n")
    assert main(["trace", "export", str(trace)]) == 2
    assert "choose a format" in capsys.readouterr().err


def test_bad_traces_and_faults_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    assert main(["trace", "info", str(bad)]) == 2
    assert f"trace {bad}: not a trace or truncated" in capsys.readouterr().err
    assert main(["sim", "record", "--fault", "melt:node1@5", "-o", str(bad)]) == 2
    assert "unknown kind 'melt'" in capsys.readouterr().err
    assert main(["sim", "serve", "--port-base", "0", "--print-scrape-config"]) == 2
    assert main(["record", "--prometheus", "http://x:1", "--start", "-1m", "--step", "1.5s",
                 "-o", str(bad)]) == 2  # fmt: skip
    assert "whole number of seconds" in capsys.readouterr().err


def test_sim_record_from_a_scenario(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text(
        "[twin]\nnodes = 2\ngpus_per_node = 2\nseed = 3\n[budget]\nwatts = 2000\n"
        '[[faults]]\nspec = "xid=79:node2/gpu1@30"\n'
    )
    trace = tmp_path / "s.parquet"
    args = ["sim", "record", "--scenario", str(scenario), "--duration", "2m", "-o", str(trace)]
    assert main(args) == 0
    assert main(["trace", "info", str(trace), "--json"]) == 0
    info = last_json(capsys.readouterr().out)
    assert info["gpus_max"] == 4 and info["budget_w"] == {"min": 2000.0, "max": 2000.0}
    assert info["scenario"]["seed"] == 3
    assert [f["spec"] for f in info["scenario"]["faults"]] == ["xid:node2/gpu1@30"]


def test_every_json_answer_is_strict_json_with_null_for_nan(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--json` answers carry measurements, and a missing one is NaN: it prints as null (jq and
    friends read strict JSON only), never as a crash or a bare NaN."""
    import numpy as np

    from agent.cli._common import emit_json

    emit_json({"power_w": float("nan"), "caps": np.array([300.0, np.inf]), "n": np.int64(2)})
    line = capsys.readouterr().out.strip()
    assert json.loads(line) == {"power_w": None, "caps": [300.0, None], "n": 2}
    assert "NaN" not in line and "Infinity" not in line

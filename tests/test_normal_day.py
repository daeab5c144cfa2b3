"""A shortened normal day with every phase through the live loop (every built-in policy, the
twin, the virtual clock): no action caused by an anomaly (issue #21, item 4)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.replay.normal_day import NormalDayOptions, run_normal_day
from agent.sim.phases import NORMAL_DAY, PHASE_NAMES

BENCH = Path(__file__).resolve().parent.parent / "bench" / "twin_normal_day.py"

# Two hours of 16 GPUs, with the rare events made frequent so that every phase happens: an
# exporter restart on every node every hour, a flat-lined reading on every GPU every 6 hours.
SHORT_DAY = NormalDayOptions(
    hours=2.0,
    nodes=4,
    gpus_per_node=4,
    seed=11,
    phases=replace(
        NORMAL_DAY,
        inference_share=0.25,
        flatlines_per_gpu_day=4.0,
        exporter_restarts_per_node_day=24.0,
    ),
)


@pytest.fixture(scope="module")
def short_day() -> dict[str, Any]:
    return run_normal_day(SHORT_DAY)


def test_every_phase_happens(short_day: dict[str, Any]) -> None:
    missing = [
        name for name in PHASE_NAMES.values() if not short_day["by_phase"][name]["gpu_hours"]
    ]
    assert not missing, f"phases that never happened: {missing}"
    assert short_day["gpu_hours"] == pytest.approx(32.0)
    assert short_day["actions"] > 0  # the loop did run its policies (budget caps, ...)


def test_no_action_is_caused_by_an_anomaly(short_day: dict[str, Any]) -> None:
    assert short_day["anomaly_actions"] == 0, short_day["anomaly_actions_by"]
    assert short_day["anomaly_intents"] == 0  # not even refused by the guard
    assert not any(k.endswith(("drain_node", "requeue_job")) for k in short_day["actions_by"])
    assert all(row["anomaly_actions"] == 0 for row in short_day["by_phase"].values())
    # The alarms are counted (whatever the detector says), per phase and per kind.
    assert short_day["alarms"] == sum(short_day["alarm_kinds"].values())
    assert short_day["alarms_per_1000_gpu_h"] == pytest.approx(
        1000 * short_day["alarms"] / short_day["gpu_hours"], abs=1e-3
    )


def test_bench_prints_the_corpus_line() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH), "--json", "--hours", "0.1", "--nodes", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["corpus"] == "twin-normal-day" and line["gpus"] == 16
    assert {
        "gpu_hours",
        "alarms_per_1000_gpu_h",
        "actions_per_1000_gpu_h",
        "anomaly_actions",
    } <= set(line)
    assert set(line["by_phase"]) == {*PHASE_NAMES.values(), "none"}

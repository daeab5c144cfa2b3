"""`ooda demo --json` end to end, as the Foundation issue's acceptance states it."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest


def run_demo(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "demo", "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def live() -> dict[str, Any]:
    return run_demo("--seed", "7")


@pytest.fixture(scope="module")
def dry() -> dict[str, Any]:
    return run_demo("--seed", "7", "--dry-run")


def test_live_demo_keeps_the_budget(live: dict[str, Any]) -> None:
    assert live["budget_violation_s"] == 0
    assert live["throughput_vs_oracle"] >= 0.95
    assert sum(live["actions"].values()) >= 1
    assert live["gpus"] == 64 and live["interval_s"] == 15
    assert {"throughput_vs_uncapped", "energy_kwh", "recommendations"} <= set(live)
    assert live["uncapped"]["budget_violation_s"] > 0  # the scenario does need control
    assert live["wall_s"] < 60


def test_dry_run_recommends_the_same_first_cycle_and_applies_nothing(
    live: dict[str, Any], dry: dict[str, Any]
) -> None:
    assert dry["first_cycle"] == live["first_cycle"] and dry["first_cycle"]
    assert all(v == 0 for v in dry["actions"].values())
    assert dry["twin_caps_changed"] == 0
    assert dry["recommendations"]
    first = [r for r in dry["recommendations"] if r["time_s"] == 0.0]
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in first]
    assert strip == dry["first_cycle"]
    assert {"kind", "target", "policy", "reason", "watts"} <= set(first[0])
    # Nothing changed, so the uncapped outcome repeats exactly.
    assert dry["throughput_vs_uncapped"] == 1.0


def test_the_default_twin_runs_no_inference_so_tokens_per_joule_is_unknown(
    live: dict[str, Any],
) -> None:
    """Unknown (null), never 0: the default twin serves no tokens."""
    assert live["tokens_per_joule"] is None
    assert live["uncapped"]["tokens_per_joule"] is None
    assert live["oracle"]["tokens_per_joule"] is None


def test_a_twin_with_inference_services_shows_their_tokens_per_joule(tmp_path: Any) -> None:
    scenario = tmp_path / "serving.toml"
    scenario.write_text(
        "[twin]\nnodes = 4\ngpus_per_node = 4\nseed = 7\n[phases]\ninference_share = 0.25\n"
    )
    out = run_demo("--scenario", str(scenario), "--duration", "30m")
    tpj = [out["tokens_per_joule"], out["uncapped"]["tokens_per_joule"]]
    tpj.append(out["oracle"]["tokens_per_joule"])
    # Services' tokens over their GPUs' energy: an 8B-class model on an H100 serves a few
    # tokens a joule at the twin's loads (agent/sim/inference.py).
    assert all(isinstance(v, float) and 0.5 < v < 50 for v in tpj), tpj
    text = subprocess.run(
        [sys.executable, "-m", "agent.cli", "demo", "--scenario", str(scenario), "--duration",
         "30m"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert f"tokens per joule:     {out['tokens_per_joule']:.3f}" in text

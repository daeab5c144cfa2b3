from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.core.intents import (
    DrainNode,
    GpuTargets,
    ReleasePowerCap,
    ResumeNode,
    SetNodeFeatures,
    SetNodeWeight,
    SetPowerCap,
)
from policies.conflicts import resolve
from policies.power_budget import PowerBudget
from policies.registry import DuplicatePolicyError, PolicyRegistry, builtin_registry
from tests.conftest import make_snapshot

ROOT = Path(__file__).resolve().parent.parent


def caps(policy: str, rows: list[int], watts: list[float]) -> SetPowerCap:
    snap = make_snapshot([1.0] * 4)
    return SetPowerCap(
        policy=policy,
        reason="r",
        targets=GpuTargets.from_rows(snap, rows),
        watts=np.asarray(watts, dtype=float),
    )


SAFETY = {
    "thermal_guard": True,
    "power_budget": True,
    "energy_efficiency": False,
    "placement": False,
}
ORDER = ["power_budget", "thermal_guard", "energy_efficiency", "placement"]


def test_lowest_cap_wins_per_gpu_and_a_cap_beats_a_release() -> None:
    snap = make_snapshot([1.0] * 4)
    release = ReleasePowerCap(
        policy="energy_efficiency", reason="r", targets=GpuTargets.from_rows(snap, [2, 3])
    )
    res = resolve(
        [
            caps("power_budget", [0, 1, 2], [500, 400, 300]),
            caps("energy_efficiency", [0, 1], [450, 450]),
            release,
        ],
        SAFETY,
        ORDER,
    )
    winners = {
        u: w
        for i in res.intents
        if isinstance(i, SetPowerCap)
        for u, w in zip(i.targets.uuid, i.watts, strict=True)
    }
    assert winners == {"GPU-0000": 450.0, "GPU-0001": 400.0, "GPU-0002": 300.0}
    kept_releases = [i for i in res.intents if isinstance(i, ReleasePowerCap)]
    assert [r.targets.uuid.tolist() for r in kept_releases] == [["GPU-0003"]]
    reasons = sorted(o.reason for o in res.overridden)
    assert reasons == [
        "a cap from another policy wins over a release",
        "a lower cap from another policy wins",
        "a lower cap from another policy wins",
    ]


def test_drain_wins_over_weight_resume_and_features() -> None:
    res = resolve(
        [
            SetNodeWeight(policy="placement", reason="r", node="node2", weight=100),
            DrainNode(policy="health_drain", reason="ooda: x", node="node2"),
            ResumeNode(policy="health_drain", reason="r", node="node2"),
            SetNodeFeatures(policy="placement", reason="r", node="node2", add=frozenset({"a"})),
            SetNodeWeight(policy="placement", reason="r", node="node3", weight=50),
        ],
        {"health_drain": True, "placement": False},
        ["health_drain", "placement"],
    )
    kept = sorted((type(i).__name__, i.target_name()) for i in res.intents)
    assert kept == [("DrainNode", "node2"), ("SetNodeWeight", "node3")]
    assert len(res.overridden) == 3


def test_safety_outranks_efficiency_then_the_more_conservative_weight() -> None:
    res = resolve(
        [
            SetNodeWeight(policy="placement", reason="r", node="node1", weight=1000),
            SetNodeWeight(policy="thermal_guard", reason="r", node="node1", weight=50),
            SetNodeWeight(policy="placement", reason="r", node="node2", weight=10),
            SetNodeWeight(policy="energy_efficiency", reason="r", node="node2", weight=20),
        ],
        SAFETY,
        ORDER,
    )
    kept = {
        i.target_name(): (i.policy, i.weight) for i in res.intents if isinstance(i, SetNodeWeight)
    }
    assert kept == {"node1": ("thermal_guard", 50), "node2": ("energy_efficiency", 20)}


def test_registry_refuses_duplicates() -> None:
    registry = PolicyRegistry()
    registry.register(PowerBudget)
    with pytest.raises(DuplicatePolicyError, match="already registered"):
        registry.register(PowerBudget, origin="entry point evil:PowerBudget")
    with pytest.raises(TypeError):
        registry.register(int)
    assert set(builtin_registry().names()) == {
        "power_budget",
        "thermal_guard",
        "health_drain",
        "energy_efficiency",
        "idle_powerdown",
        "placement",
        "curve_exploration",
    }


@pytest.mark.slow
def test_third_party_policy_is_found_listed_and_runs(tmp_path: Path) -> None:
    """The example package, installed separately, shows up in `ooda policies` and runs."""
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(site),
            str(ROOT / "examples" / "ooda-example-policy"),
        ],
        check=True,
        timeout=180,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "policies", "--json"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    listed = {p["name"]: p for p in json.loads(out.stdout.strip().splitlines()[-1])["policies"]}
    assert "quiet_hours" in listed and listed["quiet_hours"]["origin"].startswith("entry point")
    assert {s["name"] for s in listed["quiet_hours"]["settings"]} >= {
        "start_hour",
        "end_hour",
        "cap_frac",
    }
    # It runs inside the loop: a config that enables it, one cycle at 23:00 UTC.
    script = """
import json, sys
from agent.config import parse_config
from agent.core.clock import FakeClock
from agent.assembly import assemble
cfg = parse_config({"twin": {"nodes": 1}, "policies": {"quiet_hours": {"cap_frac": 0.6}}})
rt = assemble(cfg, clock=FakeClock(23 * 3600.0))
report = rt.loop.cycle()
print(json.dumps([[i.policy, float(i.watts.max())] for i in report.intents]))
"""
    ran = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    intents = json.loads(ran.stdout.strip().splitlines()[-1])
    assert intents and intents[0] == ["quiet_hours", 420.0]

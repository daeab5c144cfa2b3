"""Replay's results on a fixed trace, pinned: the KPIs, intervals, counts and timeline of two
policy sets, exactly as replay gave them before its passes were made faster (issue 27). A
speed-up that changes one number of them changes a decision or the counterfactual, and fails
here. Regenerate deliberately with OODA_UPDATE_GOLDEN=1 and review the diff."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from agent.replay.engine import PolicySet, ReplayReport, replay_trace
from agent.replay.twin_trace import record_twin
from agent.sim.twin import BudgetSchedule, TwinSpec

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "replay_kpis.json"
SETS = [
    PolicySet("power_budget", ("power_budget",)),
    PolicySet("power_budget+energy_efficiency", ("power_budget", "energy_efficiency")),
]


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pinned") / "trace.parquet"
    duration = 5400.0
    # 32 GPUs; a demand-response budget that binds for a third of the run.
    budget = BudgetSchedule.demand_response(32 * 560.0, 32 * 380.0, duration / 3, duration / 3)
    spec = TwinSpec(nodes=4, gpus_per_node=8, seed=3, budget=budget)
    record_twin(spec, path, duration_s=duration)
    return path


def _pinned(report: ReplayReport) -> dict[str, Any]:
    """Everything replay says of the trace, but its own speed."""
    out = report.to_json()
    for key in ("wall_s", "speed_sim_s_per_wall_s", "trace"):
        out.pop(key)
    out["sets"] = [
        {
            "name": s.policy_set.name,
            "cycles": s.cycles,
            "refusals": s.refusals,
            "errors": s.errors,
            "events": [[e.time_s, e.kind, e.count, e.policy, e.target] for e in s.events],
            "timeline": {
                "fleet_cf_w": s.timeline.fleet_cf_w,
                "fleet_cf_lo_w": s.timeline.fleet_cf_lo_w,
                "fleet_cf_hi_w": s.timeline.fleet_cf_hi_w,
                "mean_cap_cf_w": s.timeline.mean_cap_cf_w,
                "capped_cf": s.timeline.capped_cf,
            },
            "draws": {k: v.tolist() for k, v in s.draws.items()},
        }
        for s in report.sets
    ]
    out["learned"] = {
        "findings": [[f.time_s, f.target, f.kind] for f in report.learned.findings],
        "flagged_per_step": report.learned.flagged_per_step,
        "cap_changes": report.learned.cap_changes,
    }
    # Through JSON: NaN as NaN, floats to their shortest exact form.
    return dict(json.loads(json.dumps(out, sort_keys=True)))


@pytest.mark.parametrize("workers", [1, 2])
def test_replay_kpis_are_pinned(trace: Path, workers: int) -> None:
    """One set after the other, and the sets in parallel processes: the same results."""
    got = _pinned(replay_trace(trace, policy_sets=SETS, workers=workers))
    if os.environ.get("OODA_UPDATE_GOLDEN") == "1" and workers == 1:
        GOLDEN.write_text(json.dumps(got, sort_keys=True, indent=1) + "\n", encoding="utf-8")
    want = json.loads(GOLDEN.read_text(encoding="utf-8"))
    for key in sorted(set(want) | set(got)):  # (compared as JSON: NaN equals NaN there)
        assert _text(got.get(key)) == _text(want.get(key)), f"replay's {key!r} changed"


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True)

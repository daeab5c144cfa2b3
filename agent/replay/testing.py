"""Policy replay tests: given a scenario and a configuration, these actions happen (or none), and
these KPIs stay within these bounds.

A first harness over the twin (the Replay issue adds recorded traces). In a test:

    from agent.replay.testing import replay_twin, assert_golden

    result = replay_twin(spec, policies=["health_drain"], duration_s=1800)
    assert result.kpis["budget_violation_s"] == 0
    assert [a["target"] for a in result.actions("drain_node")] == ["node2"]
    assert_golden(result, Path("tests/golden/health_drain.json"))  # OODA_UPDATE_GOLDEN=1 rewrites

Decisions are compared as a compact list of what was applied or recorded: time, kind, target,
policy and the kind's value (watts rounded to 1 W).
"""

from __future__ import annotations

import difflib
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.act.audit import AuditLog
from agent.act.guard import GuardSettings
from agent.core.intents import Outcome
from agent.demo import build_agent, drive, run_kpis
from agent.sim.twin import Twin, TwinSpec
from policies.base import PolicySettings
from policies.registry import PolicyRegistry, builtin_registry


@dataclass
class ReplayResult:
    decisions: list[dict[str, Any]]
    kpis: dict[str, Any]
    refusals: list[dict[str, Any]] = field(default_factory=list)

    def actions(self, kind: str | None = None, policy: str | None = None) -> list[dict[str, Any]]:
        return [
            d
            for d in self.decisions
            if (kind is None or d["kind"] == kind) and (policy is None or d["policy"] == policy)
        ]


def _value(record: Mapping[str, Any]) -> Any:
    for key in ("watts", "weight", "job"):
        if key in record:
            return round(record[key]) if key == "watts" else record[key]
    if "add" in record:
        return {"add": record["add"], "remove": record["remove"]}
    return None


def replay_twin(
    spec: TwinSpec,
    *,
    policies: Sequence[str],
    duration_s: float,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    interval_s: float = 15.0,
    dry_run: bool = False,
    guard: GuardSettings | None = None,
    registry: PolicyRegistry | None = None,
) -> ReplayResult:
    """Run the agent with `policies` against the twin; return its decisions and KPIs (with an
    uncapped run of the same seed for comparison)."""
    registry = registry or builtin_registry()
    typed: dict[str, PolicySettings] = {
        name: registry.get(name).Settings.model_validate(dict((settings or {}).get(name, {})))
        for name in policies
    }
    twin = Twin(spec)
    loop, _ = build_agent(
        twin, dry_run, AuditLog(), registry, tuple(policies), typed, guard, interval_s
    )
    reports = drive(twin, loop, duration_s, interval_s)
    uncapped = Twin(spec)
    uncapped.run_until(duration_s)

    decisions: list[dict[str, Any]] = []
    refusals: list[dict[str, Any]] = []
    applied: Counter[str] = Counter()
    for report in reports:
        for action in report.actions:
            if action.outcome not in (Outcome.APPLIED, Outcome.RECORDED):
                continue
            for rec in action.intent.to_records():
                applied[rec["kind"]] += 1
                decisions.append(
                    {
                        "t_s": round(report.time_s),
                        "kind": rec["kind"],
                        "target": rec["target"],
                        "policy": rec["policy"],
                        "value": _value(rec),
                        "outcome": str(action.outcome),
                    }
                )
        for refusal in report.refused:
            refusals.append(
                {
                    "t_s": round(report.time_s),
                    "kind": str(refusal.intent.kind),
                    "reason": refusal.reason,
                }
            )
    k, u = run_kpis(twin, interval_s), run_kpis(uncapped, interval_s)
    kpis = {
        "budget_violation_s": k.violation_s,
        "throughput_vs_uncapped": round(k.work_gpu_s / u.work_gpu_s, 4) if u.work_gpu_s else None,
        "energy_kwh": round(k.energy_kwh, 3),
        "energy_vs_uncapped": round(k.energy_kwh / u.energy_kwh, 4) if u.energy_kwh else None,
        "actions": dict(applied),
        "drains": applied.get("drain_node", 0),
        "cycles": len(reports),
    }
    return ReplayResult(decisions, kpis, refusals)


def assert_golden(result: ReplayResult, path: Path) -> None:
    """The decisions equal the golden file's (rewritten when OODA_UPDATE_GOLDEN=1)."""
    rendered = [json.dumps(d, sort_keys=True) for d in result.decisions]
    if os.environ.get("OODA_UPDATE_GOLDEN") == "1" or not path.exists():
        if os.environ.get("OODA_UPDATE_GOLDEN") != "1":
            raise AssertionError(
                f"no golden file {path}: run with OODA_UPDATE_GOLDEN=1 to create it"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in rendered), encoding="utf-8")
        return
    expected = path.read_text(encoding="utf-8").splitlines()
    if expected != rendered:
        diff = "\n".join(
            list(difflib.unified_diff(expected, rendered, "golden", "now", lineterm=""))[:40]
        )
        raise AssertionError(
            f"decisions differ from {path} ({len(expected)} vs {len(rendered)}):\n{diff}"
        )

"""Policy replay tests: given a trace (or a twin scenario) and a configuration, these actions
happen (or none), and these KPIs stay within these bounds.

In a test (pytest, or any runner):

    from agent.replay.testing import replay

    def test_the_budget_holds_on_last_week():
        result = replay("traces/last-week.parquet", config="ooda.toml", policies=["power_budget"])
        result.assert_kpis(budget_violation_s=(0, 60), throughput_ratio=(0.9, None))
        result.assert_no_actions("drain_node")

    def test_a_failing_gpu_is_drained():
        result = replay("traces/xid79.parquet", config={"policies": {"health_drain": {}}})
        result.assert_actions("drain_node", targets=["node2"], between_s=(60, 120))

On the twin (a live run: the agent acts on the twin, whose outcome is measured, not estimated):

    from agent.replay.testing import replay_twin

    result = replay_twin(spec, policies=["thermal_guard"], duration_s=1800)
    result.assert_actions("set_power_cap", targets=["node1/gpu0"])

`replay` runs `ooda replay`'s engine: the loop in dry-run over the trace, the outcome estimated
from the learned power curves, with 90% intervals (`result.kpis["interval"]`) and the trace as
recorded (`result.kpis["baseline"]`). A twin trace to replay comes from `record` (the twin, with
policies live in the loop if given). Decisions are compact records: time, kind, target, policy
and the kind's value (watts rounded to 1 W); `assert_golden` compares them with a file
(`OODA_UPDATE_GOLDEN=1` rewrites it).
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.act.guard import GuardSettings
from agent.assembly import drive, twin_agent
from agent.config import Config, default_config, load_config, parse_config
from agent.core.intents import Outcome
from agent.replay.engine import (
    ACTION_KINDS,
    ReplayReport,
    decision_records,
    parse_policy_set,
    replay_trace,
)
from agent.replay.twin_trace import record_twin
from agent.sim.kpis import run_kpis
from agent.sim.twin import Twin, TwinSpec
from policies.base import PolicySettings
from policies.registry import PolicyRegistry, builtin_registry, default_registry

Bound = tuple[float | None, float | None]


@dataclass
class ReplayResult:
    decisions: list[dict[str, Any]]
    kpis: dict[str, Any]
    refusals: list[dict[str, Any]] = field(default_factory=list)
    report: ReplayReport | None = None  # the whole replay (traces only): timelines, notes

    def actions(self, kind: str | None = None, policy: str | None = None) -> list[dict[str, Any]]:
        return [
            d
            for d in self.decisions
            if (kind is None or d["kind"] == kind) and (policy is None or d["policy"] == policy)
        ]

    def targets(self, kind: str | None = None, policy: str | None = None) -> list[str]:
        """The targets acted on, each once, in the order first acted on."""
        return list(dict.fromkeys(d["target"] for d in self.actions(kind, policy)))

    def assert_actions(
        self,
        kind: str,
        *,
        targets: Sequence[str] | None = None,
        policy: str | None = None,
        count: int | None = None,
        between_s: Bound | None = None,
    ) -> list[dict[str, Any]]:
        """Actions of `kind` happened (by `policy`): on exactly `targets` (if given), `count`
        times (if given), the first one within `between_s` of the trace's start (if given).
        Returns them."""
        _check_kind(kind)
        found = self.actions(kind, policy)
        who = f" by {policy}" if policy else ""
        if not found:
            raise AssertionError(f"no {kind} action{who}; {self._summary()}")
        if targets is not None and sorted(self.targets(kind, policy)) != sorted(targets):
            raise AssertionError(
                f"{kind}{who} acted on {self.targets(kind, policy)}, expected {list(targets)}"
            )
        if count is not None and len(found) != count:
            raise AssertionError(f"{len(found)} {kind} actions{who}, expected {count}")
        if between_s is not None:
            first = found[0]["t_s"] - self._start_s()
            lo, hi = between_s
            if (lo is not None and first < lo) or (hi is not None and first > hi):
                raise AssertionError(
                    f"first {kind}{who} at {first:g} s from the start, expected within "
                    f"[{_show(lo)}, {_show(hi)}] s"
                )
        return found

    def assert_no_actions(self, kind: str | None = None, policy: str | None = None) -> None:
        """Nothing of `kind` (any kind, if None) happened (by `policy`)."""
        if kind is not None:
            _check_kind(kind)
        found = self.actions(kind, policy)
        if found:
            first = found[0]
            raise AssertionError(
                f"expected no {kind or 'action'}"
                + (f" by {policy}" if policy else "")
                + f", got {len(found)}; the first: {first['kind']} {first['target']} at "
                f"{first['t_s']} s by {first['policy']}"
            )

    def assert_kpis(self, **bounds: Bound) -> None:
        """Each named KPI within [low, high] (None: unbounded on that side), e.g.
        `assert_kpis(budget_violation_s=(0, 0), throughput_ratio=(0.95, None))`. Every KPI out of
        bounds is named in one error."""
        problems = []
        for name, (lo, hi) in bounds.items():
            if name not in self.kpis:
                raise AssertionError(f"no KPI {name!r} (KPIs: {', '.join(sorted(self.kpis))})")
            value = self.kpis[name]
            if not isinstance(value, int | float) or (
                isinstance(value, float) and math.isnan(value)
            ):
                problems.append(f"{name} = {value!r} is not a number")
                continue
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                iv = (self.kpis.get("interval") or {}).get(name)
                extra = f" (90% interval {iv})" if iv else ""
                problems.append(f"{name} = {value:g}{extra} outside [{_show(lo)}, {_show(hi)}]")
        if problems:
            raise AssertionError("; ".join(problems))

    def _start_s(self) -> float:
        return self.report.start_s if self.report is not None else 0.0

    def _summary(self) -> str:
        counts = Counter(d["kind"] for d in self.decisions)
        return "actions: " + (", ".join(f"{k} {n}" for k, n in counts.items()) or "none")


def _show(value: float | None) -> str:
    return "-inf/inf" if value is None else f"{value:g}"


def _check_kind(kind: str) -> None:
    if kind not in ACTION_KINDS:
        raise ValueError(f"unknown action kind {kind!r} (kinds: {', '.join(ACTION_KINDS)})")


# -- traces -------------------------------------------------------------------------------------


def _config(config: Config | Mapping[str, Any] | str | Path | None) -> Config:
    if config is None:
        return default_config()
    if isinstance(config, Config):
        return config
    if isinstance(config, str | Path):
        return load_config(Path(config), needs_source=False, check_files=False)
    return parse_config(config, source="config")


def replay(
    trace: str | Path,
    *,
    config: Config | Mapping[str, Any] | str | Path | None = None,
    policies: Sequence[str] | None = None,
    budget_w: float | None = None,
    draws: int = 40,
    registry: PolicyRegistry | None = None,
) -> ReplayResult:
    """Replay a trace through `policies` (default: the configuration's), as `ooda replay` does;
    `config` is a Config, a TOML file, or a dict in the file's shape."""
    registry = registry or default_registry()
    cfg = _config(config)
    sets = [parse_policy_set("+".join(policies), cfg, registry)] if policies else None
    report = replay_trace(
        Path(trace),
        config=cfg,
        policy_sets=sets,
        registry=registry,
        draws=draws,
        keep_decisions=True,
        budget_w=budget_w,
    )
    result = report.sets[0]
    kpis = {**result.kpis, "baseline": report.baseline}
    refusals = [{"reason": r, "targets": n} for r, n in result.refusals.items()]
    return ReplayResult(result.decisions, kpis, refusals, report)


def record(
    spec: TwinSpec,
    path: str | Path,
    *,
    duration_s: float,
    policies: Sequence[str] = (),
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    step_s: float = 15.0,
    interval_s: float = 15.0,
) -> Path:
    """A twin trace to replay: the twin for `duration_s`, with `policies` live in the loop."""
    registry = builtin_registry()
    typed = {
        name: registry.get(name).Settings.model_validate(dict((settings or {}).get(name, {})))
        for name in policies
    }
    record_twin(
        spec,
        Path(path),
        duration_s=duration_s,
        step_s=step_s,
        policies=policies,
        settings=typed,
        interval_s=interval_s,
    )
    return Path(path)


# -- the twin, live -----------------------------------------------------------------------------


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
    config: Config | Mapping[str, Any] | str | Path | None = None,
) -> ReplayResult:
    """Run the agent with `policies` against the twin; return its decisions and KPIs (with an
    uncapped run of the same seed for comparison). `config` (a Config, a TOML file or a dict in
    the file's shape) brings the rest of the agent's configuration: groups, job priorities,
    the rollout, orient's and the guard's settings, the policies' settings (`settings` wins)."""
    registry = registry or (builtin_registry() if config is None else default_registry())
    typed: dict[str, PolicySettings] = {
        name: registry.get(name).Settings.model_validate(dict(settings[name]))
        for name in policies
        if settings is not None and name in settings
    }
    twin = Twin(spec)
    agent = twin_agent(
        twin,
        policies,
        registry=registry,
        settings=typed,
        guard=guard,
        dry_run=dry_run,
        interval_s=interval_s,
        base=None if config is None else _config(config),
    )
    reports = drive(agent, duration_s)
    uncapped = Twin(spec)
    uncapped.run_until(duration_s)

    decisions: list[dict[str, Any]] = []
    refusals: list[dict[str, Any]] = []
    applied: Counter[str] = Counter()
    for report in reports:
        for action in report.actions:
            if action.outcome not in (Outcome.APPLIED, Outcome.RECORDED):
                continue
            for rec in decision_records(action, report.time_s):
                applied[rec["kind"]] += 1
                decisions.append(rec)
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

"""How good are the agent's decisions? Twin scenarios, the agent against the oracle and baselines.

Controllers, per scenario (same seed, same job stream):
- `ooda`: the agent (its policies, learned curves, guard), acting every interval;
- `oracle`: the best cap allocation given the twin's true curves, re-solved at every change (or,
  for energy scenarios, each job at its energy-optimal cap within the slowdown bound);
- `uniform`: one cap for every GPU, the budget split evenly (a static power profile);
- `proportional`: a reactive throttle: all caps scaled by budget / measured power each interval;
- `none`: no control.

Prints one JSON line per (scenario, controller): `scenario`, `controller`, `throughput_vs_oracle`
(priority-weighted where the scenario has priority classes), `budget_violation_s` (not counting
the first interval after each budget change), `energy_kwh`, and for energy scenarios
`energy_saving` (energy per unit of work, against no control), `energy_saving_vs_oracle_saving`,
`slowdown` (work done, against no control) and `over_bound_share` (the share of working
GPU-time whose cap alone cost it more than the 5% slowdown bound, from the twin's true curves).

"At least as good as a baseline" means: no more seconds above budget, and, where the baseline
held the budget too, at least its throughput.

Beside the original five, a scenario per real job mix (`mix_philly`, `mix_pai`, `mix_helios`,
`mix_acme`: agent/sim/jobmix.py) and per GPU generation (`gpu_h200`, `gpu_b200`, `gpu_gb200`,
`gpu_l40s`, `gpu_a100_pcie`), each with the demand-response drop of `budget_drop` sized on its
own uncapped draw. `--scenario FILE.toml` runs a scenario file (a twin of your cluster; without a
[budget] it gets the same drop).

The scenario `inference` (bench/_inference.py) runs inference services under SLOs with clock
locks: one line per controller (`ooda`, `oracle`, `caps_only`, `none`) with `tokens_per_joule`,
`slo_attainment` and `energy_saving_vs_oracle_saving`.

    python bench/decision_quality.py --json [--scenario NAME|FILE.toml ...] [--seeds 7]
        [--cap-dead-band-w 10]  # the guard dead band the agent runs under (W)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import _inference as inference
import numpy as np
import structlog

from agent.act.audit import AuditLog
from agent.act.guard import GuardSettings
from agent.assembly import drive, twin_agent
from agent.core.gpu_models import BUILTIN_MODELS
from agent.sim.jobmix import JOB_MIXES
from agent.sim.kpis import run_kpis, uncapped_demand_w
from agent.sim.oracle import EnergyOracle, Oracle
from agent.sim.scenario import apply_scenario, load_scenario
from agent.sim.twin import BudgetSchedule, Twin, TwinSpec
from policies.base import PolicySettings
from policies.registry import builtin_registry

PRIORITY_WEIGHTS = {0: 1.0, 1: 4.0, 2: 16.0}
INTERVAL_S = 15.0


@dataclass(frozen=True)
class Scenario:
    name: str
    spec: TwinSpec
    duration_s: float
    policies: tuple[str, ...] = ("power_budget",)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    energy: bool = False  # an energy scenario: no binding budget, energy_efficiency vs EnergyOracle
    weighted: bool = False  # throughput weighted by priority class


DURATION_S = 2 * 3600.0


def base_spec(seed: int) -> TwinSpec:
    """Every scenario's twin before its own changes: training jobs run for hours (median 3 h
    of work); the cluster starts at its occupancy."""
    return TwinSpec(nodes=8, gpus_per_node=8, seed=seed, median_job_s=3 * 3600.0)


NEW_GENERATIONS = ("H200", "B200", "GB200", "L40S", "A100-PCIe")


FLOOR_MARGIN = 1.1  # a drop stays this far above what the fleet draws at its lowest limits


def fleet_floor_w(spec: TwinSpec, duration_s: float = DURATION_S) -> float:
    """The fleet's mean draw over the run with every GPU at its lowest limit (this seed's jobs):
    no controller can hold a budget below it."""
    probe = Twin(replace(spec, budget=None))

    def lowest(twin: Twin) -> None:
        twin.cap_w[:] = twin.min_w

    probe.run_until(duration_s, control=lowest)
    _t, fleet_w, _b, _w = probe.step_log()
    return float(fleet_w.mean())


def demand_response(spec: TwinSpec, duration_s: float = DURATION_S) -> TwinSpec:
    """`spec` with budget_drop's budget (92% of its own uncapped mean draw, 65% for the middle
    30% of the run), sized on this seed's realized draw so that it binds whatever the mix. The
    drop never goes below FLOOR_MARGIN x the fleet's floor: a GPU whose lowest limit is half its
    highest (the A100 PCIe's 150 of 300 W) cannot follow a drop to 65%, and a budget the oracle
    cannot hold measures nothing."""
    demand = uncapped_demand_w(spec, duration_s)
    drop = max(0.65 * demand, FLOOR_MARGIN * fleet_floor_w(spec, duration_s))
    return replace(
        spec,
        budget=BudgetSchedule.demand_response(
            round(0.92 * demand, -1),
            round(min(drop, 0.92 * demand), -1),
            0.4 * duration_s,
            0.3 * duration_s,
        ),
    )


def twin_scenarios(seed: int, wanted: set[str] | None = None) -> list[Scenario]:
    """A scenario per real job mix and per new GPU generation (issue 23); only those `wanted`
    when given (each budget is sized with an uncapped run first)."""
    base = base_spec(seed)
    specs: dict[str, Callable[[], TwinSpec]] = {}
    for mix in JOB_MIXES:
        specs[f"mix_{mix}"] = lambda mix=mix: apply_scenario(  # type: ignore[misc]
            {"twin": {"job_mix": mix}}, base, source=f"job mix {mix}"
        )
    for model in NEW_GENERATIONS:
        name = f"gpu_{model.lower().replace('-', '_')}"
        specs[name] = lambda model=model: replace(base, model=BUILTIN_MODELS[model])  # type: ignore[misc]
    return [
        Scenario(name, demand_response(make()), DURATION_S)
        for name, make in specs.items()
        if wanted is None or name in wanted
    ]


def file_scenario(path: Path, seed: int) -> Scenario:
    """A scenario file as a bench scenario: its twin (the seed given unless it names one), its
    budget or budget_drop's."""
    base = base_spec(seed)
    spec = load_scenario(path, base)
    if spec.budget is None:
        spec = demand_response(spec)
    return Scenario(path.stem, spec, DURATION_S)


def scenarios(seed: int) -> list[Scenario]:
    base = base_spec(seed)

    def budgeted(spec: TwinSpec, normal: float, drop: float | None, duration: float) -> TwinSpec:
        demand = spec.expected_demand_w()
        sched = (
            BudgetSchedule.constant(round(normal * demand, -1))
            if drop is None
            else BudgetSchedule.demand_response(
                round(normal * demand, -1), round(drop * demand, -1), 0.4 * duration, 0.3 * duration
            )
        )
        return replace(spec, budget=sched)

    duration = DURATION_S
    sensitive_mix = (("llm_train", 0.4), ("small_cnn", 0.3), ("recommender", 0.3))
    wide_mix = (
        ("llm_train", 0.25),
        ("vision", 0.25),
        ("speech", 0.2),
        ("small_cnn", 0.15),
        ("nlp_finetune", 0.15),
    )
    return [
        Scenario("budget_drop", budgeted(base, 0.92, 0.65, duration), duration),
        Scenario(
            "mixed_workloads",
            budgeted(replace(base, mix=sensitive_mix), 0.75, None, duration),
            duration,
        ),
        Scenario(
            "heterogeneous",
            budgeted(
                replace(base, mix=wide_mix, job_sizes=((1, 0.3), (2, 0.2), (4, 0.2), (8, 0.3))),
                0.8,
                0.6,
                duration,
            ),
            duration,
        ),
        Scenario(
            "priority_classes",
            budgeted(replace(base, priorities=((0, 0.4), (1, 0.4), (2, 0.2))), 0.7, None, duration),
            duration,
            settings={"power_budget": {"priority_weights": PRIORITY_WEIGHTS}},
            weighted=True,
        ),
        Scenario(
            "energy",
            replace(base, budget=None),
            duration,
            # Caps never vary without a binding budget: opt-in exploration teaches the curves.
            policies=("power_budget", "energy_efficiency", "curve_exploration"),
            # Every job at once: each step is bounded by the most sensitive curve anyway.
            settings={"curve_exploration": {"enabled": True, "max_gpus": 64}},
            energy=True,
        ),
    ]


SLOWDOWN_BOUND = 0.05  # energy_efficiency's and EnergyOracle's default max_slowdown_frac
# The oracle caps exactly at the bound: a cap counts as over it only past this rounding.
OVER_BOUND_TOLERANCE = 1e-3


class MeteredTwin(Twin):
    """The twin, counting working GPU-seconds whose cap costs more than the slowdown bound."""

    def __init__(self, spec: TwinSpec) -> None:
        super().__init__(spec)
        self.working_gpu_s = 0.0
        self.over_bound_gpu_s = 0.0

    def step(self, dt: float | None = None, control: Callable[[Twin], None] | None = None) -> None:
        dt = self.spec.step_s if dt is None else dt
        super().step(dt, control)
        working = self.throughput > 0
        self.working_gpu_s += dt * float(working.sum())
        self.over_bound_gpu_s += dt * float(
            (self.cap_slowdown[working] > SLOWDOWN_BOUND + OVER_BOUND_TOLERANCE).sum()
        )


@dataclass
class Outcome:
    work_gpu_s: float
    weighted_work: float
    violation_s: float
    energy_kwh: float
    over_bound_share: float


def _interval_controller(act: Callable[[Twin], None]) -> Callable[[Twin], None]:
    state = {"next": 0.0}

    def control(twin: Twin) -> None:
        if twin.t_s >= state["next"] - 1e-9:
            act(twin)
            state["next"] += INTERVAL_S

    return control


def uniform(twin: Twin) -> None:
    budget = twin.budget_w()
    if budget is None:
        twin.cap_w[:] = np.clip(0.7 * twin.max_w, twin.min_w, twin.max_w)  # a static profile
        return
    share = (budget - twin.spec.nodes * twin.spec.node_overhead_w) / twin.spec.n_gpus
    twin.cap_w[:] = np.clip(np.floor(share), twin.min_w, twin.max_w)


def proportional(twin: Twin) -> None:
    budget = twin.budget_w()
    if budget is None:
        return
    target = 0.98 * budget
    fleet = twin.fleet_power_w()
    scale = target / fleet if fleet > 0 else 1.0
    if fleet <= target:
        scale = min(scale, 1.05)
    twin.cap_w[:] = np.clip(np.floor(twin.cap_w * scale), twin.min_w, twin.max_w)


def run(scenario: Scenario, controller: str, guard: GuardSettings | None = None) -> Outcome:
    twin = MeteredTwin(scenario.spec)
    if controller == "ooda":
        registry = builtin_registry()
        settings: dict[str, PolicySettings] = {
            name: registry.get(name).Settings.model_validate(scenario.settings.get(name, {}))
            for name in scenario.policies
        }
        agent = twin_agent(
            twin,
            scenario.policies,
            registry=registry,
            settings=settings,
            interval_s=INTERVAL_S,
            audit=AuditLog(),
            guard=guard,
        )
        drive(agent, scenario.duration_s)
    else:
        control: Callable[[Twin], None] | None = {
            "oracle": (
                EnergyOracle()
                if scenario.energy
                else Oracle(PRIORITY_WEIGHTS if scenario.weighted else None)
            ),
            "uniform": _interval_controller(uniform),
            "proportional": _interval_controller(proportional),
            "none": None,
        }[controller]
        twin.run_until(scenario.duration_s, control=control)
    k = run_kpis(twin, INTERVAL_S)
    weights = np.array(
        [PRIORITY_WEIGHTS.get(i, 1.0) for i in range(twin.work_by_priority_gpu_s.size)]
    )
    return Outcome(
        k.work_gpu_s,
        float((twin.work_by_priority_gpu_s * weights).sum()),
        k.violation_s,
        k.energy_kwh,
        twin.over_bound_gpu_s / twin.working_gpu_s if twin.working_gpu_s > 0 else 0.0,
    )


def _per_work(outcome: Outcome) -> float:
    return outcome.energy_kwh / outcome.work_gpu_s if outcome.work_gpu_s > 0 else float("nan")


def evaluate(scenario: Scenario, guard: GuardSettings | None = None) -> list[dict[str, Any]]:
    outcomes = {
        c: run(scenario, c, guard) for c in ("oracle", "ooda", "uniform", "proportional", "none")
    }
    oracle = outcomes["oracle"]
    rows = []
    for name, o in outcomes.items():
        ref, mine = (
            (oracle.weighted_work, o.weighted_work)
            if scenario.weighted
            else (oracle.work_gpu_s, o.work_gpu_s)
        )
        row: dict[str, Any] = {
            "scenario": scenario.name,
            "controller": name,
            "throughput_vs_oracle": round(mine / ref, 4) if ref > 0 else None,
            "budget_violation_s": o.violation_s,
            "energy_kwh": round(o.energy_kwh, 3),
        }
        if scenario.energy:
            # Energy per unit of work: a controller that merely does less work in the window
            # saves nothing by it.
            none = outcomes["none"]
            oracle_saving = 1.0 - _per_work(oracle) / _per_work(none)
            saving = 1.0 - _per_work(o) / _per_work(none)
            row["energy_saving"] = round(saving, 4)
            row["energy_saving_vs_oracle_saving"] = (
                round(saving / oracle_saving, 4) if oracle_saving > 0 else None
            )
            row["slowdown"] = (
                round(1.0 - o.work_gpu_s / none.work_gpu_s, 4) if none.work_gpu_s > 0 else None
            )
            row["over_bound_share"] = round(o.over_bound_share, 4)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="JSON lines (the only output format)")
    parser.add_argument(
        "--scenario", action="append", help="run only these scenarios (names or .toml files)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[7])
    parser.add_argument(
        "--cap-dead-band-w",
        type=float,
        default=None,
        help="the agent's guard dead band (W); default: GuardSettings' own",
    )
    args = parser.parse_args(argv)
    dead_band_w = args.cap_dead_band_w
    if dead_band_w is not None and not (math.isfinite(dead_band_w) and dead_band_w >= 0.0):
        parser.error(f"--cap-dead-band-w: {dead_band_w:g} W is not a finite number >= 0")
    guard = None if dead_band_w is None else GuardSettings(cap_dead_band_w=dead_band_w)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    files = [Path(n) for n in args.scenario or [] if n.endswith(".toml")]
    names = {n for n in args.scenario or [] if not n.endswith(".toml")}
    run_inference = "inference" in names or not (names or files)
    only_inference = names == {"inference"} and not files
    names.discard("inference")
    for seed in args.seeds:
        if run_inference:
            _emit(seed, inference.evaluate, seed)
        if only_inference:
            continue
        chosen = [file_scenario(path, seed) for path in files]
        if names or not files:
            chosen.extend(sc for sc in scenarios(seed) if not names or sc.name in names)
            chosen.extend(twin_scenarios(seed, names or None))
        for scenario in chosen:
            _emit(seed, evaluate, scenario, guard)
    return 0


def _emit(seed: int, run: Callable[..., list[dict[str, Any]]], *args: Any) -> None:
    """Print the rows of `run(*args)` as JSON lines, each with the seed and the wall time taken."""
    t0 = time.perf_counter()
    for row in run(*args):
        row["seed"] = seed
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        sys.stdout.write(json.dumps(row) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())

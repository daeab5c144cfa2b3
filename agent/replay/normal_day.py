"""The twin's normal day through the live loop: what the agent says and does on a day of
normal-but-surprising phases (agent/sim/phases.py) and no fault.

Every built-in policy runs live on the twin (virtual clock, the demo's wiring), by default under a
facility budget a little under the day's uncapped draw, so caps move all day as they would in
production. Nothing is wrong on such a day, so every anomaly alarm is a false alarm and every
action an anomaly causes is a mistake. The figures (`corpus: twin-normal-day`):

- alarms: alarm *episodes* (a GPU flagged for consecutive cycles counts once, as an operator's
  alert would), per 1,000 GPU-hours, by anomaly kind and by the phase each GPU was in during
  the cycle the episode opened or the two before it (an episode during no phase counts as `none`);
- actions: every action the guard let through (applied, or recorded in dry-run), per target;
- anomaly_actions: actions caused by an anomaly or a health signal: any drain, requeue or
  notification of the health and thermal policies, and thermal caps whose evidence says the GPU
  heats abnormally (a cap for plain heat is counted apart, as `thermal_hot_caps`).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.act.audit import AuditLog
from agent.assembly import BUILTIN_POLICIES, twin_agent
from agent.core.intents import (
    DrainNode,
    GpuTargets,
    Intent,
    IntentKind,
    Notify,
    Outcome,
    RequeueJob,
)
from agent.loop import CycleReport
from agent.sim.kpis import uncapped_demand_w
from agent.sim.phases import NORMAL_DAY, PHASE_NAMES, Phase, PhaseSpec
from agent.sim.twin import BudgetSchedule, Twin, TwinSpec
from policies.base import PolicySettings
from policies.health_drain import HealthDrainSettings
from policies.registry import PolicyRegistry, builtin_registry

IntArray = npt.NDArray[np.int64]

CORPUS = "twin-normal-day"
HEALTH_POLICIES = ("health_drain", "thermal_guard")
ATTRIBUTION_CYCLES = 2  # an alarm is laid to a phase seen on its GPU this many cycles before
DONE = (Outcome.APPLIED, Outcome.RECORDED)


@dataclass(frozen=True)
class NormalDayOptions:
    hours: float = 24.0
    nodes: int = 8
    gpus_per_node: int = 8
    seed: int = 7
    interval_s: float = 15.0
    phases: PhaseSpec = NORMAL_DAY
    budget_frac: float | None = 0.92  # of the day's uncapped mean draw; None: no budget
    dry_run: bool = False
    policies: tuple[str, ...] = BUILTIN_POLICIES  # as `ooda demo` runs them
    # health_drain's opt-in: drain nodes whose GPUs stay anomalous (off by default, as shipped).
    drain_on_persistent_anomaly: bool = False

    def __post_init__(self) -> None:
        if self.hours <= 0 or self.interval_s <= 0:
            raise ValueError("hours and interval_s must be positive")
        if self.budget_frac is not None and not 0 < self.budget_frac <= 2:
            raise ValueError("budget_frac is a share of the uncapped draw in (0, 2]")


def normal_day_spec(opts: NormalDayOptions) -> TwinSpec:
    """The day's twin: its phases, no fault, and a constant budget at `budget_frac` of what this
    seed's twin draws uncapped over the same hours."""
    spec = TwinSpec(
        nodes=opts.nodes, gpus_per_node=opts.gpus_per_node, seed=opts.seed, phases=opts.phases
    )
    if opts.budget_frac is None:
        return spec
    demand_w = uncapped_demand_w(spec, opts.hours * 3600.0)
    return replace(spec, budget=BudgetSchedule.constant(round(opts.budget_frac * demand_w, -1)))


@dataclass
class DayRecord:
    """Per cycle: each GPU's anomaly kind ("" when not flagged), whether it is persistent, and its
    phase bits; the actions and the health policies' intents with the rows they target."""

    kind: list[npt.NDArray[np.str_]]
    persistent: list[npt.NDArray[np.bool_]]
    mask: list[IntArray]
    actions: Counter[str]
    anomaly_actions: Counter[str]
    anomaly_intents: Counter[str]
    thermal_hot_caps: int
    anomaly_action_rows: list[tuple[int, IntArray]]  # (cycle, twin rows)


def _target_rows(intent: Intent, twin: Twin) -> IntArray:
    """The twin rows an intent is about (a node's: all its GPUs)."""
    targets = getattr(intent, "targets", None)
    if isinstance(targets, GpuTargets):
        rows = twin.rows_for(list(targets.node), list(targets.gpu))
        return rows[rows >= 0]
    node = getattr(intent, "node", None)
    if isinstance(intent, Notify):
        node = intent.target.split("/")[0]
    if isinstance(node, str):
        k = np.flatnonzero(twin.node_names == node)
        if k.size:
            return np.flatnonzero(twin.node_of == int(k[0]))
    return np.zeros(0, dtype=np.int64)


def _abnormal_share(intent: Intent) -> tuple[int, int]:
    """A thermal cap's targets: (heating abnormally, only hot)."""
    n = len(getattr(intent, "targets", ()))
    abnormal = np.asarray(intent.evidence.get("abnormal", np.zeros(0)), dtype=bool)
    if abnormal.shape[0] != n:
        return (n, 0) if abnormal.any() else (0, n)
    return int(abnormal.sum()), n - int(abnormal.sum())


def anomaly_caused(intent: Intent) -> tuple[int, int]:
    """(targets an anomaly or health signal moved the intent to, thermal caps for plain heat).
    A normal day should never drain or requeue, whoever asks; notifications and caps count
    when the health and thermal policies send them."""
    if isinstance(intent, DrainNode | RequeueJob):
        return 1, 0
    if isinstance(intent, Notify):
        return (1, 0) if intent.policy in HEALTH_POLICIES else (0, 0)
    if intent.policy == "thermal_guard" and intent.kind is IntentKind.SET_POWER_CAP:
        return _abnormal_share(intent)
    return 0, 0


def _record_actions(rec: DayRecord, cycle: int, report: CycleReport, twin: Twin) -> None:
    for intent in report.intents:
        if anomaly_caused(intent)[0]:
            rec.anomaly_intents[f"{intent.policy}/{intent.kind}"] += 1
    for action in report.actions:
        if action.outcome not in DONE:
            continue
        intent = action.intent
        name = f"{intent.policy}/{intent.kind}"
        rec.actions[name] += len(getattr(intent, "targets", [None]))
        caused, hot = anomaly_caused(intent)
        rec.thermal_hot_caps += hot
        if caused:
            rec.anomaly_actions[name] += caused
            rec.anomaly_action_rows.append((cycle, _target_rows(intent, twin)))


def drive_day(twin: Twin, opts: NormalDayOptions, registry: PolicyRegistry) -> DayRecord:
    """Run the loop on the twin for the day, recording what the figures are computed from."""
    settings: dict[str, PolicySettings] = {}
    if opts.drain_on_persistent_anomaly:
        settings["health_drain"] = HealthDrainSettings(drain_on_persistent_anomaly=True)
    loop = twin_agent(
        twin,
        opts.policies,
        registry=registry,
        settings=settings,
        dry_run=opts.dry_run,
        interval_s=opts.interval_s,
        audit=AuditLog(path=None),
    ).loop
    rec = DayRecord([], [], [], Counter(), Counter(), Counter(), 0, [])
    n = twin.spec.n_gpus
    duration_s = opts.hours * 3600.0
    next_cycle = 0.0
    while twin.t_s < duration_s - 1e-9:
        if twin.t_s >= next_cycle - 1e-9:
            report = loop.cycle()
            flags = report.situation.anomalies
            if flags is None or flags.flagged.shape[0] != n:
                rec.kind.append(np.full(n, "", dtype=np.str_))
                rec.persistent.append(np.zeros(n, dtype=bool))
            else:
                rec.kind.append(np.where(flags.flagged, flags.kind, "").astype(np.str_))
                persistent = flags.persistent if flags.persistent is not None else flags.flagged
                rec.persistent.append(persistent & flags.flagged)
            rec.mask.append(twin.phase_mask.copy())
            _record_actions(rec, len(rec.kind) - 1, report, twin)
            next_cycle += opts.interval_s
        twin.step(min(twin.spec.step_s, next_cycle - twin.t_s, duration_s - twin.t_s))
    return rec


def _episode_starts(flagged: npt.NDArray[np.bool_]) -> tuple[IntArray, IntArray]:
    """(cycle, GPU) where a run of flagged cycles begins; flagged is cycles x GPUs."""
    before = np.vstack([np.zeros((1, flagged.shape[1]), dtype=bool), flagged[:-1]])
    cycles, gpus = np.nonzero(flagged & ~before)
    return cycles.astype(np.int64), gpus.astype(np.int64)


def _window_mask(mask: IntArray, cycles: IntArray, gpus: IntArray) -> IntArray:
    """Per (cycle, GPU): the phase bits seen on the GPU in that cycle or the few before."""
    out = np.zeros(cycles.shape[0], dtype=np.int64)
    for back in range(ATTRIBUTION_CYCLES + 1):
        out |= mask[np.maximum(cycles - back, 0), gpus]
    return out


def _per_1000(count: float, gpu_hours: float) -> float | None:
    """A rate per 1,000 GPU-hours (None: no exposure; JSON has no NaN)."""
    return round(1000.0 * count / gpu_hours, 3) if gpu_hours > 0 else None


def _by_phase(
    mask: IntArray,
    alarm_bits: IntArray,
    alarm_kinds: npt.NDArray[np.str_],
    action_bits: list[int],
    interval_h: float,
) -> dict[str, dict[str, Any]]:
    """Per phase: its exposure, the alarms laid to it (and their kinds), the anomaly actions."""
    out: dict[str, dict[str, Any]] = {}
    for phase, name in [*PHASE_NAMES.items(), (Phase(0), "none")]:
        if phase:
            exposure_h = float(((mask & int(phase)) != 0).sum()) * interval_h
            mine = (alarm_bits & int(phase)) != 0
            actions = sum(1 for bits in action_bits if bits & int(phase))
        else:
            exposure_h = float((mask == 0).sum()) * interval_h
            mine = alarm_bits == 0
            actions = sum(1 for bits in action_bits if bits == 0)
        out[name] = {
            "gpu_hours": round(exposure_h, 2),
            "alarms": int(mine.sum()),
            "alarms_per_1000_gpu_h": _per_1000(int(mine.sum()), exposure_h),
            "alarm_kinds": dict(sorted(Counter(alarm_kinds[mine].tolist()).items())),
            "anomaly_actions": actions,
        }
    return out


def day_figures(rec: DayRecord, opts: NormalDayOptions, n_gpus: int) -> dict[str, Any]:
    """The corpus line from a recorded day."""
    kinds = np.stack(rec.kind)
    mask = np.stack(rec.mask)
    cycles, gpus = _episode_starts(kinds != "")
    episode_kind = kinds[cycles, gpus]
    episode_kinds = Counter(episode_kind.tolist())
    p_cycles, _p_gpus = _episode_starts(np.stack(rec.persistent))
    alarm_bits = _window_mask(mask, cycles, gpus)
    action_bits = [
        int(np.bitwise_or.reduce(_window_mask(mask, np.full(rows.shape, c), rows)))
        if rows.size
        else 0
        for c, rows in rec.anomaly_action_rows
    ]
    interval_h = opts.interval_s / 3600.0
    gpu_hours = kinds.shape[0] * n_gpus * interval_h
    actions = sum(rec.actions.values())
    anomaly_actions = sum(rec.anomaly_actions.values())
    return {
        "corpus": CORPUS,
        "gpus": n_gpus,
        "hours": opts.hours,
        "seed": opts.seed,
        "cycles": int(kinds.shape[0]),
        "gpu_hours": round(gpu_hours, 2),
        "alarms": int(cycles.size),
        "alarms_per_1000_gpu_h": _per_1000(cycles.size, gpu_hours),
        "alarm_kinds": dict(sorted(episode_kinds.items())),
        "flagged_gpu_cycles": int((kinds != "").sum()),
        "persistent_alarms": int(p_cycles.size),
        "actions": actions,
        "actions_per_1000_gpu_h": _per_1000(actions, gpu_hours),
        "actions_by": dict(sorted(rec.actions.items())),
        "anomaly_actions": anomaly_actions,
        "anomaly_actions_per_1000_gpu_h": _per_1000(anomaly_actions, gpu_hours),
        "anomaly_actions_by": dict(sorted(rec.anomaly_actions.items())),
        "anomaly_intents": sum(rec.anomaly_intents.values()),
        "thermal_hot_caps": rec.thermal_hot_caps,
        "by_phase": _by_phase(mask, alarm_bits, episode_kind, action_bits, interval_h),
    }


def run_normal_day(
    opts: NormalDayOptions | None = None, registry: PolicyRegistry | None = None
) -> dict[str, Any]:
    """Run the twin's normal day through the loop; returns the `twin-normal-day` corpus line:
    {"corpus", "gpu_hours", "alarms_per_1000_gpu_h", "actions_per_1000_gpu_h",
    "anomaly_actions", "by_phase": {phase: {...}}, ...}."""
    opts = opts or NormalDayOptions()
    started = time.perf_counter()
    spec = normal_day_spec(opts)
    twin = Twin(spec)
    rec = drive_day(twin, opts, registry or builtin_registry())
    out = day_figures(rec, opts, spec.n_gpus)
    out["phases"] = opts.phases.as_dict()
    out["budget_w"] = None if spec.budget is None else spec.budget.steps[0][1]
    out["policies"] = list(opts.policies)
    out["drain_on_persistent_anomaly"] = opts.drain_on_persistent_anomaly
    out["wall_s"] = round(time.perf_counter() - started, 1)
    return out

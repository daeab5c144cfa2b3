"""Replay: a recorded trace through the loop, on a virtual clock, as fast as the machine allows.

Two passes over the trace:

1. **learn**: orient (the configured Orienter) reads the trace as recorded, and a SegmentBook
   keeps what each job showed uncapped and capped (agent/replay/outcome.py); the result is the
   counterfactual's parameters, with their uncertainty. It also collects orient's anomalies and
   health findings for the report's timeline.
2. **replay**, once per policy set: the loop runs in dry-run (every intent is only recorded, as
   an advisory agent would) against the trace *as its policies would have seen it*: each step's
   snapshot shows the caps they set (recorded by a cap recorder that keeps them as the
   counterfactual's caps), the draw those caps allow and the clocks they leave. So a policy sees
   the effect of its own decisions, as it would live, and the KPIs are what those decisions would
   have done to the recorded history.

Time is the trace's own (a FakeClock set to each step); a cycle runs every `daemon.interval_s`
(the trace's step when shorter). Seconds above budget do not count the first interval after a
budget change, when no controller could have reacted (as `ooda demo` counts them).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.act.audit import AuditLog
from agent.act.executor import Actuators, RecordingCapActuator, RecordingPlacement
from agent.assembly import assemble, orienter_for
from agent.config import Config, default_config
from agent.core.clock import FakeClock
from agent.core.efficiency import tokens_per_joule
from agent.core.errors import BadInputError, ConfigError
from agent.core.intents import (
    Action,
    DrainNode,
    GpuTargets,
    Intent,
    Notify,
    Outcome,
    ReleasePowerCap,
    RequeueJob,
    ResumeNode,
    SetNodeFeatures,
    SetNodeWeight,
    SetPowerCap,
)
from agent.core.keyed import KeyedColumns
from agent.core.protocols import CapResult
from agent.core.situation import HealthSeverity, NodeStates, Situation
from agent.core.snapshot import Snapshot, screen_implausible
from agent.loop import CycleReport
from agent.observe.trace import TraceReader
from agent.orient.orienter import Orienter, cap_bounds
from agent.replay.outcome import (
    DRAWS,
    Counterfactual,
    Estimates,
    SegmentBook,
    StepOutcome,
    explain,
)
from policies.base import PolicySettings
from policies.registry import PolicyRegistry, default_registry

FloatArray = npt.NDArray[np.float64]

ACTION_KINDS = (
    "set_power_cap",
    "release_power_cap",
    "drain_node",
    "resume_node",
    "set_node_weight",
    "set_node_features",
    "requeue_job",
    "notify",
)
MAX_EVENTS = 2000  # timeline markers kept for the report (the counts are always complete)
# The learn pass orients the recorded trace about once a minute of it: curves learn from one
# observation per job and minute (hundreds over hours), and orient costs milliseconds per call.
LEARN_EVERY_S = 60.0
INTERVAL_LEVEL = 0.90


# -- policy sets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicySet:
    name: str  # as given: "power_budget+energy_efficiency", or a [policy_sets] name
    policies: tuple[str, ...]


def parse_policy_set(spec: str, config: Config, registry: PolicyRegistry) -> PolicySet:
    """A `+`-joined list of policy names, or a named set from the config's [policy_sets]."""
    text = spec.strip()
    sets = config.policy_sets
    if text in sets:
        return PolicySet(text, tuple(sets[text]))
    names = tuple(part.strip() for part in text.split("+") if part.strip())
    if not names:
        raise BadInputError(f"policy set {spec!r}: empty")
    unknown = [name for name in names if name not in registry]
    if unknown:
        known = ", ".join(registry.names())
        named = f"; named sets: {', '.join(sorted(sets))}" if sets else ""
        raise BadInputError(
            f"policy set {spec!r}: unknown policy {unknown[0]!r} (known: {known}{named})"
        )
    return PolicySet(text, names)


def default_policy_set(config: Config) -> PolicySet:
    """The policies the configuration runs (every built-in when it names none)."""
    names = tuple(name for name, s in config.policy_settings.items() if s.enabled)
    return PolicySet("+".join(names) or "none", names)


def policy_settings(
    policy_set: PolicySet, config: Config, registry: PolicyRegistry
) -> dict[str, PolicySettings]:
    """Each policy's settings: the config's where it has them, else the defaults."""
    return {
        name: config.policy_settings.get(name) or registry.get(name).Settings()
        for name in policy_set.policies
    }


# -- the replayed world's actuators (dry-run recorders that remember what was decided) ---------


class CounterfactualCaps(RecordingCapActuator):
    """Dry-run caps for replay: nothing is applied anywhere; the caps become the counterfactual's
    (the next steps show their effect). Calls are counted, not kept (a day is many cycles)."""

    def __init__(self, world: Counterfactual) -> None:
        super().__init__()
        self.world = world
        self.count = 0

    def set_caps(self, targets: GpuTargets, watts: FloatArray, lease_s: float) -> CapResult:
        self.count += 1
        before = self.world.cap_of(targets.uuid)
        self.world.set_caps(targets.uuid, np.asarray(watts, dtype=np.float64))
        return CapResult(ok=np.ones(len(targets), dtype=bool), before_w=before, errors={})

    def release_caps(self, targets: GpuTargets) -> CapResult:
        self.count += 1
        before = self.world.cap_of(targets.uuid)
        self.world.release_caps(targets.uuid)
        return CapResult(ok=np.ones(len(targets), dtype=bool), before_w=before, errors={})


class CounterfactualPlacement(RecordingPlacement):
    """Dry-run placement for replay: drains, weights and features are remembered, so the policies
    see their own decisions next cycle (a drained node shows as drained by us)."""

    standalone = True  # the node states it tells are the replayed world's, no live system's

    def __init__(self) -> None:
        super().__init__()
        self.drained: dict[str, str] = {}
        self.weights: dict[str, int] = {}
        self.features: dict[str, frozenset[str]] = {}
        self.requeued: list[str] = []

    def node_states(self, node_names: Sequence[str]) -> NodeStates:
        names = np.asarray(list(node_names), dtype=np.str_)
        n = names.shape[0]
        if not (self.drained or self.weights or self.features):
            return NodeStates(
                drained=np.zeros(n, dtype=bool),
                drained_by_us=np.zeros(n, dtype=bool),
                reason=np.full(n, "", dtype=np.str_),
                weight=np.ones(n, dtype=np.int64),
                features=(frozenset(),) * n,
                opted_out=np.zeros(n, dtype=bool),
                known=np.ones(n, dtype=bool),
            )
        drained = np.array([str(x) in self.drained for x in names], dtype=bool)
        reasons = np.array([self.drained.get(str(x), "") for x in names], dtype=np.str_)
        return NodeStates(
            drained=drained,
            drained_by_us=drained.copy(),
            reason=reasons if n else np.zeros(0, dtype=np.str_),
            weight=np.array([self.weights.get(str(x), 1) for x in names], dtype=np.int64),
            features=tuple(self.features.get(str(x), frozenset()) for x in names),
            opted_out=np.zeros(n, dtype=bool),
            known=np.ones(n, dtype=bool),
        )

    def drain(self, node: str, reason: str) -> None:
        self.drained[node] = reason

    def resume(self, node: str) -> None:
        self.drained.pop(node, None)

    def set_weight(self, node: str, weight: int) -> None:
        self.weights[node] = weight

    def set_features(self, node: str, add: frozenset[str], remove: frozenset[str]) -> None:
        self.features[node] = (self.features.get(node, frozenset()) - remove) | add

    def requeue(self, job: str) -> None:
        self.requeued.append(job)


class _NoAudit(AuditLog):
    """Replay keeps no audit trail (nothing is done; the report is the record): records are
    counted, not rendered."""

    def event(self, event: str, **fields: Any) -> None:
        self.counts[event] = self.counts.get(event, 0) + 1

    def decision(self, decision_id: str, intent: Intent, dry_run: bool, time_s: float) -> None:
        self.event("decision")

    def refusal(
        self, decision_id: str, intent: Intent, reason: str, dry_run: bool, time_s: float
    ) -> None:
        self.event("refusal")

    def action(self, action: Action) -> None:
        self.event("action")


class _Feed:
    """The loop's TelemetrySource: the step being replayed."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None

    def observe(self, now_s: float) -> Snapshot:
        assert self.snapshot is not None
        return self.snapshot


# -- results ----------------------------------------------------------------------------------


@dataclass
class Timeline:
    """Per recorded step."""

    time_s: list[float] = field(default_factory=list)
    budget_w: list[float] = field(default_factory=list)
    fleet_obs_w: list[float] = field(default_factory=list)
    fleet_cf_w: list[float] = field(default_factory=list)
    fleet_cf_lo_w: list[float] = field(default_factory=list)
    fleet_cf_hi_w: list[float] = field(default_factory=list)
    mean_cap_obs_w: list[float] = field(default_factory=list)
    mean_cap_cf_w: list[float] = field(default_factory=list)
    capped_obs: list[int] = field(default_factory=list)
    capped_cf: list[int] = field(default_factory=list)
    lowered_cf: list[int] = field(default_factory=list)
    # The caps in force (10%, median, 90% over GPUs with a known cap), recorded and replayed.
    cap_q_obs_w: list[tuple[float, float, float]] = field(default_factory=list)
    cap_q_cf_w: list[tuple[float, float, float]] = field(default_factory=list)

    def add(self, out: StepOutcome, budget: float | None) -> None:
        lo, hi = _quantiles(out.fleet_cf_draws_w, out.fleet_cf_w)
        self.time_s.append(out.time_s)
        self.budget_w.append(math.nan if budget is None else budget)
        self.fleet_obs_w.append(out.fleet_obs_w)
        self.fleet_cf_w.append(out.fleet_cf_w)
        self.fleet_cf_lo_w.append(lo)
        self.fleet_cf_hi_w.append(hi)
        self.mean_cap_obs_w.append(out.mean_cap_obs_w)
        self.mean_cap_cf_w.append(out.mean_cap_cf_w)
        self.capped_obs.append(out.capped_obs)
        self.capped_cf.append(out.capped_cf)
        self.lowered_cf.append(out.lowered_cf)
        self.cap_q_obs_w.append(out.cap_q_obs_w)
        self.cap_q_cf_w.append(out.cap_q_cf_w)


@dataclass(frozen=True)
class ActionEvent:
    time_s: float
    kind: str
    count: int  # targets
    policy: str
    target: str  # the first target (and "+N" when more)


@dataclass
class SetResult:
    """One policy set replayed over the trace."""

    policy_set: PolicySet
    kpis: dict[str, Any]
    timeline: Timeline
    events: list[ActionEvent]
    decisions: list[dict[str, Any]]
    refusals: dict[str, int]
    errors: list[str]
    cycles: int
    wall_s: float
    # Each KPI per parameter draw: the draws are shared by every set, so two sets compare draw
    # by draw (how often one beats the other: the report's confidence).
    draws: dict[str, FloatArray] = field(default_factory=dict)


@dataclass(frozen=True)
class Finding:
    """An anomaly or health finding orient made on the recorded trace (for the timeline)."""

    time_s: float
    target: str
    kind: str  # "anomaly:<kind>" or "health:<code>"


@dataclass
class Learned:
    """The learn pass's result."""

    estimates: Estimates
    findings: list[Finding]
    flagged_per_step: list[int]
    cap_changes: dict[str, int]
    wall_s: float


@dataclass
class ReplayReport:
    trace: str
    source: dict[str, Any]
    time_base: str
    step_s: float
    steps: int
    gpus: int
    start_s: float
    end_s: float
    interval_s: float
    baseline: dict[str, Any]
    sets: list[SetResult]
    learned: Learned
    notes: list[str]
    wall_s: float

    def set_json(self, result: SetResult) -> dict[str, Any]:
        return {"policies": list(result.policy_set.policies), **result.kpis}

    def to_json(self) -> dict[str, Any]:
        """The first set's KPIs at the top, every set under `compare`."""
        first = self.sets[0]
        out: dict[str, Any] = {
            "trace": self.trace,
            "policy_set": first.policy_set.name,
            **self.set_json(first),
            "baseline": self.baseline,
            "compare": [{"set": s.policy_set.name, **self.set_json(s)} for s in self.sets],
            "steps": self.steps,
            "gpus": self.gpus,
            "duration_s": self.end_s - self.start_s + self.step_s if self.steps else 0.0,
            "interval_s": self.interval_s,
            "assumptions": ASSUMPTIONS,
            "notes": self.notes,
            "estimates": self.learned.estimates.summary,
            "speed_sim_s_per_wall_s": round(self.sim_speed(), 1),
            "wall_s": round(self.wall_s, 3),
        }
        return out

    def sim_speed(self) -> float:
        span = (self.end_s - self.start_s + self.step_s) if self.steps else 0.0
        return span / self.wall_s if self.wall_s > 0 else math.inf


ASSUMPTIONS = (
    "the schedule is held as recorded: a job that would have finished earlier leaves its GPU "
    "idle until the trace's next job there; a slowed job is not carried past its recorded end "
    "(its unfinished work counts as lost throughput, its extra energy is not counted)",
    "drains, weights, features and requeues are counted, their effect on placement is not "
    "estimated",
    "caps start as recorded at each GPU's first step; from then on only the replayed policies "
    "change them",
    "throughput proxy: SM clock / the job's uncapped clock x utilization / its uncapped level",
    "seconds above budget do not count the first control interval after a budget change",
)


# -- the passes ---------------------------------------------------------------------------------

Progress = Callable[[int], None]


def _snapshots(reader: TraceReader) -> Iterator[Snapshot]:
    """Every step as the live loop would believe it: a trace keeps what the exporters said,
    and one absurd sample (a 1 MW reading) must not become a replayed kilowatt-hour."""
    return (screen_implausible(snapshot) for snapshot in reader.snapshots())


def _dt(reader: TraceReader) -> FloatArray:
    times = reader.meta.time_s
    if times.size == 0:
        return np.zeros(0)
    return np.diff(np.append(times, times[-1] + reader.meta.step_s))


def lean_orient(config: Config, forecasts: bool = False) -> Config:
    """The config with orient lean for replay: no forecasts unless `forecasts` (no built-in
    policy reads them, and keeping them is a large share of orient's time), the slow models
    (anomalies, curves) every 2 minutes of trace at 15 s steps."""
    if forecasts:
        return config
    orient = config.orient.model_copy(
        update={
            "forecast": config.orient.forecast.model_copy(update={"enabled": False}),
            "slow_models_every_cycles": max(config.orient.slow_models_every_cycles, 8),
        }
    )
    lean = config.model_copy(update={"orient": orient})
    lean.policy_settings = config.policy_settings
    return lean


def replay_orienter(config: Config, forecasts: bool = False) -> Orienter:
    """The configured Orienter, lean for replay (`lean_orient`)."""
    return orienter_for(lean_orient(config, forecasts))


def replay_config(
    config: Config,
    policy_set: PolicySet,
    registry: PolicyRegistry,
    interval_s: float,
    forecasts: bool = False,
) -> Config:
    """The agent a policy set is replayed with: the configuration, lean orient, advice only,
    a cycle every `interval_s`, the set's policies with their settings."""
    lean = lean_orient(config, forecasts)
    replayed = lean.model_copy(
        update={
            "dry_run": True,
            "daemon": lean.daemon.model_copy(update={"interval_s": interval_s}),
        }
    )
    replayed.policy_settings = policy_settings(policy_set, config, registry)
    return replayed


def learn(
    reader: TraceReader,
    config: Config,
    *,
    draws: int = DRAWS,
    seed: int = 0,
    progress: Progress | None = None,
    every_s: float = LEARN_EVERY_S,
) -> Learned:
    """Pass 1: the segment book over every step of the trace as recorded, and orient over a step
    every `every_s` (its curves, health and anomalies)."""
    t0 = time.perf_counter()
    orienter = replay_orienter(config)
    stride = max(1, round(every_s / reader.meta.step_s))
    book = SegmentBook()
    findings: list[Finding] = []
    flagged_per_step: list[int] = []
    caps_seen = _CapChanges()
    prev_flag: set[str] = set()
    prev_health: set[str] = set()
    dts = _dt(reader)
    flagged = 0
    for j, snap in enumerate(_snapshots(reader)):
        situation = None
        if j % stride == 0:
            budget = config.cluster.budget_w
            situation = orienter.orient(snap, snap.budget_w if budget is None else budget)
            flagged, prev_flag, prev_health = _findings(situation, prev_flag, prev_health, findings)
        book.learn(snap, situation, float(dts[j]))
        caps_seen.update(snap)
        flagged_per_step.append(flagged)
        if progress is not None:
            progress(1)
    return Learned(
        estimates=book.estimates(draws, seed),
        findings=findings,
        flagged_per_step=flagged_per_step,
        cap_changes=caps_seen.counts(),
        wall_s=time.perf_counter() - t0,
    )


class _CapChanges:
    """Cap changes visible in the trace (the recorded settings' actions)."""

    def __init__(self) -> None:
        self.caps = KeyedColumns({"cap_w": (np.float64, np.nan)})
        self.lowered = 0
        self.released = 0

    def update(self, snap: Snapshot) -> None:
        limit, _mn, _mx, default = cap_bounds(snap)
        ok = np.isfinite(limit) & snap.fresh
        if not ok.any():
            return
        slot = self.caps.slots(snap.uuid[ok])
        before = self.caps["cap_w"][slot]
        now = limit[ok]
        changed = np.isfinite(before) & (np.abs(now - before) >= 0.5)
        back = changed & (np.abs(now - default[ok]) < 0.5)
        self.released += int(back.sum())
        self.lowered += int((changed & ~back).sum())
        self.caps["cap_w"][slot] = now

    def counts(self) -> dict[str, int]:
        return {"set_power_cap": self.lowered, "release_power_cap": self.released}


def _findings(
    situation: Situation,
    prev_flag: set[str],
    prev_health: set[str],
    out: list[Finding],
) -> tuple[int, set[str], set[str]]:
    """New anomaly flags and health findings this step (for the timeline)."""
    snap = situation.snapshot
    flagged = 0
    now_flag: set[str] = set()
    now_health: set[str] = set()
    anomalies = situation.anomalies
    if anomalies is not None and anomalies.flagged.shape == (snap.n_gpus,):
        rows = np.flatnonzero(anomalies.flagged)
        flagged = int(rows.size)
        for row in rows[:200].tolist():
            key = f"{snap.uuid[row]}|{anomalies.kind[row]}"
            now_flag.add(key)
            if key not in prev_flag and len(out) < MAX_EVENTS:
                out.append(Finding(snap.time_s, snap.target(row), f"anomaly:{anomalies.kind[row]}"))
    health = situation.health
    if health is not None and health.severity.shape == (snap.n_gpus,):
        rows = np.flatnonzero(health.severity > int(HealthSeverity.OK))
        for row in rows[:200].tolist():
            key = f"{snap.uuid[row]}|{health.code[row]}"
            now_health.add(key)
            if key not in prev_health and len(out) < MAX_EVENTS:
                out.append(Finding(snap.time_s, snap.target(row), f"health:{health.code[row]}"))
    return flagged, now_flag, now_health


def replay_set(
    reader: TraceReader,
    config: Config,
    policy_set: PolicySet,
    learned: Learned,
    *,
    registry: PolicyRegistry,
    interval_s: float,
    keep_decisions: bool = False,
    progress: Progress | None = None,
    forecasts: bool = False,
) -> SetResult:
    """Pass 2: the loop, in dry-run, over the trace as `policy_set` would have seen it."""
    t0 = time.perf_counter()
    holders = budget_holders(policy_set, registry)
    world = Counterfactual(
        learned.estimates,
        overhead_per_node_w=config.cluster.node_overhead_w,
        holds_budget=bool(holders),
    )
    placement = CounterfactualPlacement()
    clock = FakeClock(float(reader.meta.time_s[0]) if reader.meta.steps else 0.0)
    feed = _Feed()
    agent = assemble(
        replay_config(config, policy_set, registry, interval_s, forecasts),
        registry=registry,
        clock=clock,
        audit=_NoAudit(),
        source=feed,
        actuators=Actuators(recorded_caps=CounterfactualCaps(world), recorded_placement=placement),
        advisory="replay",
        standalone=True,
    )
    loop = agent.loop
    timeline = Timeline()
    events: list[ActionEvent] = []
    decisions: list[dict[str, Any]] = []
    refusals: Counter[str] = Counter()
    actions: Counter[str] = Counter()
    errors: list[str] = []
    dts = _dt(reader)
    totals = _Totals(learned.estimates.draws)
    next_cycle = -math.inf
    cycles = 0
    prev_budget: float | None = None
    # Not counted: the first step (no replayed decision has acted yet) and, after a budget
    # change, the steps up to one interval later (no controller could have reacted).
    grace_until = float(reader.meta.time_s[0])
    for j, snap in enumerate(_snapshots(reader)):
        dt = float(dts[j])
        budget = config.cluster.budget_w if config.cluster.budget_w is not None else snap.budget_w
        view, out = world.step(snap, dt, budget)
        if prev_budget is not None and budget is not None and budget != prev_budget and j:
            grace_until = snap.time_s + interval_s
        prev_budget = budget if budget is not None else prev_budget
        totals.add(out, dt, budget if snap.time_s > grace_until + 1e-6 else None)
        timeline.add(out, budget)
        if snap.time_s >= next_cycle - 1e-9:
            clock.set(snap.time_s)
            feed.snapshot = view
            report = loop.cycle()
            world.held_budget(_planned_caps(report, holders))
            cycles += 1
            next_cycle = (
                snap.time_s + interval_s
                if next_cycle + interval_s <= snap.time_s
                else next_cycle + interval_s
            )
            _collect(report, actions, events, decisions if keep_decisions else None, refusals)
            for error in report.errors:
                if len(errors) < 20 and error not in errors:
                    errors.append(error)
        if progress is not None:
            progress(1)
    kpis = totals.kpis({kind: actions.get(kind, 0) for kind in ACTION_KINDS}, cycles)
    lost_s, lost_j = world.unfinished()
    kpis["unfinished"] = {
        "work_ratio": _round(lost_s / totals.work_obs, 4) if totals.work_obs > 0 else None,
        "energy_kwh": round(lost_j / 3.6e6, 3),
    }
    kpis["notes"] = explain(world.tally, kpis, bool(holders))
    # The baseline's KPIs come out of the same pass (identical for every set).
    kpis["_baseline"] = totals.baseline(learned.cap_changes)
    return SetResult(
        policy_set=policy_set,
        kpis=kpis,
        timeline=timeline,
        events=events,
        decisions=decisions,
        refusals=dict(refusals),
        errors=errors,
        cycles=cycles,
        wall_s=time.perf_counter() - t0,
        draws=totals.by_kpi(),
    )


@dataclass
class TokenTotals:
    """Application tokens and the energy of the GPUs that made them (agent.core.efficiency),
    summed over the steps: as recorded and under the replayed caps."""

    tokens_obs: float = 0.0
    energy_obs_j: float = 0.0
    tokens_cf: float = 0.0
    energy_cf_j: float = 0.0
    seconds: float = 0.0  # the trace's seconds with tokens reported

    def add(self, out: StepOutcome, dt: float) -> None:
        if out.tokens_obs_w <= 0 and out.tokens_cf_w <= 0:
            return
        self.tokens_obs += out.tokens_obs * dt
        self.energy_obs_j += out.tokens_obs_w * dt
        self.tokens_cf += out.tokens_cf * dt
        self.energy_cf_j += out.tokens_cf_w * dt
        self.seconds += dt

    def kpis(self, counterfactual: bool) -> dict[str, float | None]:
        """Tokens per joule, tokens a second (over the seconds they were reported) and the
        serving GPUs' energy; None (unknown, never 0) where no GPU reported tokens."""
        tokens, energy_j = (
            (self.tokens_cf, self.energy_cf_j)
            if counterfactual
            else (self.tokens_obs, self.energy_obs_j)
        )
        known = self.seconds > 0
        return {
            "tokens_per_joule": _round(float(tokens_per_joule(tokens, energy_j)), 4),
            "tokens_per_s": round(tokens / self.seconds, 1) if known else None,
            "tokens_energy_kwh": round(energy_j / 3.6e6, 3) if known else None,
        }


@dataclass
class _Totals:
    """A replayed set's sums over the steps: its counterfactual (point, and per parameter draw)
    and the recording, from which its KPIs come."""

    draws: int
    energy_j: float = 0.0
    energy_obs_j: float = 0.0
    work_obs: float = 0.0
    work_cf: float = 0.0
    over_s: float = 0.0
    over_obs_s: float = 0.0
    tokens: TokenTotals = field(default_factory=TokenTotals)
    energy_draws_j: FloatArray = field(init=False)
    work_draws: FloatArray = field(init=False)
    over_draws_s: FloatArray = field(init=False)

    def __post_init__(self) -> None:
        self.energy_draws_j = np.zeros(self.draws)
        self.work_draws = np.zeros(self.draws)
        self.over_draws_s = np.zeros(self.draws)

    def add(self, out: StepOutcome, dt: float, counted_budget: float | None) -> None:
        """One step of `dt` seconds; `counted_budget`: the budget, where this step counts."""
        self.energy_j += out.fleet_cf_w * dt
        self.energy_draws_j += out.fleet_cf_draws_w * dt
        self.energy_obs_j += out.fleet_obs_w * dt
        self.work_obs += out.work_obs * dt
        self.work_cf += out.work_cf * dt
        self.work_draws += out.work_cf_draws * dt
        self.tokens.add(out, dt)
        if counted_budget is not None:
            self.over_s += dt * (out.fleet_cf_w > counted_budget)
            self.over_obs_s += dt * (out.fleet_obs_w > counted_budget)
            self.over_draws_s += dt * (out.fleet_cf_draws_w > counted_budget)

    def ratio(self) -> float:
        return self.work_cf / self.work_obs if self.work_obs > 0 else math.nan

    def by_kpi(self) -> dict[str, FloatArray]:
        """Each KPI per parameter draw."""
        ratio = (
            self.work_draws / self.work_obs
            if self.work_obs > 0
            else np.full_like(self.work_draws, math.nan)
        )
        return {
            "energy_kwh": self.energy_draws_j / 3.6e6,
            "throughput_ratio": np.asarray(ratio, dtype=np.float64),
            "budget_violation_s": self.over_draws_s,
        }

    def kpis(self, counts: dict[str, int], cycles: int) -> dict[str, Any]:
        draws = self.by_kpi()
        return {
            "energy_kwh": round(self.energy_j / 3.6e6, 3),
            "throughput_ratio": _round(self.ratio(), 4),
            "budget_violation_s": round(self.over_s, 1),
            "actions": counts,
            "drains": counts["drain_node"],
            "interval": {
                "level": INTERVAL_LEVEL,
                "energy_kwh": _interval(draws["energy_kwh"], self.energy_j / 3.6e6, 3),
                "throughput_ratio": _interval(draws["throughput_ratio"], self.ratio(), 4),
                "budget_violation_s": _interval(draws["budget_violation_s"], self.over_s, 1),
            },
            "energy_vs_baseline": _round(self.energy_j / self.energy_obs_j, 4)
            if self.energy_obs_j > 0
            else None,
            "cycles": cycles,
            **self.tokens.kpis(counterfactual=True),
        }

    def baseline(self, cap_changes: dict[str, int]) -> dict[str, Any]:
        """The recording's KPIs (for the baseline, `actions` are the cap changes it shows)."""
        return {
            "energy_kwh": round(self.energy_obs_j / 3.6e6, 3),
            "throughput_ratio": 1.0,
            "budget_violation_s": round(self.over_obs_s, 1),
            "actions": {kind: cap_changes.get(kind, 0) for kind in ACTION_KINDS},
            "drains": 0,
            "work_gpu_s": round(self.work_obs, 1),
            **self.tokens.kpis(counterfactual=False),
        }


def budget_holders(policy_set: PolicySet, registry: PolicyRegistry) -> set[str]:
    """The set's policies that hold the budget (re-plan caps to it from the fleet's draw)."""
    return {
        name
        for name in policy_set.policies
        if name in registry and getattr(registry.get(name), "holds_budget", False)
    }


def _planned_caps(report: CycleReport, holders: set[str]) -> bool:
    """Did a budget holder plan caps this cycle (kept, or overridden by a lower cap)?"""
    if not holders:
        return False
    intents = [*report.intents, *(o.intent for o in report.overridden)]
    return any(isinstance(i, SetPowerCap) and i.policy in holders for i in intents)


def _round(value: float, digits: int) -> float | None:
    return round(value, digits) if math.isfinite(value) else None


def _quantiles(draws: FloatArray, point: float) -> tuple[float, float]:
    if draws.size == 0 or not np.isfinite(draws).any():
        return point, point
    lo, hi = np.nanquantile(draws, [0.05, 0.95])
    return float(min(lo, point)), float(max(hi, point))


def _interval(draws: FloatArray, point: float, digits: int) -> list[float | None]:
    if not math.isfinite(point):
        return [None, None]
    lo, hi = _quantiles(np.asarray(draws, dtype=np.float64), point)
    return [round(lo, digits), round(hi, digits)]


def _collect(
    report: CycleReport,
    actions: Counter[str],
    events: list[ActionEvent],
    decisions: list[dict[str, Any]] | None,
    refusals: Counter[str],
) -> None:
    for action in report.actions:
        if action.outcome not in (Outcome.APPLIED, Outcome.RECORDED):
            continue
        intent = action.intent
        count = len(intent.targets) if isinstance(intent, SetPowerCap | ReleasePowerCap) else 1
        kind = str(intent.kind)
        actions[kind] += count
        if len(events) < MAX_EVENTS:
            first = intent.target_name()
            events.append(
                ActionEvent(
                    report.time_s,
                    kind,
                    count,
                    intent.policy,
                    first if count == 1 else f"{first} +{count - 1}",
                )
            )
        if decisions is not None:
            decisions.extend(decision_records(action, report.time_s))
    for refusal in report.refused:
        intent = refusal.intent
        count = len(intent.targets) if isinstance(intent, SetPowerCap | ReleasePowerCap) else 1
        refusals[refusal.reason] += count


def decision_records(action: Action, time_s: float) -> list[dict[str, Any]]:
    """Compact per-target records of an applied or recorded action: time, kind, target, policy,
    the kind's value (watts rounded to 1 W) and the outcome."""
    intent = action.intent
    base = {"t_s": round(time_s), "kind": str(intent.kind), "policy": intent.policy}
    outcome = str(action.outcome)
    if isinstance(intent, SetPowerCap):
        return [
            {**base, "target": name, "value": round(float(w)), "outcome": outcome}
            for name, w in zip(intent.targets.names(), intent.watts.tolist(), strict=True)
        ]
    if isinstance(intent, ReleasePowerCap):
        return [
            {**base, "target": name, "value": None, "outcome": outcome}
            for name in intent.targets.names()
        ]
    value: Any = None
    if isinstance(intent, SetNodeWeight):
        value = intent.weight
    elif isinstance(intent, RequeueJob):
        value = intent.job
    elif isinstance(intent, SetNodeFeatures):
        value = {"add": sorted(intent.add), "remove": sorted(intent.remove)}
    elif isinstance(intent, DrainNode | ResumeNode | Notify):
        value = None
    return [{**base, "target": intent.target_name(), "value": value, "outcome": outcome}]


# -- the whole replay ---------------------------------------------------------------------------


def replay_trace(
    trace: Path | TraceReader,
    *,
    config: Config | None = None,
    policy_sets: Sequence[PolicySet] | None = None,
    registry: PolicyRegistry | None = None,
    draws: int = DRAWS,
    seed: int = 0,
    keep_decisions: bool = False,
    progress: Progress | None = None,
    budget_w: float | None = None,
    overhead_per_node_w: float | None = None,
    forecasts: bool = False,
    workers: int | None = None,
) -> ReplayReport:
    """Replay `trace` through each policy set (default: the configuration's policies). The sets
    are independent of each other: up to `workers` of them (default: one per CPU) replay at
    once, each in its own process."""
    t0 = time.perf_counter()
    registry = registry or default_registry()
    config = config or default_config(registry)
    reader = trace if isinstance(trace, TraceReader) else TraceReader(Path(trace))
    meta = reader.meta
    if meta.steps == 0:
        raise BadInputError(f"trace {reader.path}: holds no steps")
    config = _with_trace_defaults(config, meta.scenario, budget_w, overhead_per_node_w)
    sets = list(policy_sets) if policy_sets else [default_policy_set(config)]
    interval = max(config.daemon.interval_s, meta.step_s)
    learned = learn(reader, config, draws=draws, seed=seed, progress=progress)
    options: dict[str, Any] = {
        "registry": registry,
        "interval_s": interval,
        "keep_decisions": keep_decisions,
        "forecasts": forecasts,
    }
    results = _replay_sets(reader, config, sets, learned, options, progress, workers)
    baseline = results[0].kpis["_baseline"]
    for r in results:
        r.kpis.pop("_baseline", None)
    notes = list(learned.estimates.notes)
    for r in results:
        notes.extend(f"{r.policy_set.name}: {note}" for note in r.kpis["notes"])
    if not baseline["work_gpu_s"]:
        notes.append(
            "the trace shows no busy GPU with an SM clock and utilization: throughput cannot be "
            "estimated (throughput_ratio is null)"
        )
    if config.cluster.budget_w is None and not np.isfinite(meta.budget_w).any():
        notes.append("the trace holds no budget and none is configured: nothing is above budget")
    return ReplayReport(
        trace=str(reader.path),
        source=dict(meta.source),
        time_base=meta.time_base,
        step_s=meta.step_s,
        steps=meta.steps,
        gpus=int(meta.gpus.max()) if meta.steps else 0,
        start_s=float(meta.time_s[0]),
        end_s=float(meta.time_s[-1]),
        interval_s=interval,
        baseline=baseline,
        sets=results,
        learned=learned,
        notes=notes,
        wall_s=time.perf_counter() - t0,
    )


# What the processes replaying the sets share, set before they are forked (nothing to pickle:
# a forked process has it already; only each set's result comes back).
_SHARED: dict[str, Any] = {}


def _replay_sets(
    reader: TraceReader,
    config: Config,
    sets: Sequence[PolicySet],
    learned: Learned,
    options: dict[str, Any],
    progress: Progress | None,
    workers: int | None,
) -> list[SetResult]:
    """Pass 2 for every set: one after the other, or in parallel processes (forked, each
    reading the trace itself) where there are several sets and CPUs."""
    n = min(len(sets), workers if workers is not None else (os.cpu_count() or 1))
    if n <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [replay_set(reader, config, s, learned, progress=progress, **options) for s in sets]
    _SHARED.update(path=reader.path, config=config, sets=list(sets), learned=learned, **options)
    try:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=n, mp_context=context) as pool:
            running = [pool.submit(_replay_shared_set, k) for k in range(len(sets))]
            for done in as_completed(running):
                done.result()  # (a failure raises here)
                if progress is not None:
                    progress(reader.meta.steps)
            return [r.result() for r in running]
    finally:
        _SHARED.clear()


def _replay_shared_set(k: int) -> SetResult:
    """In a forked process: the `k`th set of `_SHARED`, over its own reader of the trace."""
    shared = dict(_SHARED)
    reader = TraceReader(shared.pop("path"))
    config, sets, learned = shared.pop("config"), shared.pop("sets"), shared.pop("learned")
    return replay_set(reader, config, sets[k], learned, **shared)


def _with_trace_defaults(
    config: Config,
    scenario: Mapping[str, Any] | None,
    budget_w: float | None,
    overhead_per_node_w: float | None,
) -> Config:
    """A twin trace says its node overhead; an explicit budget or overhead wins over both."""
    cluster = config.cluster
    changes: dict[str, Any] = {}
    if budget_w is not None:
        if budget_w <= 0:
            raise ConfigError(f"budget: must be positive watts (got {budget_w})")
        changes["budget_w"] = budget_w
    if overhead_per_node_w is not None:
        changes["node_overhead_w"] = overhead_per_node_w
    elif "node_overhead_w" not in cluster.model_fields_set and scenario:
        overhead = scenario.get("node_overhead_w")
        if isinstance(overhead, int | float) and overhead > 0:
            changes["node_overhead_w"] = float(overhead)
    if not changes:
        return config
    new = config.model_copy(update={"cluster": cluster.model_copy(update=changes)})
    new.policy_settings = config.policy_settings
    return new

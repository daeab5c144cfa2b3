"""Orient: a Snapshot becomes a Situation: headroom, who is busy, each GPU's learned power
curve, its health class, anomalies with their evidence, and power/temperature forecasts.

Pure computation over numpy arrays (and scikit-learn models refit on a schedule); the state it
keeps between cycles lives in its models and is explicit: `to_dict()` gives it as JSON-ready
data, `load_dict()` restores it.

Order within a cycle: the natural draws and health first (they explain what follows), then the
anomaly detectors score the new snapshot against what was learned before it, then the curves
learn from whatever was not flagged, then the forecasts.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.core.gpu_models import BUILTIN_MODELS
from agent.core.keyed import LastKeys, freeze
from agent.core.situation import (
    AnomalyFlags,
    CurveEstimates,
    HealthSeverity,
    HealthStatus,
    NodeStates,
    PowerForecast,
    Situation,
)
from agent.core.snapshot import Metric, Snapshot
from agent.core.text import small_ints
from agent.core.throughput import throughput_view
from agent.orient.anomaly import AnomalyContext, AnomalyDetector, typical_interval
from agent.orient.arrivals import ArrivalTracker
from agent.orient.curvefit import CurveLearner, CurveView
from agent.orient.forecast import PanelForecaster, clearly_better
from agent.orient.groups import GroupSpec, group_masks, job_priorities
from agent.orient.health import HealthClassifier
from agent.orient.idle import IdleTracker
from agent.orient.natural import NaturalDraw, NaturalDrawTracker
from agent.orient.settings import OrientSettings
from agent.orient.stats import Grouper, json_safe

FloatArray = npt.NDArray[np.float64]
StrArray = npt.NDArray[np.str_]
STATE_VERSION = 1


DEFAULT_REL_SPREAD = 0.03  # relative spread of a GPU's draw before any is measured


@dataclass(frozen=True, slots=True)
class CurvePrior:
    """What the agent assumes about a job it knows nothing about yet.

    Conservative by default: the most cap-sensitive curve measured in the Zeus sweeps (BERT,
    a=1.13, b=1.65), a natural draw of 90% of the maximum limit, and a capped GPU drawing its
    whole cap (so the budget holds whatever the job really does).
    """

    a: float = 1.13
    b: float = 1.65
    natural_frac: float = 0.90
    cap_draw_frac: float = 1.0


def cap_bounds(snapshot: Snapshot) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """(current, min, max, default) limit per GPU: from telemetry, else from the model table."""
    current = _pick(snapshot, Metric.POWER_LIMIT_W, _pick(snapshot, Metric.ENFORCED_LIMIT_W, None))
    if all(snapshot.column(m)[1].all() for m in _CONSTRAINTS):  # the usual case: no table
        lo, hi, default = (_pick(snapshot, m, None) for m in _CONSTRAINTS)
    else:
        table = _MODEL_TABLE.columns(snapshot.model)
        lo, hi, default = (_pick(snapshot, m, t) for m, t in zip(_CONSTRAINTS, table, strict=True))
    return current, lo, hi, default


class _ModelTable:
    """Per GPU, the (min, max, default) limit of its model in the built-in table (NaN where the
    model is unknown), for the last fleet asked about: the same models cycle after cycle, known
    by identity when frozen (`LastKeys`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models = LastKeys()
        self._columns: tuple[FloatArray, FloatArray, FloatArray] | None = None

    def columns(self, model: StrArray) -> tuple[FloatArray, FloatArray, FloatArray]:
        with self._lock:
            if self._columns is not None and self._models.same(model):
                return self._columns
            n = model.shape[0]
            table = {m.model_name: m for m in BUILTIN_MODELS.values()}
            lo, hi, default = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
            for name in np.unique(model):
                spec = table.get(str(name))
                if spec is not None:
                    rows = model == name
                    lo[rows], hi[rows], default[rows] = (
                        spec.min_cap_w,
                        spec.max_cap_w,
                        spec.default_cap_w,
                    )
            self._models.remember(model)
            self._columns = (freeze(lo), freeze(hi), freeze(default))
            return self._columns


_MODEL_TABLE = _ModelTable()


_CONSTRAINTS = (Metric.MIN_LIMIT_W, Metric.MAX_LIMIT_W, Metric.DEFAULT_LIMIT_W)


def _pick(snapshot: Snapshot, metric: Metric, fallback: FloatArray | None) -> FloatArray:
    """The metric where reported, else `fallback` (NaN where there is none); a new array."""
    values, ok = snapshot.column(metric)
    if ok.all():
        return values.copy()  # the caller's to keep: not the snapshot's own column
    return np.where(ok, values, np.nan if fallback is None else fallback)


class Orienter:
    def __init__(
        self,
        node_overhead_w: float = 0.0,
        prior: CurvePrior | None = None,
        natural: NaturalDrawTracker | None = None,
        settings: OrientSettings | None = None,
        seed: int = 0,
        groups: tuple[GroupSpec, ...] = (),
        group_label: str | None = None,
        label_budgets_w: dict[str, float] | None = None,
        job_priority: dict[str, int] | None = None,
    ) -> None:
        self.node_overhead_w = node_overhead_w
        self.groups = groups
        self.group_label = group_label
        self.label_budgets_w = label_budgets_w or {}
        self.job_priority = job_priority or {}
        self._priority_labels = Grouper()
        self.prior = prior or CurvePrior()
        self.natural = natural or NaturalDrawTracker()
        self.idle = IdleTracker()
        self.arrivals = ArrivalTracker()
        self.settings = s = settings or OrientSettings()
        self.health = HealthClassifier(s.health.watch_hold_s, s.health.restart_hold_s)
        self.anomaly = AnomalyDetector(s.anomaly, seed=seed)
        self.curves = CurveLearner(
            s.curves, prior_a=self.prior.a, prior_b=self.prior.b, warmup_s=self.natural.warmup_s
        )
        fc = s.forecast

        def panel(n_exog: int, panel_seed: int) -> PanelForecaster:
            return PanelForecaster(
                horizons_s=fc.horizons_s,
                coverage=fc.coverage,
                refit_cycles=fc.refit_cycles,
                min_train_rows=fc.min_train_rows,
                train_rows=fc.train_rows,
                series_per_cycle=fc.nodes_per_cycle,
                n_exog=n_exog,
                seed=panel_seed,
                model=fc.model,
            )

        self.node_power = panel(6, seed)
        self.node_temp = panel(1, seed + 100)
        self.fleet = FleetScore(len(fc.horizons_s), fc.coverage)
        self.interval_s: float | None = None
        self.last_time_s: float | None = None
        self.cycles = 0
        # The slow models' last findings, and the GPUs (UUIDs in row order) they are about.
        self._slow_cache: tuple[AnomalyFlags, CurveView] | None = None
        self._slow_uuids = LastKeys()

    # -- state ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Everything learned, as strict-JSON-ready data (NaN as null)."""
        data = {
            "version": STATE_VERSION,
            "interval_s": self.interval_s,
            "last_time_s": self.last_time_s,
            "cycles": self.cycles,
            "natural": self.natural.to_dict(),
            "health": self.health.to_dict(),
            "anomaly": self.anomaly.to_dict(),
            "curves": self.curves.to_dict(),
            "node_power": self.node_power.to_dict(),
            "node_temp": self.node_temp.to_dict(),
            "fleet": self.fleet.to_dict(),
            "idle": self.idle.state.to_dict(),
            "arrivals": self.arrivals.to_dict(),
        }
        out = json_safe(data)
        assert isinstance(out, dict)
        return out

    def load_dict(self, data: Mapping[str, Any]) -> None:
        if "version" not in data:  # a state saved before the orient models: what it holds
            if "natural" in data:
                self.natural.state.load_dict(data["natural"])
            if "idle" in data:
                self.idle.state.load_dict(data["idle"])
            if "arrivals" in data:
                self.arrivals.load_dict(data["arrivals"])
            return
        version = data.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"orient state version {version!r} (this agent reads {STATE_VERSION})")
        self.interval_s = _opt_float(data.get("interval_s"))
        self.last_time_s = _opt_float(data.get("last_time_s"))
        self.cycles = int(data.get("cycles", 0))
        self.natural.load_dict(data["natural"])
        self.health.load_dict(data["health"])
        self.anomaly.load_dict(data["anomaly"])
        self.curves.load_dict(data["curves"])
        self.node_power.load_dict(data["node_power"])
        self.node_temp.load_dict(data["node_temp"])
        self.fleet.load_dict(data["fleet"])
        self.idle.state.load_dict(data.get("idle", {}))
        if "arrivals" in data:
            self.arrivals.load_dict(data["arrivals"])

    # -- one cycle --------------------------------------------------------------------------------

    def _priority_from_labels(self, snapshot: Snapshot) -> npt.NDArray[np.int64]:
        """The `priority` label (an integer class) where telemetry carries one, else 0 (each
        distinct label parsed once)."""
        label = snapshot.labels.get("priority")
        if label is None:
            return np.zeros(snapshot.n_gpus, dtype=np.int64)
        ids, names = self._priority_labels.ids(label)
        classes, _ = small_ints(names)  # a class is a small integer: other text reads as 0
        return classes[ids]

    def orient(
        self,
        snapshot: Snapshot,
        budget_w: float | None,
        nodes: NodeStates | None = None,
        priority: npt.NDArray[np.int64] | None = None,
    ) -> Situation:
        n = snapshot.n_gpus
        self.cycles += 1
        if self.last_time_s is not None and snapshot.time_s > self.last_time_s:
            self.interval_s = typical_interval(self.interval_s, snapshot.time_s - self.last_time_s)
        self.last_time_s = snapshot.time_s
        cap, min_cap, max_cap, default_cap = cap_bounds(snapshot)
        draw = self.natural.update(snapshot)
        prior_natural = self.prior.natural_frac * max_cap
        natural = np.where(draw.uncertain, np.fmax(draw.mean_w, prior_natural), draw.mean_w)
        natural = np.where(
            draw.busy, np.fmin(natural, np.where(np.isnan(max_cap), natural, max_cap)), np.nan
        )
        # Every busy GPU's draw fluctuates, capped or not: where a GPU's own spread is unknown,
        # use the fleet's typical relative spread (the budget keeps a fleet-level margin on it).
        known_spread = draw.busy & ~draw.uncertain & (draw.std_w > 0) & (draw.mean_w > 0)
        rel = draw.std_w[known_spread] / draw.mean_w[known_spread]
        typical = float(np.median(rel)) if rel.size else DEFAULT_REL_SPREAD
        std = np.where(known_spread, draw.std_w, typical * natural)
        natural_hi = natural + 2.0 * std
        # Learned where seen capped, else the prior (noise is the budget's fleet margin). The
        # prior of 1.0 is safe for budgets only: policies that bound a slowdown read it as not
        # learned (agent.core.curves.slowdown_cap_draw_frac).
        cap_draw_frac = np.where(
            np.isfinite(draw.cap_draw_frac),
            np.minimum(draw.cap_draw_frac, 1.0),
            self.prior.cap_draw_frac,
        )
        health = self.health.update(snapshot)
        natural_known = draw.busy & ~draw.uncertain & np.isfinite(draw.mean_w)
        anomalies, learned = self._slow_models(snapshot, draw, natural_known, cap, max_cap, health)
        level_w = self.anomaly.uncapped_level_w
        curve_natural = (
            np.where(np.isfinite(level_w), level_w, draw.mean_w)
            if level_w.shape == (n,)
            else draw.mean_w
        )
        use = self.settings.curves.apply
        curves = CurveEstimates(
            natural_w=natural,
            a=learned.a if use else np.full(n, self.prior.a),
            b=learned.b if use else np.full(n, self.prior.b),
            cap_draw_frac=cap_draw_frac,
            confidence=np.where(draw.busy, learned.confidence, 0.0),
            source=np.where(draw.busy, learned.source, "prior").astype(np.str_),
            natural_w_hi=natural_hi,
            natural_clock_mhz=learned.natural_clock_mhz,
            natural_known=natural_known,
            curve_natural_w=np.where(
                natural_known & np.isfinite(curve_natural), curve_natural, natural
            ),
        )
        power, power_ok = snapshot.column(Metric.POWER_W)
        fresh_power = power_ok & snapshot.fresh
        overhead = self.node_overhead_w * snapshot.n_nodes
        fleet = float(power[fresh_power].sum()) + overhead
        # What each GPU draws on average right now, as far as the models know: the noise-free
        # level the forecasts start from (a sample is level + noise), and where warming jobs go.
        expected = self.anomaly.expected_power_w
        level = np.where(np.isfinite(expected), expected, power)
        target = np.where(
            draw.busy & draw.uncertain,
            np.fmin(natural, cap_draw_frac * np.where(np.isfinite(cap), cap, np.inf)),
            level,
        )
        forecast = (
            self._forecast(
                snapshot,
                fleet,
                draw.busy,
                draw.uncertain,
                cap,
                max_cap,
                level,
                target,
                draw.busy_for_s,
            )
            if self.settings.forecast.enabled
            else None
        )
        notes: list[str] = []
        n_stale = int(snapshot.stale.sum())
        if n_stale:
            notes.append(
                f"{n_stale} GPUs stale: no actions on them, their power is not in fleet_power_w"
            )
        notes.extend(_health_notes(health))
        n_flag = int(anomalies.flagged.sum())
        if n_flag:
            assert anomalies.persistent is not None
            kinds, counts = np.unique(anomalies.kind[anomalies.flagged], return_counts=True)
            summary = ", ".join(f"{k} {c}" for k, c in zip(kinds, counts, strict=True))
            notes.append(
                f"anomalies: {n_flag} GPUs flagged ({summary}); "
                f"{int(anomalies.persistent.sum())} persistent"
            )
        if priority is None:
            priority = job_priorities(
                snapshot.job, self.job_priority, self._priority_from_labels(snapshot)
            )
        return Situation(
            snapshot=snapshot,
            time_s=snapshot.time_s,
            budget_w=budget_w,
            fleet_power_w=fleet,
            overhead_w=overhead,
            busy=draw.busy,
            curves=curves,
            priority=priority,
            cap_w=cap,
            min_cap_w=min_cap,
            max_cap_w=max_cap,
            default_cap_w=default_cap,
            forecast=forecast,
            health=health,
            anomalies=anomalies if n else AnomalyFlags.none(0),
            nodes=nodes,
            notes=tuple(notes),
            # Busy or idle is known only where power is read (`draw.busy` needs it): a GPU
            # without a power reading is not idle, and must not get an idle cap.
            idle_s=self.idle.update(snapshot.uuid, draw.busy, fresh_power, snapshot.time_s),
            arrival_reserve_w=self.arrivals.update(snapshot.uuid, draw.busy, snapshot.fresh, power),
            group_budgets=group_masks(
                snapshot, self.groups, self.group_label, self.label_budgets_w
            ),
            throughput=throughput_view(snapshot, learned.natural_clock_mhz),
        )

    def _slow_models(
        self,
        snapshot: Snapshot,
        draw: NaturalDraw,
        natural_known: npt.NDArray[np.bool_],
        cap: FloatArray,
        max_cap: FloatArray,
        health: HealthStatus,
    ) -> tuple[AnomalyFlags, CurveView]:
        """The anomaly detectors, then the curve learner (on what they did not flag). They may
        run every Nth cycle; between runs their last findings stand, as long as the GPUs are the
        same rows."""
        every = self.settings.slow_models_every_cycles
        cached = self._slow_cache
        if (
            cached is not None
            and every > 1
            and self.cycles % every != 0
            and self._slow_uuids.same(snapshot.uuid)
        ):
            return cached
        before = self.curves.view(snapshot, draw.busy)
        anomalies = self.anomaly.update(
            snapshot,
            AnomalyContext(
                busy=draw.busy,
                natural_w=np.where(natural_known, draw.mean_w, np.nan),
                natural_known=natural_known,
                cap_draw_frac=np.where(np.isfinite(draw.cap_draw_frac), draw.cap_draw_frac, 0.95),
                cap_frac_known=np.isfinite(draw.cap_draw_frac),
                cap_w=cap,
                max_cap_w=max_cap,
                natural_clock_mhz=before.natural_clock_mhz,
                curve_a=before.a,
                curve_b=before.b,
                health_severity=health.severity,
                interval_s=self.interval_s,
            ),
        )
        # Curves see the unbiased uncapped level where the detector has one (the tracker's
        # estimate leans high on purpose, which would bend the fitted curves).
        level_w = self.anomaly.uncapped_level_w
        learned = self.curves.update(
            snapshot,
            busy=draw.busy,
            natural_w=np.where(np.isfinite(level_w), level_w, draw.mean_w),
            natural_known=natural_known,
            max_cap_w=max_cap,
            exclude=anomalies.flagged | (health.severity > int(HealthSeverity.OK)),
            cap_draw_frac=draw.cap_draw_frac,
        )
        self._slow_cache = (anomalies, learned)
        self._slow_uuids.remember(snapshot.uuid)
        return anomalies, learned

    # -- forecasts --------------------------------------------------------------------------------

    def _forecast(
        self,
        snapshot: Snapshot,
        fleet_w: float,
        busy: npt.NDArray[np.bool_],
        uncertain: npt.NDArray[np.bool_],
        cap: FloatArray,
        max_cap: FloatArray,
        level_w: FloatArray,
        target_w: FloatArray,
        busy_for_s: FloatArray | None,
    ) -> PowerForecast:
        horizons = self.settings.forecast.horizons_s
        h = len(horizons)
        k = snapshot.n_nodes
        if snapshot.n_gpus == 0:  # nothing seen: nothing to say (never a forecast of 0 W)
            unknown = np.full(h, np.nan)
            return PowerForecast(
                horizons_s=tuple(horizons),
                fleet_w=unknown,
                fleet_lo_w=unknown.copy(),
                fleet_hi_w=unknown.copy(),
                method="none",
            )
        node = snapshot.node
        power, power_ok = snapshot.column(Metric.POWER_W)
        temp, temp_ok = snapshot.column(Metric.TEMP_C)
        fresh = snapshot.fresh
        count: FloatArray = np.bincount(node, minlength=k).astype(np.float64)
        fleet_busy = float(busy.sum()) / max(float(count.sum()), 1.0)
        good = fresh & power_ok
        complete = np.bincount(node[good], minlength=k) == count
        node_w = np.where(complete, np.bincount(node[good], power[good], minlength=k), np.nan)
        capacity = np.bincount(node, np.nan_to_num(max_cap, nan=0.0), minlength=k).astype(
            np.float64
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            busy_share = np.bincount(node, busy.astype(np.float64), minlength=k) / count
            warm = np.bincount(node, (busy & uncertain).astype(np.float64), minlength=k)
            warm_share = warm / count
            cap_share = np.bincount(node, np.nan_to_num(cap, nan=0.0), minlength=k) / capacity
            level = np.where(good, np.nan_to_num(level_w), 0.0)
            node_level = np.where(complete, np.bincount(node, level, minlength=k), np.nan)
            ramp = np.where(good, np.nan_to_num(target_w - level_w), 0.0)
            ramp_gap = np.bincount(node, ramp, minlength=k) / capacity
            # How long the node's jobs have run (hours, capped): jobs end, and the chance
            # depends on their age.
            ages = np.zeros(busy.shape[0]) if busy_for_s is None else busy_for_s
            age_h = np.minimum(np.nan_to_num(ages, nan=0.0) / 3600.0, 6.0)
            busy_n = np.bincount(node, busy.astype(np.float64), minlength=k)
            age_sum = np.bincount(node, np.where(busy, age_h, 0.0), minlength=k)
            job_age = np.where(busy_n > 0, age_sum / np.maximum(busy_n, 1.0), 0.0)
        pw = self.node_power.update(
            snapshot.node_names,
            node_w,
            capacity,
            np.column_stack(
                [busy_share, warm_share, cap_share, ramp_gap, np.full(k, fleet_busy), job_age]
            ),
            self.interval_s,
            base=node_level,
        )
        t_ok = fresh & temp_ok
        node_t = np.full(k, -np.inf)
        np.maximum.at(node_t, node[t_ok], temp[t_ok])
        node_t = np.where(np.isfinite(node_t), node_t, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            load = np.where(capacity > 0, np.nan_to_num(node_w) / capacity, np.nan)
        tf = self.node_temp.update(
            snapshot.node_names, node_t, np.full(k, 100.0), load[:, None], self.interval_s
        )

        # The fleet: its noise-free level plus the nodes' predicted changes. It and persistence
        # are scored as their forecasts come due (FleetScore chooses).
        fleet_level = fleet_w + float(np.nansum(np.where(good, level_w - power, 0.0)))
        rows = np.isfinite(node_level)
        change = np.where(rows[:, None], pw.point - node_level[:, None], 0.0)
        summed = fleet_level + np.nansum(change, axis=0)
        candidates = np.stack([np.full(h, fleet_w), summed])
        self.fleet.realize(fleet_w)
        choice, q_lo, q_hi = self.fleet.choose()
        point = candidates[choice, np.arange(h)]
        spread = np.sqrt(np.nansum(np.where(rows[:, None], pw.hi - pw.point, 0.0) ** 2, axis=0))
        lo_w = point + np.where(np.isfinite(q_lo), q_lo, -spread)
        hi_w = point + np.where(np.isfinite(q_hi), q_hi, spread)
        self.fleet.record(candidates, self.node_power.steps if self.interval_s else (), lo_w, hi_w)
        methods = tuple(FLEET_METHODS[c] for c in choice)
        return PowerForecast(
            horizons_s=tuple(horizons),
            fleet_w=point,
            fleet_lo_w=lo_w,
            fleet_hi_w=hi_w,
            node_w=pw.point,
            node_hi_w=pw.hi,
            method=methods[0] if len(set(methods)) == 1 else "mixed",
            coverage=self.settings.forecast.coverage,
            node_lo_w=pw.lo,
            node_methods=pw.methods,
            fleet_methods=methods,
            node_temp_c=tf.point,
            node_temp_lo_c=tf.lo,
            node_temp_hi_c=tf.hi,
        )


FLEET_METHODS = ("persistence", "level+nodes")
KEPT_HORIZONS = 16
# How clearly persistence must beat the nodes' sum on the fleet's own recent errors to be used
# instead: by more than this many standard errors. The sum is the default because each node's
# method already won on held-out rows of dozens of series, far more evidence than one series'
# last 16 horizons; on those either often leads for a while by chance. On the twin, falling
# back at one standard error made one 12-hour run's 5-minute fleet forecast lose to persistence
# (bench/orient.py, seed 100: MASE 1.0099, against 0.9961 at two).
FALLBACK_Z = 2.0
# How fast each horizon's interval level follows its misses (adaptive conformal inference,
# Gibbs & Candes 2021): after every interval that comes due, the share it leaves out moves by
# this times (the share wanted - 1 if missed else 0), so over time the intervals miss as often
# as promised even where recent errors understate the next ones. On the twin's fleet, 0.002
# brought the 90% intervals' coverage from 0.865-0.912 to 0.886-0.905 (bench/orient.py, means
# of 3 runs per horizon and scenario); 0.01 swung too far at 15 minutes.
ADAPT_RATE = 0.002


class FleetScore:
    """Realized errors of the fleet's candidate forecasts, per horizon (online, causal), and
    how often the intervals given missed."""

    def __init__(
        self, n_horizons: int, coverage: float, kept: int = 240, adapt_rate: float = ADAPT_RATE
    ) -> None:
        self.h = n_horizons
        self.coverage = coverage
        self.kept = kept
        self.adapt_rate = adapt_rate
        self.cycle = 0
        # cycle -> candidates x horizons, then the interval given (lo, hi) x horizons
        self.pending: dict[int, list[list[float]]] = {}
        self.steps: tuple[int, ...] = ()
        self.errors: list[list[list[float]]] = self._no_errors()
        self.left_out = self._share_wanted()  # per horizon: the share intervals leave out

    def _no_errors(self) -> list[list[list[float]]]:
        return [[[] for _ in range(self.h)] for _ in FLEET_METHODS]

    def _share_wanted(self) -> list[float]:
        return [1.0 - self.coverage] * self.h

    def to_dict(self) -> dict[str, Any]:
        return {
            "cycle": self.cycle,
            "pending": {str(c): v for c, v in self.pending.items()},
            "steps": list(self.steps),
            "errors": self.errors,
            "left_out": self.left_out,
        }

    def load_dict(self, data: Mapping[str, Any]) -> None:
        self.cycle = int(data.get("cycle", 0))
        self.steps = tuple(int(x) for x in data.get("steps", []))
        pending = {
            int(c): [[float(x) for x in row] for row in v] for c, v in data["pending"].items()
        }
        errors = [[[float(x) for x in e] for e in per] for per in data["errors"]]
        left_out = [float(x) for x in data.get("left_out", [])]
        rows = len(FLEET_METHODS) + 2
        if len(errors) != len(FLEET_METHODS) or any(len(v) != rows for v in pending.values()):
            # Saved by a version that scored other candidates: score these afresh.
            pending, errors = {}, self._no_errors()
        self.pending, self.errors = pending, errors
        self.left_out = left_out if len(left_out) == self.h else self._share_wanted()

    def realize(self, actual: float) -> None:
        self.cycle += 1
        n = len(FLEET_METHODS)
        wanted = 1.0 - self.coverage
        for i, step in enumerate(self.steps):
            entry = self.pending.get(self.cycle - step)
            if entry is None:
                continue
            for c in range(n):
                errs = self.errors[c][i]
                errs.append(actual - entry[c][i])
                del errs[: max(0, len(errs) - self._kept(i))]
            lo, hi = entry[n][i], entry[n + 1][i]
            missed = 0.0 if lo <= actual <= hi else 1.0
            adapted = self.left_out[i] + self.adapt_rate * (wanted - missed)
            self.left_out[i] = float(np.clip(adapted, 0.001, 0.5))
        oldest = self.cycle - max(self.steps, default=0)
        for c in [c for c in self.pending if c <= oldest]:
            del self.pending[c]

    def _kept(self, i: int) -> int:
        # Errors h cycles apart overlap: a long horizon needs a longer window for as many
        # independent comparisons (16 horizons' worth, at least `kept` cycles).
        step = self.steps[i] if i < len(self.steps) else 1
        return max(self.kept, KEPT_HORIZONS * step)

    def record(
        self, candidates: FloatArray, steps: tuple[int, ...], lo: FloatArray, hi: FloatArray
    ) -> None:
        """This cycle's candidates (candidates x horizons) and the interval given per horizon."""
        if steps != self.steps:  # a new cycle interval: earlier scores no longer apply
            self.steps = steps
            self.pending.clear()
            self.errors = self._no_errors()
            self.left_out = self._share_wanted()
        given = np.vstack([candidates, lo, hi])
        if steps and np.all(np.isfinite(given)):
            self.pending[self.cycle] = given.tolist()

    def choose(self) -> tuple[npt.NDArray[np.int64], FloatArray, FloatArray]:
        """Per horizon: the candidate to use and its error quantiles (NaN: none known).
        Persistence until 30 forecasts have come due, then the nodes' sum unless persistence
        beats it by more than FALLBACK_Z standard errors. The quantiles leave out the share
        the horizon's misses have adapted to, half on each side."""
        choice = np.zeros(self.h, dtype=np.int64)
        lo = np.full(self.h, np.nan)
        hi = np.full(self.h, np.nan)
        for i in range(self.h):
            errs = [np.asarray(self.errors[c][i]) for c in range(len(FLEET_METHODS))]
            if errs[0].size < 30:
                continue
            block = self.steps[i] if i < len(self.steps) else 1
            best = 0 if clearly_better(errs[0], errs[1], block, FALLBACK_Z) else 1
            choice[i] = best
            qs = [self.left_out[i] / 2.0, 1.0 - self.left_out[i] / 2.0]
            lo[i], hi[i] = np.quantile(errs[best], qs)
        return choice, lo, hi


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _health_notes(health: HealthStatus) -> list[str]:
    sev = health.severity
    parts = []
    for level, label in (
        (HealthSeverity.DRAIN, "to drain"),
        (HealthSeverity.RESTART_JOB, "with a job to restart"),
        (HealthSeverity.WATCH, "to watch"),
    ):
        count = int((sev == int(level)).sum())
        if count:
            codes = np.unique(health.code[sev == int(level)])[:5]
            parts.append(f"{count} GPUs {label} ({', '.join(codes.tolist())})")
    return [f"health: {'; '.join(parts)}"] if parts else []

"""Streaming anomaly detection over the fleet, columnar over GPUs.

Every detector compares what a GPU shows with what is expected of it *given what the agent
knows* (its job, its cap, its load), so that the agent's own actions (caps) and the normal life
of jobs (start-up, end) are not anomalies:

- dropout: telemetry older than its usual age (per GPU baseline of the sample age) or stale;
- power: a draw above what the GPU can draw under its cap (the limiter does not hold), or above
  its own robust baseline (learned only while its cap does not bind); power_drop: far below it;
- temp: the GPU heats more than a pooled first-order thermal model (fit with scikit-learn's
  HuberRegressor on recent history) predicts from its previous temperature and its draw, relative
  to its own baseline: its thermal resistance rose (a failed fan, a blocked inlet);
- hot_vs_peers: its thermal resistance is well above its node's (and rack's) neighbours';
- straggler: its SM clock is well below its job peers' median, or below what its own power curve
  expects at its draw where its cap does not bind (a straggler slows the whole synchronous job);
- util: utilization far below its baseline while its job runs;
- multivariate: a robust covariance model (scikit-learn's MinCovDet, refit on a schedule from
  recent residuals) flags combinations of residuals no single detector flags.

Scores are normalized per detector: 1.0 is that detector's threshold. A GPU's `score` is the
largest; its `kind` is the highest-ranked detector that fired. Evidence (metric, value, expected
range, score) is built only for flagged GPUs, and only when read. Causal: each cycle scores the
new snapshot against state learned from earlier ones, then learns from what was not flagged.
GPUs whose health already calls for a drain are explained by it: only dropout flags them.

Context across GPUs: a GPU's power, clock-against-its-curve and utilization residuals are judged
net of what its job's peers share at the same moment (a checkpoint, a data stall or an evaluation
moves all of a job's GPUs together: the job's phase, not a GPU's fault; a straggler moves apart
from its peers), and a whole node's telemetry gone for a single cycle is its exporter restarting,
a dropout only from the second cycle (a GPU silent while its node reports: at once).

Calibration (`calibrate`): each baseline's standardized residual (power, thermal resistance,
clock against its curve, utilization) also runs, per GPU, through the streaming detector of
agent.orient.stream, which learns how that GPU's residuals are spread; a baseline's statistical
flag stands only where the residual is rare for that GPU as well (tail probability under
`alarm_p`, or its alarm still open). Limits (past the cap, at the slowdown temperature),
dropouts and peer comparisons are never excused by a GPU's history. New statistical alarms are
rate-limited per GPU (a token bucket: `alarm_burst`, refilled at `alarms_per_hour`).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.covariance import MinCovDet

from agent.core.curves import throughput_at_power
from agent.core.gpu_models import BUILTIN_MODELS, H100_SXM
from agent.core.keyed import KeyedColumns, LastKeys, freeze
from agent.core.situation import AnomalyFlags, HealthSeverity
from agent.core.snapshot import Metric, Snapshot
from agent.orient.baseline import RobustBaselines
from agent.orient.settings import AnomalySettings
from agent.orient.stats import (
    Grouper,
    decay_alpha,
    group_mean,
    group_median,
    pack,
    single_threaded,
    unpack,
)
from agent.orient.stream import StreamDetector, StreamParams

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

KIND_ORDER = (
    "dropout",
    "temp",
    "hot_vs_peers",
    "power",
    "straggler",
    "power_drop",
    "util",
    "multivariate",
)
CLEAR_OF_CAP_FRAC = 0.75  # below this share of a lowered limit, the limit surely does not bind
THERMAL_BUFFER_ROWS = 8192
PERSIST_ROWS = 1000  # samples of each buffer kept in the saved state
THERMAL_COLS = 6  # T_prev, P_prev, P_now, T_now, dt, dT_prev
MV_BUFFER_ROWS = 8192
# Peer bands' limits: draws beyond share the top band (3x the max cap; 10 kW) rather than size
# the group arrays (n_nodes or n_jobs x bands) after one absurd sample.
HOT_PEER_TOP_BAND = 20.0
STRAGGLER_POWER_CEILING_W = 10_000.0
MV_FEATURES = ("power_z", "temp_z", "clock_z", "util_z")
# A whole node silent this many cycles in a row is a dropout (fewer: its exporter restarting).
NODE_AWAY_CYCLES = 2
# A busy GPU's power and temperature repeated exactly this many times in a row: frozen readings.
FROZEN_REPEATS = 2
# The baselines' standardized residuals that are calibrated per GPU (agent.orient.stream).
CALIBRATED_FIELDS = ("power", "temp", "clock", "util")
# Flags the per-GPU alarm budget may hold back (limits, dropouts, health and peer comparisons
# are never held: each is its own evidence, not a GPU's history).
STATISTICAL_KINDS = frozenset({"power", "power_drop", "temp", "straggler", "util", "multivariate"})

_NOT_FULL_RANK = "The covariance matrix associated to your dataset is not full rank"


@dataclass(frozen=True, slots=True)
class AnomalyContext:
    """What the rest of orient knows about each GPU this cycle (aligned with snapshot rows)."""

    busy: BoolArray
    natural_w: FloatArray  # learned natural draw (NaN: unknown)
    natural_known: BoolArray  # seen uncapped after its warm-up
    cap_draw_frac: FloatArray  # draw / limit under a binding cap (prior where unknown)
    cap_frac_known: BoolArray  # cap_draw_frac was learned (not the prior)
    cap_w: FloatArray
    max_cap_w: FloatArray
    natural_clock_mhz: FloatArray  # SM clock when uncapped (NaN: unknown)
    curve_a: FloatArray
    curve_b: FloatArray
    health_severity: npt.NDArray[np.int64]
    interval_s: float | None  # the typical time between cycles (None: not known yet)


@dataclass(frozen=True, slots=True)
class DetectorResult:
    kind: str
    metric: str
    value: FloatArray
    lo: FloatArray
    hi: FloatArray
    score: FloatArray  # normalized: >= 1 fires


class _Evidence(Mapping[int, list[dict[str, Any]]]):
    """Row -> evidence, built on access from the detectors' columns."""

    def __init__(self, rows: IntArray, results: list[DetectorResult]) -> None:
        self._rows = rows
        self._set = set(rows.tolist())
        self._results = results

    def __getitem__(self, row: int) -> list[dict[str, Any]]:
        if row not in self._set:
            raise KeyError(row)
        out: list[dict[str, Any]] = []
        for r in self._results:
            score = float(r.score[row])
            if score >= 1.0:
                out.append(
                    {
                        "kind": r.kind,
                        "metric": r.metric,
                        "value": _num(r.value[row]),
                        "expected_lo": _num(r.lo[row]),
                        "expected_hi": _num(r.hi[row]),
                        "score": round(score, 3),
                    }
                )
        out.sort(key=lambda e: KIND_ORDER.index(e["kind"]))
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self._rows.tolist())

    def __len__(self) -> int:
        return int(self._rows.shape[0])


def _empty() -> FloatArray:
    return np.zeros(0)


@dataclass(slots=True)
class _Cycle:
    """One cycle's inputs (aligned with the snapshot's rows) and what the detectors derive
    from them, filled in as they run."""

    g: IntArray  # the GPUs' slots in the detector's own state
    b: IntArray  # ... and in the baselines'
    n: int
    fresh: BoolArray
    busy: BoolArray
    warming: BoolArray  # a job's start-up, when its draw says little
    settled: BoolArray
    power: FloatArray
    power_ok: BoolArray
    temp: FloatArray
    temp_ok: BoolArray
    util: FloatArray
    util_ok: BoolArray
    clock: FloatArray
    clock_ok: BoolArray
    cap: FloatArray
    cap_ok: BoolArray
    clear: BoolArray  # the draw is clear of a binding cap
    job_ids: IntArray  # the job's group (jobs.ids); meaningful where in_job
    n_jobs: int
    in_job: BoolArray  # busy with a named job
    # Beyond a threshold only with its job's common move (or its node's exporter away):
    # excused, but nothing its baselines should learn.
    excused: BoolArray
    z: dict[str, FloatArray] = field(default_factory=dict)  # calibrated field -> residual z
    gate: dict[str, BoolArray] = field(default_factory=dict)  # field -> rare for this GPU
    hard_fired: dict[str, BoolArray] = field(default_factory=dict)
    # What each detector saw before calibration and the alarm budget: the baselines learn
    # from none of it (a routine stall is excused as an alarm, not learned as a level).
    raw_fired: dict[str, BoolArray] = field(default_factory=dict)
    power_z: FloatArray = field(default_factory=_empty)
    temp_z: FloatArray = field(default_factory=_empty)
    clock_z: FloatArray = field(default_factory=_empty)
    util_z: FloatArray = field(default_factory=_empty)
    rel: FloatArray = field(default_factory=_empty)
    rel_ok: BoolArray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    smooth: FloatArray = field(default_factory=_empty)
    ratio: FloatArray = field(default_factory=_empty)
    ratio_ok: BoolArray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    feats: FloatArray = field(default_factory=_empty)


@dataclass(frozen=True, slots=True)
class _Part:
    """A detector's finding before calibration: a score no history excuses (`hard`: a limit,
    a peer comparison) and the baseline's statistical score (`stat`), which stands only where
    the calibrated series `field` says the residual is rare for this GPU."""

    kind: str
    metric: str
    value: FloatArray
    lo: FloatArray
    hi: FloatArray
    hard: FloatArray
    stat: FloatArray | None = None
    field: str | None = None

    def result(self, cy: _Cycle) -> DetectorResult:
        cy.hard_fired[self.kind] = self.hard >= 1.0
        score = self.hard
        raw = self.hard if self.stat is None else np.maximum(self.hard, self.stat)
        cy.raw_fired[self.kind] = raw >= 1.0
        if self.stat is not None:
            gate = cy.gate.get(self.field or "")
            stat = (
                self.stat
                if gate is None
                else np.where(gate, self.stat, np.minimum(self.stat, 0.999))
            )
            score = np.maximum(score, stat)
        return DetectorResult(
            self.kind,
            self.metric,
            self.value,
            self.lo,
            self.hi,
            np.asarray(score, dtype=np.float64),
        )


def _beyond_job(resid: FloatArray, cy: _Cycle, ok: BoolArray) -> FloatArray:
    """A GPU's residual net of what its job's peers share at the same moment (their median;
    of two, the other one), in the residual's own direction only: all of a job's GPUs moving
    together is the job's phase (a checkpoint, a data stall, an evaluation), not a GPU's fault,
    while a GPU that moves apart from its peers keeps all of its residual. The job's move only
    ever explains: it never makes a GPU that stayed put look anomalous."""
    use = ok & cy.in_job & np.isfinite(resid)
    if not use.any():
        return resid
    ids = cy.job_ids
    med, cnt = group_median(resid, ids, use, cy.n_jobs)
    total = np.bincount(ids[use], resid[use], minlength=cy.n_jobs)
    with np.errstate(invalid="ignore"):
        common = np.where(cnt[ids] == 2, total[ids] - resid, med[ids])
        common = np.where(use & (cnt[ids] >= 2), common, 0.0)
        shared = np.clip(common * np.sign(resid), 0.0, None)
        net = np.sign(resid) * np.maximum(np.abs(resid) - shared, 0.0)
    return np.asarray(np.where(use, net, resid), dtype=np.float64)


def _num(value: float) -> float | None:
    v = float(value)
    return round(v, 3) if np.isfinite(v) else None


def _nan(n: int) -> FloatArray:
    return np.full(n, np.nan)


class AnomalyDetector:
    def __init__(self, settings: AnomalySettings | None = None, seed: int = 0) -> None:
        self.settings = s = settings or AnomalySettings()
        self.rng = np.random.default_rng(seed)
        self.gpu = KeyedColumns(
            {
                "job": (np.int64, 0),  # string_hash of the job label
                "busy": (np.bool_, False),
                "sick": (np.bool_, False),  # health calls for a drain (a failed GPU)
                "since": (np.float64, np.nan),  # start of the current context (job or idle)
                "prev_t": (np.float64, np.nan),
                "prev_temp": (np.float64, np.nan),
                "prev_dtemp": (np.float64, np.nan),  # the temperature change before that
                "prev_power": (np.float64, np.nan),
                "rel_smooth": (np.float64, np.nan),
                "run": (np.int64, 0),  # consecutive flagged cycles
                "silent": (np.int64, 0),  # consecutive cycles its telemetry was late or gone
                "same": (np.int64, 0),  # consecutive cycles power and temperature repeated
                "tokens": (np.float64, s.alarm_burst),  # the GPU's alarm budget
                "tokens_t": (np.float64, np.nan),
            }
        )
        self.stream_params = StreamParams(
            rhythm=s.rhythm,
            average_halflives_rows=(4.0,),
            warmup_rows=s.calibration_warmup_cycles,
            alarm_p=s.alarm_p,
            calm_rows=s.calm_cycles,
            # The record's bins would cost ~150 numbers per GPU and field (hundreds of MB at
            # 100,000 GPUs) for no change on the twin's days: the fitted tails alone here.
            tail_record=False,
        )
        self.stream = {f: StreamDetector(self.stream_params) for f in CALIBRATED_FIELDS}
        self.held_alarms = 0  # new alarms the per-GPU budget held back (since start)
        self.base = RobustBaselines(
            ("age", "power", "rel_r", "clock_r", "util"),
            halflife_n=s.baseline_halflife_n,
            warmup_n=5,
        )
        self.jobs = Grouper()
        self.racks = Grouper()
        self.cycle = 0
        self.interval_s: float | None = None
        # Pooled thermal model per GPU model: T_now = w0 + w1 T_prev + w3 P_now (w2 = 0: the
        # draw sampled now stands for the interval, since the agent's cap changes, the largest
        # steps, take effect just after the previous sample).
        self.thermal_coef: dict[str, list[float]] = {}
        self.thermal_dt: dict[str, float] = {}
        self._tbuf = np.full((THERMAL_BUFFER_ROWS, THERMAL_COLS), np.nan)
        self._tbuf_model = np.full(THERMAL_BUFFER_ROWS, "", dtype="U64")
        self._tbuf_n = 0
        # Multivariate model over residual z-scores.
        self._mbuf = np.full((MV_BUFFER_ROWS, len(MV_FEATURES)), np.nan)
        self._mbuf_n = 0
        self.mv_location: FloatArray | None = None
        self.mv_precision: FloatArray | None = None
        self.mv_threshold: float = np.inf
        self.expected_power_w: FloatArray = np.zeros(0)  # per row of the last snapshot
        # ... and the baseline of each busy GPU's uncapped draw (an unbiased mean, where the
        # natural-draw tracker keeps a high estimate on purpose, for budgets).
        self.uncapped_level_w: FloatArray = np.zeros(0)

    # -- state ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu.to_dict(),
            "baselines": self.base.to_dict(),
            "cycle": self.cycle,
            "interval_s": self.interval_s,
            "thermal_coef": self.thermal_coef,
            "thermal_dt": self.thermal_dt,
            # The newest samples only (a state file is written often): enough to refit.
            "thermal_buffer": pack(_newest(self._tbuf, self._tbuf_n, PERSIST_ROWS)),
            "thermal_buffer_model": _newest(self._tbuf_model, self._tbuf_n, PERSIST_ROWS).tolist(),
            "mv_buffer": pack(_newest(self._mbuf, self._mbuf_n, PERSIST_ROWS)),
            "mv_location": None if self.mv_location is None else self.mv_location.tolist(),
            "mv_precision": None if self.mv_precision is None else self.mv_precision.tolist(),
            "mv_threshold": self.mv_threshold if np.isfinite(self.mv_threshold) else None,
            "stream": self._stream_dict(),
        }

    def _stream_dict(self) -> dict[str, Any]:
        """The calibration's state, with the GPUs' keys once: every field follows the same
        ones (each aligns with the snapshot's UUIDs)."""
        first = next(iter(self.stream.values())).keys
        return {
            "keys": None if first is None else first.tolist(),
            "fields": {name: d.to_dict(with_keys=False) for name, d in self.stream.items()},
        }

    def load_dict(self, data: Mapping[str, Any]) -> None:
        self.gpu.load_dict(data.get("gpu", {}))
        self.base.load_dict(data.get("baselines", {}))
        self.cycle = int(data.get("cycle", 0))
        interval = data.get("interval_s")
        self.interval_s = None if interval is None else float(interval)
        self.thermal_coef = {str(k): [float(x) for x in v] for k, v in data["thermal_coef"].items()}
        self.thermal_dt = {str(k): float(v) for k, v in data["thermal_dt"].items()}
        tb = unpack(data.get("thermal_buffer", [])).reshape(-1, THERMAL_COLS)
        self._tbuf[: tb.shape[0]] = tb
        self._tbuf_model[: tb.shape[0]] = np.asarray(
            data.get("thermal_buffer_model", []), dtype=np.str_
        )
        self._tbuf_n = tb.shape[0]
        mb = unpack(data.get("mv_buffer", [])).reshape(-1, len(MV_FEATURES))
        self._mbuf[: mb.shape[0]] = mb
        self._mbuf_n = mb.shape[0]
        loc, prec = data.get("mv_location"), data.get("mv_precision")
        self.mv_location = None if loc is None else np.asarray(loc, dtype=np.float64)
        self.mv_precision = None if prec is None else np.asarray(prec, dtype=np.float64)
        thr = data.get("mv_threshold")
        self.mv_threshold = np.inf if thr is None else float(thr)
        stream = data.get("stream", {})
        keys = stream.get("keys")
        for name, saved in stream.get("fields", {}).items():
            if name in self.stream:
                self.stream[name].load_dict(saved, keys)

    # -- one cycle --------------------------------------------------------------------------------

    def update(self, snap: Snapshot, ctx: AnomalyContext) -> AnomalyFlags:
        """Score the snapshot against what earlier cycles taught, then learn from it."""
        if snap.n_gpus == 0:
            self.expected_power_w = np.zeros(0)
            self.uncapped_level_w = np.zeros(0)
            return AnomalyFlags.none(0)
        self.cycle += 1
        self.interval_s = ctx.interval_s
        cy = self._cycle(snap, ctx)
        parts = [
            self._dropout(snap, cy, ctx),
            *self._power(cy, ctx),
            self._temp(snap, cy),
            self._hot(snap, cy, ctx),
            self._straggler(snap, cy, ctx),
            self._util(cy),
        ]
        self._calibrate(snap, cy)
        results = [part.result(cy) for part in parts]
        results.append(self._mv(cy))
        flags = self._combine(snap, cy, ctx, results)
        none = np.zeros(cy.n, dtype=bool)
        seen = {r.kind: (r.score >= 1.0) | cy.raw_fired.get(r.kind, none) for r in results}
        self._learn(snap, cy, np.logical_or.reduce([flags.flagged, *seen.values()]), seen)
        return flags

    # -- the cycle's inputs -----------------------------------------------------------------------

    def _cycle(self, snap: Snapshot, ctx: AnomalyContext) -> _Cycle:
        """Slots, contexts (a new job, busy or idle, failed or not: the baselines restart) and
        the fresh readings."""
        s = self.settings
        g = self.gpu.slots(snap.uuid)
        b = self.base.slots(snap.uuid)
        st = self.gpu.cols
        fresh = snap.fresh
        now = snap.time_s
        busy = ctx.busy
        # A failed GPU (health: drain) and the same GPU after its reset are different contexts
        # too: what it drew while failed says nothing about what it draws after.
        sick = ctx.health_severity >= int(HealthSeverity.DRAIN)
        job = self.jobs.hashes(snap.job)
        changed = fresh & (
            (st["job"][g] != job) | (st["busy"][g] != busy) | (st["sick"][g] != sick)
        )
        changed |= fresh & np.isnan(st["since"][g])
        if changed.any():
            c = g[changed]
            st["job"][c] = job[changed]
            st["busy"][c] = busy[changed]
            st["sick"][c] = sick[changed]
            st["since"][c] = now
            # (Thermal resistance too: the pooled model's small misfit of the ambient weighs
            # differently at idle and under load.)
            for name in ("power", "clock_r", "util", "rel_r"):
                self.base.reset(name, b[changed])
        warming = busy & ((now - st["since"][g]) < s.warmup_s)
        readings = {
            metric: snap.column(metric)
            for metric in (Metric.POWER_W, Metric.TEMP_C, Metric.UTIL_PCT, Metric.SM_CLOCK_MHZ)
        }
        power, power_ok = readings[Metric.POWER_W]
        temp, temp_ok = readings[Metric.TEMP_C]
        live = ~self._frozen(g, busy & fresh, power, power_ok, temp, temp_ok)
        power_ok = power_ok & fresh & live
        temp_ok = temp_ok & fresh & live
        cap = ctx.cap_w
        cap_ok = np.isfinite(cap)
        at_max = cap_ok & np.isfinite(ctx.max_cap_w) & (cap >= ctx.max_cap_w - 0.5)
        job_ids, job_names = self.jobs.ids(snap.job)
        return _Cycle(
            g=g,
            b=b,
            n=snap.n_gpus,
            fresh=fresh,
            busy=busy,
            warming=warming,
            settled=busy & ~warming & fresh,
            power=power,
            power_ok=power_ok,
            temp=temp,
            temp_ok=temp_ok,
            util=readings[Metric.UTIL_PCT][0],
            util_ok=readings[Metric.UTIL_PCT][1] & fresh,
            clock=readings[Metric.SM_CLOCK_MHZ][0],
            clock_ok=readings[Metric.SM_CLOCK_MHZ][1] & fresh,
            cap=cap,
            cap_ok=cap_ok,
            clear=power_ok & (at_max | (cap_ok & (power < CLEAR_OF_CAP_FRAC * cap)) | ~cap_ok),
            job_ids=job_ids,
            n_jobs=int(job_names.shape[0]),
            in_job=busy & fresh & (snap.job != ""),
            excused=np.zeros(snap.n_gpus, dtype=bool),
        )

    def _frozen(
        self,
        g: IntArray,
        busy: BoolArray,
        power: FloatArray,
        power_ok: BoolArray,
        temp: FloatArray,
        temp_ok: BoolArray,
    ) -> BoolArray:
        """Busy GPUs whose power and temperature readings repeat exactly, `FROZEN_REPEATS`
        times in a row: a hung exporter serving its last values (a working GPU's draw is never
        the same to the milliwatt twice), readings that say nothing now rather than a GPU
        whose draw and heat stopped (a cap moved under a frozen draw is no excursion)."""
        st = self.gpu.cols
        same = (
            busy
            & power_ok
            & temp_ok
            & (power == st["prev_power"][g])
            & (temp == st["prev_temp"][g])
        )
        repeats = np.where(same, st["same"][g] + 1, np.where(busy, 0, st["same"][g]))
        st["same"][g] = repeats
        return np.asarray(repeats >= FROZEN_REPEATS, dtype=bool)

    # -- detectors --------------------------------------------------------------------------------

    def _dropout(self, snap: Snapshot, cy: _Cycle, ctx: AnomalyContext) -> _Part:
        """Telemetry older than its usual age (the GPU's own baseline of the sample age)."""
        s = self.settings
        age_e = self.base.expected("age", cy.b)
        seen = np.isfinite(snap.age_s)
        age_lo = np.where(age_e.ready, age_e.level, np.nan)
        if ctx.interval_s is not None:
            margin = np.maximum(4.0 * age_e.sigma, s.dropout_min_frac * ctx.interval_s)
            age_hi = np.where(age_e.ready, age_e.level + np.maximum(margin, 1.0), np.nan)
        else:
            age_hi = _nan(cy.n)
        with np.errstate(invalid="ignore", divide="ignore"):
            age_score = (snap.age_s - age_lo) / (age_hi - age_lo)
        age_score = np.where(seen & np.isfinite(age_score), age_score, 0.0)
        age_score = np.where(snap.stale, np.maximum(age_score, 1.0), age_score)
        return _Part(
            "dropout", "age_s", snap.age_s, age_lo, age_hi, self._node_away(snap, cy, age_score)
        )

    def _node_away(self, snap: Snapshot, cy: _Cycle, age_score: FloatArray) -> FloatArray:
        """A whole node's telemetry gone for one cycle is its exporter restarting (its series
        come back within a scrape or two), not a dropout: held under the threshold until the
        node has been silent for `NODE_AWAY_CYCLES` cycles in a row. A GPU silent while the
        rest of its node reports is a dropout at once."""
        st = self.gpu.cols
        late = age_score >= 1.0
        silent = np.where(late, st["silent"][cy.g] + 1, 0)
        st["silent"][cy.g] = silent
        per_node = np.bincount(snap.node, minlength=snap.n_nodes)
        late_per_node = np.bincount(snap.node[late], minlength=snap.n_nodes)
        whole_node = late & (late_per_node[snap.node] == per_node[snap.node])
        whole_node &= per_node[snap.node] >= 2
        hold = whole_node & (silent < NODE_AWAY_CYCLES)
        cy.excused |= hold
        return np.where(hold, np.minimum(age_score, 0.999), age_score)

    def _power(self, cy: _Cycle, ctx: AnomalyContext) -> tuple[_Part, _Part]:
        """A draw above what the cap allows (the limiter does not hold: a hard limit) or above
        the GPU's own baseline; a drop below it where the cap cannot explain it."""
        s = self.settings
        z = s.z_threshold
        power, busy, cap, cap_ok = cy.power, cy.busy, cy.cap, cy.cap_ok
        k = np.where(np.isfinite(ctx.cap_draw_frac), ctx.cap_draw_frac, 0.95)
        over_hi = cap * (1.0 + s.over_cap_tol_frac) + s.over_cap_tol_w
        with np.errstate(invalid="ignore", divide="ignore"):
            over = np.where(cy.power_ok & cap_ok, (power - cap) / (over_hi - cap), 0.0)
        over = np.nan_to_num(over)
        pe = self.base.expected("power", cy.b)
        usable = pe.ready & ((busy & ~cy.warming) | ~busy) & cy.power_ok
        expect = np.where(busy & cap_ok, np.fmin(pe.level, k * cap), pe.level)
        sigma = np.maximum(np.maximum(pe.sigma, s.power_rel_floor * np.abs(expect)), 1.0)
        with np.errstate(invalid="ignore"):
            resid_z = np.where(usable, (power - expect) / sigma, np.nan)
        cy.excused |= np.abs(np.nan_to_num(resid_z)) >= z
        # The calibration and the multivariate model see the GPU's own residual (net of its
        # job's, half of a job's GPUs would sit at exactly 0: no spread to learn).
        cy.z["power"] = resid_z
        cy.power_z = np.where(busy, resid_z, np.nan)
        resid_z = _beyond_job(resid_z, cy, usable)
        surge_hi = np.where(usable, expect + z * sigma, over_hi)
        surge_hi = np.where(over >= 1.0, np.fmin(surge_hi, over_hi), surge_hi)
        self.uncapped_level_w = np.where(pe.ready & busy & ~cy.warming, pe.level, np.nan)
        # The noise-free draw expected now (for the forecasts): the baseline under the current
        # cap, or the cap's share where the cap binds and the baseline is not known.
        binding = busy & ~cy.warming & cap_ok & cy.power_ok & ~cy.clear
        self.expected_power_w = np.where(
            usable, expect, np.where(binding & ctx.cap_frac_known, k * cap, np.nan)
        )
        # A drop only where the cap cannot explain it (the baseline is the uncapped draw).
        drop_ok = usable & busy & (expect >= pe.level - 1e-9)
        lo = np.where(usable, expect - z * sigma, np.nan)
        surge = _Part(
            "power", "power_w", power, lo, surge_hi, over, np.nan_to_num(resid_z / z), "power"
        )
        drop = _Part(
            "power_drop",
            "power_w",
            power,
            np.where(drop_ok, lo, np.nan),
            np.where(drop_ok, expect + z * sigma, np.nan),
            np.zeros(cy.n),
            np.where(drop_ok, np.nan_to_num(-resid_z / z), 0.0),
            "power",
        )
        return surge, drop

    def _temp(self, snap: Snapshot, cy: _Cycle) -> _Part:
        """Thermal resistance against the pooled model and the GPU's own baseline; at the
        hardware's slowdown temperature the GPU throttles, whatever the model says."""
        s = self.settings
        z = s.z_threshold
        rel, pred, gain, rel_ok = self._thermal_residual(
            snap, cy.g, cy.temp, cy.temp_ok, cy.power, cy.power_ok
        )
        cy.rel, cy.rel_ok = rel, rel_ok
        re = self.base.expected("rel_r", cy.b, floor=s.temp_rel_floor)
        use = rel_ok & re.ready
        cy.temp_z = cy.z["temp"] = np.where(use, (rel - re.level) / re.sigma, np.nan)
        hot_hi = _slowdown_temp(snap.model) - 2.0
        throttling = cy.temp_ok & (cy.temp >= hot_hi)
        hard = np.where(throttling, 1.0 + (cy.temp - hot_hi) / 5.0, 0.0)
        return _Part(
            "temp",
            "temp_c",
            cy.temp,
            np.where(use, pred + (re.level - z * re.sigma) * gain, np.nan),
            np.where(use, np.fmin(pred + (re.level + z * re.sigma) * gain, hot_hi), hot_hi),
            np.nan_to_num(hard),
            np.where(use, np.nan_to_num(cy.temp_z / z), 0.0),
            "temp",
        )

    def _hot(self, snap: Snapshot, cy: _Cycle, ctx: AnomalyContext) -> _Part:
        """Hotter than its neighbours at the same load: smoothed resistance vs node/rack
        median (a comparison across GPUs, not with the GPU's own history)."""
        prev = self.gpu.cols["rel_smooth"][cy.g]
        smooth = np.where(
            cy.rel_ok, np.where(np.isfinite(prev), 0.5 * prev + 0.5 * cy.rel, cy.rel), prev
        )
        cy.smooth = np.where(cy.fresh, smooth, np.nan)
        score, peer = self._hot_vs_peers(snap, cy.smooth, cy.power, ctx.max_cap_w)
        excess = self.settings.hot_peer_excess
        return _Part(
            "hot_vs_peers", "thermal_resistance_rel", cy.smooth, _nan(cy.n), peer + excess, score
        )

    def _straggler(self, snap: Snapshot, cy: _Cycle, ctx: AnomalyContext) -> _Part:
        """SM clock against the job's peers (across GPUs) and against what the GPU's own
        curve expects at its draw (its own history)."""
        s = self.settings
        # Peers start and ramp up together: they compare from the first cycle of their job.
        peers = cy.busy & cy.fresh & cy.clock_ok & cy.power_ok
        strag_score, strag_lo, strag_ref = self._stragglers(snap, peers, cy.clock, cy.power, ctx)
        with np.errstate(invalid="ignore", divide="ignore"):
            x = np.clip(cy.power / ctx.natural_w, 0.0, 1.0)
            expected_clock = ctx.natural_clock_mhz * throughput_at_power(
                x, 1.0, ctx.curve_a, ctx.curve_b
            )
            ratio = cy.clock / expected_clock
        # Only near the natural draw: deep under a cap the curve's error exceeds the margin.
        cy.ratio = ratio
        cy.ratio_ok = (
            cy.settled
            & cy.clock_ok
            & cy.power_ok
            & np.isfinite(ratio)
            & ctx.natural_known
            & (x >= 0.75)
        )
        ce = self.base.expected("clock_r", cy.b, floor=0.01)
        self_ok = cy.ratio_ok & ce.ready
        margin = np.maximum(s.z_threshold * ce.sigma, s.straggler_self_frac)
        # (Net of the job's common move: all of a job's GPUs slowing together is the job.)
        shortfall = np.where(self_ok, ce.level - ratio, np.nan)
        cy.excused |= np.nan_to_num(shortfall / margin) >= 1.0
        cy.clock_z = cy.z["clock"] = np.where(self_ok, -shortfall / ce.sigma, np.nan)
        shortfall = _beyond_job(shortfall, cy, self_ok)
        # No verdict of its own under a cap that binds: there the learned natural draw is only
        # a lower bound (what the held GPU draws, as under a cap set in a long warm-up), so the
        # curve expects the full clock at x = 1 of a GPU its cap slows; its peers judge it.
        # (Its shortfall still counts in its job's common move above.)
        cap_bit, reasons_ok = snap.power_cap_holds()
        cap_free = np.where(reasons_ok, ~cap_bit, cy.clear)
        self_score = np.where(self_ok & cap_free, shortfall / margin, 0.0)
        use_self = self_score > strag_score
        return _Part(
            "straggler",
            "sm_clock_mhz",
            cy.clock,
            np.where(use_self, (ce.level - margin) * expected_clock, strag_lo),
            np.where(use_self, ce.level * expected_clock, strag_ref),
            np.nan_to_num(strag_score),
            np.nan_to_num(self_score),
            "clock",
        )

    def _util(self, cy: _Cycle) -> _Part:
        """Utilization far below its baseline while its job runs."""
        s = self.settings
        ue = self.base.expected("util", cy.b)
        use = cy.settled & cy.util_ok & ue.ready
        margin = np.maximum(s.z_threshold * ue.sigma, s.util_drop_pct)
        # (Net of the job's common move: a job's checkpoint or data stall idles all its GPUs.)
        drop = np.where(use, ue.level - cy.util, np.nan)
        cy.excused |= np.nan_to_num(drop / margin) >= 1.0
        cy.util_z = cy.z["util"] = np.where(use, -drop / np.maximum(ue.sigma, 1.0), np.nan)
        drop = _beyond_job(drop, cy, use)
        score = np.where(use, drop / margin, 0.0)
        return _Part(
            "util",
            "util_pct",
            cy.util,
            np.where(use, ue.level - margin, np.nan),
            np.where(use, 100.0, np.nan),
            np.zeros(cy.n),
            np.nan_to_num(score),
            "util",
        )

    def _mv(self, cy: _Cycle) -> DetectorResult:
        feats = np.column_stack([cy.power_z, cy.temp_z, cy.clock_z, cy.util_z])
        cy.feats = feats
        score = self._multivariate(feats)
        thr = self.mv_threshold if np.isfinite(self.mv_threshold) else np.nan
        return DetectorResult(
            "multivariate",
            "mahalanobis2",
            score * np.nan_to_num(thr),
            _nan(cy.n),
            np.full(cy.n, thr),
            score,
        )

    # -- calibration: each GPU's residuals against their own history ------------------------------

    def _calibrate(self, snap: Snapshot, cy: _Cycle) -> None:
        """Each field's standardized residual runs through the streaming detector, per GPU
        (agent.orient.stream): a baseline's statistical flag stands only where the residual is
        also rare for this GPU (its tail probability under `alarm_p`, or its alarm still open),
        so a GPU whose normal life has such swings (checkpoint stalls, bursts) learns them.
        Until a GPU's series has warmed up, the baseline's threshold alone decides."""
        s = self.settings
        if not s.calibrate:
            return
        t = np.full(cy.n, snap.time_s)
        for name, detector in self.stream.items():
            detector.align(snap.uuid)
            z = cy.z.get(name, _nan(cy.n))
            step = detector.update(z, t, np.isfinite(z))
            warm = detector.state["rows"] >= s.calibration_warmup_cycles
            cy.gate[name] = ~warm | (step.p < s.alarm_p) | step.alarm

    # -- combining --------------------------------------------------------------------------------

    def _combine(
        self,
        snap: Snapshot,
        cy: _Cycle,
        ctx: AnomalyContext,
        results: list[DetectorResult],
    ) -> AnomalyFlags:
        explained = ctx.health_severity >= int(HealthSeverity.DRAIN)
        for r in results:
            if r.kind != "dropout":
                r.score[explained] = np.minimum(r.score[explained], 0.0)
            np.nan_to_num(r.score, copy=False, nan=0.0, posinf=1e6, neginf=0.0)
        # The multivariate model speaks only where no single detector saw anything (even one
        # the calibration excused: its residuals are that GPU's normal life).
        single = cy.excused.copy()  # (a threshold crossed with the job's move: the job's)
        for r in results[:-1]:
            single |= (r.score >= 1.0) | cy.raw_fired.get(r.kind, single)
        results[-1].score[single] = np.minimum(results[-1].score[single], 0.999)
        self._rate_limit(snap, cy, results)
        scores = np.stack([r.score for r in results])
        fired = scores >= 1.0
        flagged: BoolArray = np.asarray(fired.any(axis=0), dtype=bool)
        order = [KIND_ORDER.index(r.kind) for r in results]
        rank = np.where(fired, np.asarray(order)[:, None], len(KIND_ORDER))
        first = rank.argmin(axis=0)
        kinds = np.asarray([r.kind for r in results] + [""], dtype=np.str_)
        kind = np.where(flagged, kinds[np.minimum(first, len(results) - 1)], "")
        st = self.gpu.cols
        run = np.where(flagged, st["run"][cy.g] + 1, 0)
        run = np.where(cy.fresh | snap.stale, run, st["run"][cy.g])
        st["run"][cy.g] = run
        flags = AnomalyFlags(
            score=scores.max(axis=0),
            flagged=flagged,
            kind=kind,
            evidence=_Evidence(np.flatnonzero(flagged).astype(np.int64), results),
            persistent=run >= self.settings.persistent_cycles,
        )
        return flags

    def _rate_limit(self, snap: Snapshot, cy: _Cycle, results: list[DetectorResult]) -> None:
        """A GPU opens at most `alarm_burst` new statistical alarms at once, refilled at
        `alarms_per_hour`: beyond, its statistical scores are held under the threshold (hard
        limits, dropouts and health are never held). An alarm already running goes on."""
        s = self.settings
        st = self.gpu.cols
        g = cy.g
        last = st["tokens_t"][g]
        elapsed = np.where(np.isfinite(last), snap.time_s - last, 0.0)
        tokens = np.minimum(
            st["tokens"][g] + np.maximum(elapsed, 0.0) * s.alarms_per_hour / 3600.0,
            s.alarm_burst,
        )
        none = np.zeros(cy.n, dtype=bool)
        statistical = [r for r in results if r.kind in STATISTICAL_KINDS]
        soft = {r.kind: (r.score >= 1.0) & ~cy.hard_fired.get(r.kind, none) for r in statistical}
        new = np.logical_or.reduce([*soft.values(), none]) & (st["run"][g] == 0)
        allowed = tokens >= 1.0
        held = new & ~allowed
        if held.any():
            for r in statistical:
                hold = held & soft[r.kind]
                r.score[hold] = np.minimum(r.score[hold], 0.999)
        self.held_alarms += int(held.sum())
        st["tokens"][g] = np.where(new & allowed, tokens - 1.0, tokens)
        st["tokens_t"][g] = snap.time_s

    # -- models -----------------------------------------------------------------------------------

    def _thermal_residual(
        self,
        snap: Snapshot,
        g: IntArray,
        temp: FloatArray,
        temp_ok: BoolArray,
        power: FloatArray,
        power_ok: BoolArray,
    ) -> tuple[FloatArray, FloatArray, FloatArray, BoolArray]:
        """Per GPU: the relative excess of its thermal response over the pooled model (0 = as
        the fleet; 0.6 = 60% more temperature rise for its draw), the predicted temperature, the
        gain (degrees per unit of relative excess) and where it is defined."""
        st = self.gpu.cols
        n = snap.n_gpus
        dt = snap.time_s - st["prev_t"][g]
        t_prev = st["prev_temp"][g]
        p_prev = st["prev_power"][g]
        base_ok = temp_ok & power_ok & np.isfinite(t_prev) & np.isfinite(p_prev) & (dt > 0)
        # A large step in the draw between samples (a job started or ended in between): the
        # average draw in between is unknown.
        step = np.abs(power - p_prev) > 0.25 * np.fmax(power, p_prev) + 10.0
        usable = base_ok & ~step
        rel = _nan(n)
        pred = _nan(n)
        gain = _nan(n)
        ok = np.zeros(n, dtype=bool)
        # Record samples for the pooled fit (before scoring: they are past data once fit).
        d_prev = st["prev_dtemp"][g]
        self._record_thermal(snap, usable, t_prev, p_prev, power, temp, dt, d_prev)
        for model, coef in self.thermal_coef.items():
            fit_dt = self.thermal_dt[model]
            sel = usable & (snap.model == model) & (np.abs(dt - fit_dt) <= 0.25 * fit_dt)
            if not sel.any():
                continue
            w0, w1, _w2, w3 = coef
            # The draw between the samples lies between them: expect the warmer of the two, so
            # a draw that fell within the interval (a job or spike ending) is no excess.
            hot = np.fmax(power, p_prev)
            pr = w0 + w1 * t_prev + w3 * hot
            gn = w3 * hot
            good = sel & (gn > 0.05)
            pred = np.where(good, pr, pred)
            gain = np.where(good, gn, gain)
            with np.errstate(invalid="ignore", divide="ignore"):
                rel = np.where(good, (temp - pr) / gn, rel)
            ok |= good
        return rel, pred, gain, ok

    def _record_thermal(
        self,
        snap: Snapshot,
        usable: BoolArray,
        t_prev: FloatArray,
        p_prev: FloatArray,
        power: FloatArray,
        temp: FloatArray,
        dt: FloatArray,
        d_prev: FloatArray,
    ) -> None:
        rows = np.flatnonzero(usable)
        if rows.size == 0:
            return
        take = min(rows.size, 256)
        rows = self.rng.choice(rows, size=take, replace=False) if rows.size > take else rows
        block = np.column_stack(
            [t_prev[rows], p_prev[rows], power[rows], temp[rows], dt[rows], d_prev[rows]]
        )
        idx = (self._tbuf_n + np.arange(take)) % THERMAL_BUFFER_ROWS
        self._tbuf[idx] = block
        self._tbuf_model[idx] = snap.model[rows]
        self._tbuf_n += take
        if self.cycle % self.settings.refit_cycles == 1 or not self.thermal_coef:
            self._fit_thermal()

    def _fit_thermal(self) -> None:
        """Fit the pooled first-order model T_now = a T_prev + (1 - a)(ambient + R P_now) in
        two steps that GPU-to-GPU differences in R cannot bias: the decay a from successive
        temperature changes under a steady draw (dT_now = a dT_prev, whatever the GPU's R), then
        ambient and the fleet's mean R by least squares given a."""
        used = min(self._tbuf_n, THERMAL_BUFFER_ROWS)
        if used < 200:
            return
        data = self._tbuf[:used]
        models = self._tbuf_model[:used]
        for model in np.unique(models).tolist():
            rows = data[models == model]
            dt = float(np.median(rows[:, 4]))
            rows = rows[np.abs(rows[:, 4] - dt) <= 0.25 * dt]
            t_prev, p_prev, p_now, t_now, _, d_prev = rows.T
            d_now = t_now - t_prev
            steady_draw = np.abs(p_now - p_prev) < 0.03 * np.fmax(p_now, p_prev) + 5.0
            settling = steady_draw & np.isfinite(d_prev) & (np.abs(d_prev) > 0.5)
            if settling.sum() < 20 or np.ptp(p_now) < 50.0:
                continue  # too little movement to tell the decay from the steady state
            alpha = float(np.median(d_now[settling] / d_prev[settling]))
            if not 0.05 < alpha < 0.98:
                continue  # not a stable first-order response: keep the previous fit
            target = (t_now - alpha * t_prev) / (1.0 - alpha)
            x = np.column_stack([p_now, np.ones(p_now.shape[0])])
            (r_c_per_w, ambient), *_ = np.linalg.lstsq(x, target, rcond=None)
            if r_c_per_w <= 0.0:
                continue
            self.thermal_coef[str(model)] = [
                float((1.0 - alpha) * ambient),
                alpha,
                0.0,
                float((1.0 - alpha) * r_c_per_w),
            ]
            self.thermal_dt[str(model)] = dt

    def _hot_vs_peers(
        self, snap: Snapshot, smooth: FloatArray, power: FloatArray, max_cap: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """Thermal resistance against the median of neighbours at the same load: GPUs of its
        node (and rack, where telemetry names one) whose draw falls in the same band."""
        s = self.settings
        n = snap.n_gpus
        band_w = 0.15 * np.where(np.isfinite(max_cap), max_cap, 700.0)
        # Clamped: the groups are node x band, so one absurd sample (DCGM's blank 2^47 W, an
        # infinity) must not size them; no real draw lies beyond the top band.
        with np.errstate(invalid="ignore"):
            band_f = np.clip(np.nan_to_num(power / band_w), 0.0, HOT_PEER_TOP_BAND)
        band = np.floor(band_f).astype(np.int64)
        bands = int(band.max(initial=0)) + 1
        ok = np.isfinite(smooth) & np.isfinite(power)
        ids = snap.node * bands + band
        node_med, node_cnt = group_median(smooth, ids, ok, snap.n_nodes * bands)
        peer = np.where(node_cnt[ids] >= 3, node_med[ids], np.nan)
        rack = snap.labels.get("rack")
        if rack is not None and rack.shape == (n,):
            rack_ids, names = self.racks.ids(rack)
            rids = rack_ids * bands + band
            rack_med, rack_cnt = group_median(
                smooth, rids, ok & (rack != ""), names.shape[0] * bands
            )
            rack_peer = np.where(rack_cnt[rids] >= 3, rack_med[rids], np.nan)
            peer = np.fmax(peer, rack_peer)  # hotter than both its node and its rack
        score = np.where(ok & np.isfinite(peer), (smooth - peer) / s.hot_peer_excess, 0.0)
        return np.nan_to_num(score), peer

    def _stragglers(
        self,
        snap: Snapshot,
        ok: BoolArray,
        clock: FloatArray,
        power: FloatArray,
        ctx: AnomalyContext,
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        """SM clock against the median of the GPU's job peers, each first brought to what it
        would run at the job's natural draw through the job's curve: peers under a lower cap
        run a lower clock by design, a straggler runs a lower clock at the same draw."""
        s = self.settings
        n = snap.n_gpus
        has_job = ok & (snap.job != "")
        if not has_job.any():
            return np.zeros(n), _nan(n), _nan(n)
        ids, names = self.jobs.ids(snap.job)
        k = names.shape[0]
        known = has_job & ctx.natural_known & np.isfinite(ctx.natural_w)
        natural = group_mean(ctx.natural_w, ids, known, k)
        top = np.full(k, -np.inf)
        np.maximum.at(top, ids[has_job], power[has_job])
        natural = np.where(np.isfinite(natural), natural, top)  # no natural known: the highest
        with np.errstate(invalid="ignore", divide="ignore"):
            x = np.clip(power / natural[ids], 0.05, 1.0)
            t = throughput_at_power(x, 1.0, ctx.curve_a, ctx.curve_b)
            full = np.where(t > 0.05, clock / t, np.nan)
        # ... among peers whose draw is within about 25% of its own (beyond, the curve's own
        # error would show): log-draw bands counted twice, the second shifted by half a band;
        # each GPU takes the grouping that gives it more peers.
        # (Clamped, as the groups are job x band: an absurd sample must not size them.)
        power_b = np.clip(np.nan_to_num(power), 1.0, STRAGGLER_POWER_CEILING_W)
        log_p = np.log(power_b) / np.log(1.25)
        peer_full = _nan(n)
        best = np.zeros(n)
        for shift in (0.0, 0.5):
            band = np.floor(log_p + shift).astype(np.int64)
            bands = int(band.max(initial=0)) + 1
            gid = ids * bands + band
            med, cnt = group_median(full, gid, has_job, k * bands)
            # Of two, the peer is the other one (their median would sit halfway).
            ok_full = has_job & np.isfinite(full)
            total = np.bincount(gid[ok_full], full[ok_full], minlength=k * bands)
            other = np.where(cnt[gid] == 2, total[gid] - np.nan_to_num(full), med[gid])
            better = has_job & (cnt[gid] >= 2) & (cnt[gid] > best)
            peer_full = np.where(better, other, peer_full)
            best = np.where(better, cnt[gid], best)
        with np.errstate(invalid="ignore", divide="ignore"):
            shortfall = 1.0 - full / peer_full
        score = np.where(np.isfinite(shortfall), shortfall / s.straggler_frac, 0.0)
        # Whatever the curve says, a GPU clocked at or above its peers' median straggles not.
        raw, raw_cnt = group_median(clock, ids, has_job, k)
        score = np.where((raw_cnt[ids] >= 2) & (clock >= raw[ids]), 0.0, score)
        peer = peer_full * t  # the peers' clock at this GPU's draw
        return score, peer * (1.0 - s.straggler_frac), peer

    def _multivariate(self, feats: FloatArray) -> FloatArray:
        n = feats.shape[0]
        score = np.zeros(n)
        if not self.settings.multivariate:
            return score
        complete = np.all(np.isfinite(feats), axis=1)
        if self.mv_location is not None and self.mv_precision is not None and complete.any():
            d = np.clip(feats[complete], -50, 50) - self.mv_location
            m2 = np.einsum("ij,jk,ik->i", d, self.mv_precision, d)
            score[complete] = m2 / self.mv_threshold
        return score

    def _fit_multivariate(self) -> None:
        used = min(self._mbuf_n, MV_BUFFER_ROWS)
        if used < 400:
            return
        data = self._mbuf[:used]
        take = min(used, 480)  # above 500 rows MinCovDet switches to a much slower path
        rows = data[self.rng.choice(used, size=take, replace=False)]
        try:
            with single_threaded(), warnings.catch_warnings():
                # A feature constant over the sample (every busy GPU at 100% utilization) makes
                # the covariance singular: MinCovDet warns and uses the pseudo-inverse, which
                # ignores that feature. The univariate baselines still watch it on its own.
                warnings.filterwarnings("ignore", _NOT_FULL_RANK, UserWarning)
                mcd = MinCovDet(random_state=int(self.rng.integers(1 << 30))).fit(rows)
        except (ValueError, np.linalg.LinAlgError):
            return
        precision = np.asarray(mcd.get_precision(), dtype=np.float64)
        if not np.all(np.isfinite(precision)):
            return
        dist = np.asarray(mcd.dist_, dtype=np.float64)
        # Beyond three times the 99.9th percentile of what the fleet normally shows.
        self.mv_location = np.asarray(mcd.location_, dtype=np.float64)
        self.mv_precision = precision
        self.mv_threshold = max(3.0 * float(np.quantile(dist, 0.999)), 30.0)

    # -- learning ---------------------------------------------------------------------------------

    def _learn(
        self, snap: Snapshot, cy: _Cycle, flagged: BoolArray, fired: Mapping[str, BoolArray]
    ) -> None:
        """The baselines learn from what was not flagged; the thermal model's memory and the
        multivariate model's sample move on."""
        s = self.settings
        st = self.gpu.cols
        fresh = snap.fresh
        g, b, power, temp = cy.g, cy.b, cy.power, cy.temp
        quiet = ~flagged & ~cy.excused & (st["sick"][g] == False)  # noqa: E712 (numpy mask)
        age_ok = fresh & np.isfinite(snap.age_s) & ~fired["dropout"] & ~cy.excused
        self.base.update("age", b, snap.age_s, age_ok)
        # The draw's baseline: idle GPUs always, busy ones only while their cap does not bind.
        learn_power = cy.power_ok & quiet & ((cy.busy & ~cy.warming & cy.clear) | ~cy.busy)
        self.base.update("power", b, power, learn_power, floor=s.power_rel_floor * np.abs(power))
        self.base.update(
            "rel_r",
            b,
            cy.rel,
            cy.rel_ok & ~fired["temp"] & ~fired["hot_vs_peers"],
            floor=s.temp_rel_floor,
        )
        self.base.update("clock_r", b, cy.ratio, cy.ratio_ok & quiet, floor=0.01)
        self.base.update("util", b, cy.util, cy.settled & cy.util_ok & quiet, floor=1.0)
        st["rel_smooth"][g] = np.where(fresh, cy.smooth, st["rel_smooth"][g])
        keep = fresh & cy.power_ok & cy.temp_ok
        moved = np.where(np.isfinite(st["prev_t"][g]), temp - st["prev_temp"][g], np.nan)
        st["prev_t"][g[keep]] = snap.time_s
        st["prev_dtemp"][g[keep]] = moved[keep]
        st["prev_temp"][g[keep]] = temp[keep]
        st["prev_power"][g[keep]] = power[keep]
        lost = ~keep
        st["prev_t"][g[lost]] = np.nan
        # Multivariate: learn the normal joint spread of residuals from unflagged GPUs.
        feats = cy.feats
        complete = np.all(np.isfinite(feats), axis=1) & quiet
        rows = np.flatnonzero(complete)
        if rows.size:
            take = min(rows.size, 128)
            rows = self.rng.choice(rows, size=take, replace=False) if rows.size > take else rows
            idx = (self._mbuf_n + np.arange(take)) % MV_BUFFER_ROWS
            self._mbuf[idx] = np.clip(feats[rows], -50, 50)
            self._mbuf_n += take
        if s.multivariate and (
            self.cycle % s.refit_cycles == 0 or (self.mv_location is None and self.cycle % 5 == 0)
        ):
            self._fit_multivariate()


def _newest(buffer: npt.NDArray[Any], written: int, rows: int) -> npt.NDArray[Any]:
    """The newest `rows` entries of a ring buffer, oldest first."""
    size = buffer.shape[0]
    used = min(written, size)
    take = min(used, rows)
    idx = (
        (written - take + np.arange(take)) % size
        if written > size
        else np.arange(used - take, used)
    )
    return buffer[idx]


def _slowdown_temp(models: npt.NDArray[np.str_]) -> FloatArray:
    """Per GPU: its model's slowdown temperature (the H100's where the model is unknown); the
    same read-only array while the models are the same (a fleet's models rarely change, and
    sorting 100,000 names every cycle costs a few hundredths of a second)."""
    with _SLOWDOWN_LOCK:
        last = _SLOWDOWN_CACHE.get("out")
        if last is not None and _SLOWDOWN_MODELS.same(models):
            return last
        out = np.full(models.shape[0], H100_SXM.slowdown_temp_c)
        for name in np.unique(models).tolist():
            spec = next((m for m in BUILTIN_MODELS.values() if m.model_name == name), None)
            if spec is not None:
                out[models == name] = spec.slowdown_temp_c
        _SLOWDOWN_MODELS.remember(models)
        _SLOWDOWN_CACHE["out"] = freeze(out)
        return out


_SLOWDOWN_LOCK = threading.Lock()
_SLOWDOWN_MODELS = LastKeys()
_SLOWDOWN_CACHE: dict[str, FloatArray] = {}


def typical_interval(prev_s: float | None, dt_s: float) -> float:
    """Smoothed cycle interval (s): robust to one late cycle."""
    if prev_s is None or not np.isfinite(prev_s):
        return dt_s
    alpha = float(decay_alpha(1.0, 8.0))
    return float(prev_s + alpha * (np.clip(dt_s, 0.5 * prev_s, 2.0 * prev_s) - prev_s))

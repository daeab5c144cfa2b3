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
  expects at its draw (a straggler slows the whole synchronous job);
- util: utilization far below its baseline while its job runs;
- multivariate: a robust covariance model (scikit-learn's MinCovDet, refit on a schedule from
  recent residuals) flags combinations of residuals no single detector flags.

Scores are normalized per detector: 1.0 is that detector's threshold. A GPU's `score` is the
largest; its `kind` is the highest-ranked detector that fired. Evidence (metric, value, expected
range, score) is built only for flagged GPUs, and only when read. Causal: each cycle scores the
new snapshot against state learned from earlier ones, then learns from what was not flagged.
GPUs whose health already calls for a drain are explained by it: only dropout flags them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.covariance import MinCovDet

from agent.core.curves import throughput_at_power
from agent.core.gpu_models import BUILTIN_MODELS, H100_SXM
from agent.core.keyed import KeyedColumns
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
            }
        )
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

    # -- one cycle --------------------------------------------------------------------------------

    def update(self, snap: Snapshot, ctx: AnomalyContext) -> AnomalyFlags:
        n = snap.n_gpus
        if n == 0:
            self.expected_power_w = np.zeros(0)
            self.uncapped_level_w = np.zeros(0)
            return AnomalyFlags.none(0)
        s = self.settings
        self.cycle += 1
        now = snap.time_s
        self.interval_s = ctx.interval_s
        g = self.gpu.slots(snap.uuid)
        b = self.base.slots(snap.uuid)
        st = self.gpu.cols
        fresh = snap.fresh

        # Context: a job change (or busy/idle change) restarts what the baselines know.
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
            cb = b[changed]
            # (Thermal resistance too: the pooled model's small misfit of the ambient weighs
            # differently at idle and under load.)
            for name in ("power", "clock_r", "util", "rel_r"):
                self.base.reset(name, cb)
        warming = busy & ((now - st["since"][g]) < s.warmup_s)
        settled = busy & ~warming & fresh

        power, power_ok = snap.column(Metric.POWER_W)
        temp, temp_ok = snap.column(Metric.TEMP_C)
        util, util_ok = snap.column(Metric.UTIL_PCT)
        clock, clock_ok = snap.column(Metric.SM_CLOCK_MHZ)
        power_ok &= fresh
        temp_ok &= fresh
        util_ok &= fresh
        clock_ok &= fresh
        cap = ctx.cap_w
        cap_ok = np.isfinite(cap)
        at_max = cap_ok & np.isfinite(ctx.max_cap_w) & (cap >= ctx.max_cap_w - 0.5)
        clear = power_ok & (at_max | (cap_ok & (power < CLEAR_OF_CAP_FRAC * cap)) | ~cap_ok)

        results: list[DetectorResult] = []
        z = s.z_threshold

        # -- dropout ------------------------------------------------------------------------------
        age_e = self.base.expected("age", b)
        seen = np.isfinite(snap.age_s)
        interval = ctx.interval_s
        age_lo = np.where(age_e.ready, age_e.level, np.nan)
        if interval is not None:
            margin = np.maximum(4.0 * age_e.sigma, s.dropout_min_frac * interval)
            age_hi = np.where(age_e.ready, age_e.level + np.maximum(margin, 1.0), np.nan)
        else:
            age_hi = _nan(n)
        with np.errstate(invalid="ignore", divide="ignore"):
            age_score = (snap.age_s - age_lo) / (age_hi - age_lo)
        age_score = np.where(seen & np.isfinite(age_score), age_score, 0.0)
        age_score = np.where(snap.stale, np.maximum(age_score, 1.0), age_score)
        results.append(DetectorResult("dropout", "age_s", snap.age_s, age_lo, age_hi, age_score))

        # -- power: surge above what the cap allows or the baseline expects; drop below it -------
        k = np.where(np.isfinite(ctx.cap_draw_frac), ctx.cap_draw_frac, 0.95)
        over_hi = cap * (1.0 + s.over_cap_tol_frac) + s.over_cap_tol_w
        with np.errstate(invalid="ignore", divide="ignore"):
            over_score = np.where(power_ok & cap_ok, (power - cap) / (over_hi - cap), 0.0)
        pe = self.base.expected("power", b)
        usable_base = pe.ready & ((busy & ~warming) | ~busy) & power_ok
        expect = np.where(busy & cap_ok, np.fmin(pe.level, k * cap), pe.level)
        sigma_p = np.maximum(pe.sigma, s.power_rel_floor * np.abs(expect))
        sigma_p = np.maximum(sigma_p, 1.0)
        with np.errstate(invalid="ignore"):
            surge_base = np.where(usable_base, (power - expect) / (z * sigma_p), 0.0)
        surge = np.maximum(np.nan_to_num(over_score), np.nan_to_num(surge_base))
        surge_hi = np.where(usable_base, expect + z * sigma_p, over_hi)
        surge_hi = np.where(over_score >= 1.0, np.fmin(surge_hi, over_hi), surge_hi)
        results.append(
            DetectorResult(
                "power",
                "power_w",
                power,
                np.where(usable_base, expect - z * sigma_p, np.nan),
                surge_hi,
                surge,
            )
        )
        power_z = np.where(usable_base & busy, (power - expect) / sigma_p, np.nan)
        self.uncapped_level_w = np.where(pe.ready & busy & ~warming, pe.level, np.nan)
        # The noise-free draw expected now (for the forecasts): the baseline under the current
        # cap, or the cap's share where the cap binds and the baseline is not known.
        binding = busy & ~warming & cap_ok & power_ok & ~clear
        self.expected_power_w = np.where(
            usable_base, expect, np.where(binding & ctx.cap_frac_known, k * cap, np.nan)
        )
        # A drop only where the cap cannot explain it (the baseline is the uncapped draw).
        drop_ok = usable_base & busy & (expect >= pe.level - 1e-9)
        drop = np.where(drop_ok, (expect - power) / (z * sigma_p), 0.0)
        results.append(
            DetectorResult(
                "power_drop",
                "power_w",
                power,
                np.where(drop_ok, expect - z * sigma_p, np.nan),
                np.where(drop_ok, expect + z * sigma_p, np.nan),
                np.nan_to_num(drop),
            )
        )

        # -- temperature: thermal resistance against the pooled model and its own baseline ------
        rel, pred, gain, rel_ok = self._thermal_residual(snap, g, temp, temp_ok, power, power_ok)
        re = self.base.expected("rel_r", b, floor=s.temp_rel_floor)
        temp_use = rel_ok & re.ready
        temp_z = np.where(temp_use, (rel - re.level) / re.sigma, np.nan)
        temp_score = np.where(temp_use, temp_z / z, 0.0)
        # At the hardware's slowdown temperature the GPU throttles, whatever the model says.
        slowdown = _slowdown_temp(snap.model)
        hot_hi = slowdown - 2.0
        throttling = temp_ok & (temp >= hot_hi)
        temp_score = np.where(
            throttling, np.maximum(temp_score, 1.0 + (temp - hot_hi) / 5.0), temp_score
        )
        results.append(
            DetectorResult(
                "temp",
                "temp_c",
                temp,
                np.where(temp_use, pred + (re.level - z * re.sigma) * gain, np.nan),
                np.where(
                    temp_use, np.fmin(pred + (re.level + z * re.sigma) * gain, hot_hi), hot_hi
                ),
                np.nan_to_num(temp_score),
            )
        )
        # Hotter than its neighbours at the same load: smoothed resistance vs node/rack median.
        prev_smooth = st["rel_smooth"][g]
        smooth = np.where(
            rel_ok,
            np.where(np.isfinite(prev_smooth), 0.5 * prev_smooth + 0.5 * rel, rel),
            prev_smooth,
        )
        smooth = np.where(fresh, smooth, np.nan)
        hot_score, peer_level = self._hot_vs_peers(snap, smooth, power, ctx.max_cap_w)
        results.append(
            DetectorResult(
                "hot_vs_peers",
                "thermal_resistance_rel",
                smooth,
                _nan(n),
                peer_level + s.hot_peer_excess,
                hot_score,
            )
        )

        # -- straggler: clock vs job peers, and vs its own curve at its draw ----------------------
        # Peers start and ramp up together: they compare from the first cycle of their job.
        strag_score, strag_lo, strag_ref = self._stragglers(
            snap, busy & fresh & clock_ok & power_ok, clock, power, ctx
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            x = np.clip(power / ctx.natural_w, 0.0, 1.0)
            expected_clock = ctx.natural_clock_mhz * throughput_at_power(
                x, 1.0, ctx.curve_a, ctx.curve_b
            )
            ratio = clock / expected_clock
        # Only near the natural draw: deep under a cap the curve's error exceeds the margin.
        ratio_ok = (
            settled & clock_ok & power_ok & np.isfinite(ratio) & ctx.natural_known & (x >= 0.75)
        )
        ce = self.base.expected("clock_r", b, floor=0.01)
        self_ok = ratio_ok & ce.ready
        self_margin = np.maximum(z * ce.sigma, s.straggler_self_frac)
        self_score = np.where(self_ok, (ce.level - ratio) / self_margin, 0.0)
        clock_z = np.where(self_ok, (ratio - ce.level) / ce.sigma, np.nan)
        use_self = self_score > strag_score
        results.append(
            DetectorResult(
                "straggler",
                "sm_clock_mhz",
                clock,
                np.where(use_self, (ce.level - self_margin) * expected_clock, strag_lo),
                np.where(use_self, ce.level * expected_clock, strag_ref),
                np.maximum(strag_score, np.nan_to_num(self_score)),
            )
        )

        # -- utilization drop ---------------------------------------------------------------------
        ue = self.base.expected("util", b)
        util_use = settled & util_ok & ue.ready
        util_margin = np.maximum(z * ue.sigma, s.util_drop_pct)
        util_score = np.where(util_use, (ue.level - util) / util_margin, 0.0)
        util_z = np.where(util_use, (util - ue.level) / np.maximum(ue.sigma, 1.0), np.nan)
        results.append(
            DetectorResult(
                "util",
                "util_pct",
                util,
                np.where(util_use, ue.level - util_margin, np.nan),
                np.where(util_use, 100.0, np.nan),
                np.nan_to_num(util_score),
            )
        )

        # -- multivariate -------------------------------------------------------------------------
        feats = np.column_stack([power_z, temp_z, clock_z, util_z])
        mv_score = self._multivariate(feats)
        results.append(
            DetectorResult(
                "multivariate",
                "mahalanobis2",
                mv_score * (self.mv_threshold if np.isfinite(self.mv_threshold) else 0.0),
                _nan(n),
                np.full(n, self.mv_threshold if np.isfinite(self.mv_threshold) else np.nan),
                mv_score,
            )
        )

        # -- combine ------------------------------------------------------------------------------
        explained = ctx.health_severity >= int(HealthSeverity.DRAIN)
        for r in results:
            if r.kind != "dropout":
                r.score[explained] = np.minimum(r.score[explained], 0.0)
            np.nan_to_num(r.score, copy=False, nan=0.0, posinf=1e6, neginf=0.0)
        # The multivariate model speaks only where no single detector does.
        single = np.zeros(n, dtype=bool)
        for r in results[:-1]:
            single |= r.score >= 1.0
        results[-1].score[single] = np.minimum(results[-1].score[single], 0.999)

        scores = np.stack([r.score for r in results])
        score = scores.max(axis=0)
        fired = scores >= 1.0
        flagged: BoolArray = np.asarray(fired.any(axis=0), dtype=bool)
        order = [KIND_ORDER.index(r.kind) for r in results]
        rank = np.where(fired, np.asarray(order)[:, None], len(KIND_ORDER))
        first = rank.argmin(axis=0)
        kinds = np.asarray([r.kind for r in results] + [""], dtype=np.str_)
        kind = np.where(flagged, kinds[np.minimum(first, len(results) - 1)], "")

        run = np.where(flagged, st["run"][g] + 1, 0)
        run = np.where(fresh | snap.stale, run, st["run"][g])
        st["run"][g] = run
        persistent = run >= s.persistent_cycles

        # -- learn from what was not flagged ------------------------------------------------------
        self._learn(
            snap=snap,
            g=g,
            b=b,
            flagged=flagged,
            fired={r.kind: r.score >= 1.0 for r in results},
            busy=busy,
            warming=warming,
            settled=settled,
            clear=clear,
            power=power,
            power_ok=power_ok,
            temp=temp,
            temp_ok=temp_ok,
            util=util,
            util_ok=util_ok,
            rel=rel,
            rel_ok=rel_ok,
            smooth=smooth,
            ratio=ratio,
            ratio_ok=ratio_ok,
            feats=feats,
        )
        rows = np.flatnonzero(flagged).astype(np.int64)
        return AnomalyFlags(
            score=score,
            flagged=flagged,
            kind=kind,
            evidence=_Evidence(rows, results),
            persistent=persistent,
        )

    # -- detectors --------------------------------------------------------------------------------

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
        self,
        *,
        snap: Snapshot,
        g: IntArray,
        b: IntArray,
        flagged: BoolArray,
        fired: Mapping[str, BoolArray],
        busy: BoolArray,
        warming: BoolArray,
        settled: BoolArray,
        clear: BoolArray,
        power: FloatArray,
        power_ok: BoolArray,
        temp: FloatArray,
        temp_ok: BoolArray,
        util: FloatArray,
        util_ok: BoolArray,
        rel: FloatArray,
        rel_ok: BoolArray,
        smooth: FloatArray,
        ratio: FloatArray,
        ratio_ok: BoolArray,
        feats: FloatArray,
    ) -> None:
        s = self.settings
        st = self.gpu.cols
        fresh = snap.fresh
        quiet = ~flagged & (st["sick"][g] == False)  # noqa: E712 (numpy mask)
        age_ok = fresh & np.isfinite(snap.age_s) & ~fired["dropout"]
        self.base.update("age", b, snap.age_s, age_ok)
        # The draw's baseline: idle GPUs always, busy ones only while their cap does not bind.
        learn_power = power_ok & quiet & ((busy & ~warming & clear) | ~busy)
        self.base.update("power", b, power, learn_power, floor=s.power_rel_floor * np.abs(power))
        self.base.update(
            "rel_r",
            b,
            rel,
            rel_ok & ~fired["temp"] & ~fired["hot_vs_peers"],
            floor=s.temp_rel_floor,
        )
        self.base.update("clock_r", b, ratio, ratio_ok & quiet, floor=0.01)
        self.base.update("util", b, util, settled & util_ok & quiet, floor=1.0)
        st["rel_smooth"][g] = np.where(fresh, smooth, st["rel_smooth"][g])
        keep = fresh & power_ok & temp_ok
        moved = np.where(np.isfinite(st["prev_t"][g]), temp - st["prev_temp"][g], np.nan)
        st["prev_t"][g[keep]] = snap.time_s
        st["prev_dtemp"][g[keep]] = moved[keep]
        st["prev_temp"][g[keep]] = temp[keep]
        st["prev_power"][g[keep]] = power[keep]
        lost = ~keep
        st["prev_t"][g[lost]] = np.nan
        # Multivariate: learn the normal joint spread of residuals from unflagged GPUs.
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
    """Per GPU: its model's slowdown temperature (the H100's where the model is unknown)."""
    out = np.full(models.shape[0], H100_SXM.slowdown_temp_c)
    for name in np.unique(models).tolist():
        spec = next((m for m in BUILTIN_MODELS.values() if m.model_name == name), None)
        if spec is not None:
            out[models == name] = spec.slowdown_temp_c
    return out


def typical_interval(prev_s: float | None, dt_s: float) -> float:
    """Smoothed cycle interval (s): robust to one late cycle."""
    if prev_s is None or not np.isfinite(prev_s):
        return dt_s
    alpha = float(decay_alpha(1.0, 8.0))
    return float(prev_s + alpha * (np.clip(dt_s, 0.5 * prev_s, 2.0 * prev_s) - prev_s))

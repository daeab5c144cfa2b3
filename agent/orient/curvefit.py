"""Learned power curves: each job's throughput-vs-power curve, online, from what the loop sees.

The family is agent.core.curves': relative throughput T(x) = 1 - a (1 - x)^b at a share x of the
job's natural draw. With the SM clock as the throughput proxy (DVFS lowers the clock when a power
cap binds, and throughput follows the clock for compute-bound work):

- a GPU's *natural clock* is its clock while its cap does not bind (after its job's start-up);
- under a cap, x = draw / natural draw and T = clock / natural clock, both per GPU, averaged over
  the job's GPUs each cycle (one observation per job and cycle);
- log(1 - T) = log a + b log(1 - x) is linear in (log a, b): a conjugate Bayesian linear
  regression per job, columnar over jobs (2 x 2 posteriors in closed form), with the prior of the
  job's GPU model and workload class, and old observations fading slowly.

Only observations that say something count: 0.3 < x < 0.95 (near x = 1 the curve is flat and the
noise is all there is), after the start-up (a ramping job's draw is not its natural draw), with
the natural draw known (a capped GPU's draw is only a lower bound of its natural draw, so a GPU
never seen uncapped teaches nothing), and never from GPUs flagged as anomalous.

`confidence` is 1 - (posterior / prior) predictive spread of log(1 - T) at x = 0.75: 0 is the prior,
1 is certain. When a job ends, its curve (posterior mean and covariance), its natural draw and its
cap-draw share also join its class's statistics (`class_stats`), from which `class_curves` gives
each class's curve with an interval: the spread of its jobs' curves plus their own uncertainty
(what `ooda curves export` writes).

Priors per (GPU model, workload class) are learned from the jobs already learned (their
posteriors, weighted by confidence, when the job ends); the class is the job's `workload` label
where telemetry carries one, else a signature of what it looks like (memory-copy utilization and
natural draw, in bins); a class nothing was learned for falls back to the GPU
model's pooled prior, then to the conservative built-in prior. GPUs without a job label are
their own job while busy.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.core.curves import MIN_EXPONENT
from agent.core.keyed import KeyedColumns, freeze
from agent.core.snapshot import Metric, Snapshot
from agent.orient.settings import CurveSettings
from agent.orient.stats import Grouper

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

PRIOR_SD_LOG_A = 0.5
PRIOR_SD_B = 0.35
X_REF = 0.75
MODEL_ERR_LOG = 0.05  # misfit of the family, in log(1 - T): keeps one cap from being "certain"
CLEAR_OF_CAP_FRAC = 0.75
MIN_PRIOR_WEIGHT = 1.5  # confidence-weighted jobs behind a learned prior before it is used
DRAW_EMA = 0.2  # weight of a cycle's natural draw and cap-draw share in a job's running means

# class_stats layout: per (model, class), sums over its ended jobs (weights: their confidence).
(
    CS_W, CS_LA, CS_B, CS_LA2, CS_LAB, CS_B2, CS_VLA, CS_CAB, CS_VB,
    CS_NAT_N, CS_NAT, CS_NAT2, CS_K_N, CS_K, CS_K2, CS_JOBS,
) = range(16)  # fmt: skip
CLASS_STATS_LEN = 16


@dataclass(frozen=True, slots=True)
class ClassCurve:
    """A workload class's learned curve on one GPU model (from the jobs that ended)."""

    model: str
    klass: str
    log_a: float
    b: float
    cov: tuple[float, float, float]  # (var log a, cov, var b): spread of its jobs + their own
    confidence: float
    natural_w: float  # NaN: never seen uncapped
    cap_draw_frac: float  # NaN: never seen under a binding cap
    jobs: int
    natural_sd_w: float = 0.0  # spread of its jobs' natural draws
    cap_draw_sd: float = 0.0  # ... and of their cap-draw shares

    def interval(self, share: FloatArray, z: float = 2.0) -> tuple[FloatArray, FloatArray]:
        """(low, high) relative throughput at shares of the natural draw, z standard deviations
        of log(1 - T) either side."""
        x = np.clip(share, 0.0, 1.0 - 1e-9)
        u = np.log1p(-x)
        v = self.log_a + self.b * u
        var_la, cov, var_b = self.cov
        sd = np.sqrt(np.maximum(var_la + 2.0 * u * cov + u * u * var_b, 0.0))
        lo = np.clip(1.0 - np.exp(v + z * sd), 0.0, 1.0)
        hi = np.clip(1.0 - np.exp(v - z * sd), 0.0, 1.0)
        lo = np.where(share >= 1.0, 1.0, lo)
        hi = np.where(share >= 1.0, 1.0, hi)
        return np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class CurveView:
    """Per snapshot row."""

    a: FloatArray
    b: FloatArray
    confidence: FloatArray
    source: npt.NDArray[np.str_]  # "learned", "class_prior", "model_prior" or "prior"
    natural_clock_mhz: FloatArray
    job_key: npt.NDArray[np.str_]


def job_keys(snapshot: Snapshot, busy: BoolArray) -> npt.NDArray[np.str_]:
    """A GPU's job: its label, or the GPU itself while busy without one ("" when idle)."""
    own = np.flatnonzero((snapshot.job == "") & busy)
    if not own.size:
        return snapshot.job  # (no copy: widening 100,000 strings costs more than the rest)
    # As np.where(own, job_key, job), copying only the own rows' keys.
    out = snapshot.job.astype(snapshot.job_key.dtype)
    out[own] = snapshot.job_key[own]
    return out


class CurveLearner:
    def __init__(
        self,
        settings: CurveSettings | None = None,
        prior_a: float = 1.13,
        prior_b: float = 1.65,
        warmup_s: float = 180.0,
    ) -> None:
        self.settings = settings or CurveSettings()
        self.prior_a = prior_a
        self.prior_b = prior_b
        self.warmup_s = warmup_s
        self.gpus = KeyedColumns(
            {
                "job": (np.int64, 0),  # string_hash of the job key
                "since": (np.float64, np.nan),
                "nc": (np.float64, np.nan),  # natural SM clock
            }
        )
        self.jobs = KeyedColumns(
            {
                "model": ("U64", ""),
                "klass": ("U64", ""),
                "s0": (np.float64, 0.0),
                "s1": (np.float64, 0.0),
                "s2": (np.float64, 0.0),
                "sy": (np.float64, 0.0),
                "suy": (np.float64, 0.0),
                "n_obs": (np.int64, 0),
                "last_t": (np.float64, np.nan),
                "retired": (np.bool_, False),
                # The job's prior, cached until the priors or the job's class change.
                "prior_la": (np.float64, np.nan),
                "prior_b": (np.float64, np.nan),
                "prior_src": ("U16", ""),
                "prior_ver": (np.int64, -1),
                # Running means of the job's natural draw and cap-draw share (NaN: not seen).
                "nat_w": (np.float64, np.nan),
                "cap_k": (np.float64, np.nan),
            }
        )
        self._prior_version = 0
        # (model, class) -> [weight, weight * log a, weight * b]; class "*" pools the model.
        self.priors: dict[str, list[float]] = {}
        # (model, class) -> CLASS_STATS_LEN sums over its ended jobs (see class_curves).
        self.class_stats: dict[str, list[float]] = {}
        self._grouper = Grouper()
        self._models = Grouper()
        self._last_keys: tuple[weakref.ref[Snapshot], BoolArray, npt.NDArray[np.str_]] | None = None
        self.cycles = 0

    # -- state ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpus": self.gpus.to_dict(),
            "jobs": self.jobs.to_dict(),
            "priors": self.priors,
            "class_stats": self.class_stats,
            "cycles": self.cycles,
        }

    def load_dict(self, data: Mapping[str, Any]) -> None:
        self.gpus.load_dict(data.get("gpus", {}))
        self.jobs.load_dict(data.get("jobs", {}))
        self.priors = {str(k): [float(x) for x in v] for k, v in data.get("priors", {}).items()}
        self.class_stats = {
            str(k): [float(x) for x in v]
            for k, v in data.get("class_stats", {}).items()
            if len(v) == CLASS_STATS_LEN
        }
        self._prior_version += 1  # cached priors no longer apply
        self.cycles = int(data.get("cycles", 0))

    # -- priors -----------------------------------------------------------------------------------

    def prior_for(self, model: str, klass: str) -> tuple[float, float, str]:
        """(log a, b, source) of the prior for a job of this GPU model and class."""
        for key, source in ((f"{model}|{klass}", "class_prior"), (f"{model}|*", "model_prior")):
            if klass == "" and source == "class_prior":
                continue
            entry = self.priors.get(key)
            if entry is not None and entry[0] >= MIN_PRIOR_WEIGHT:
                return entry[1] / entry[0], entry[2] / entry[0], source
        return float(np.log(self.prior_a)), self.prior_b, "prior"

    def _commit(self, model: str, klass: str, log_a: float, b: float, weight: float) -> None:
        keys = [f"{model}|*"] + ([f"{model}|{klass}"] if klass else [])
        self._prior_version += 1
        for key in keys:
            entry = self.priors.setdefault(key, [0.0, 0.0, 0.0])
            entry[0] += weight
            entry[1] += weight * log_a
            entry[2] += weight * b

    # -- posterior --------------------------------------------------------------------------------

    def _posterior(
        self, slots: IntArray
    ) -> tuple[FloatArray, FloatArray, FloatArray, npt.NDArray[np.str_]]:
        """(a, b, confidence, source) for the given job slots."""
        jc = self.jobs.cols
        stale = slots[jc["prior_ver"][slots] != self._prior_version]
        if stale.size:
            pairs = np.char.add(np.char.add(jc["model"][stale], "|"), jc["klass"][stale])
            uniq, inverse = np.unique(pairs, return_inverse=True)
            for i, pair in enumerate(uniq.tolist()):  # a few (model, class) pairs
                model, _, klass = str(pair).partition("|")
                la, bb, source = self.prior_for(model, klass)
                sel = stale[inverse == i]
                jc["prior_la"][sel], jc["prior_b"][sel], jc["prior_src"][sel] = la, bb, source
            jc["prior_ver"][stale] = self._prior_version
        mu_a = jc["prior_la"][slots]
        mu_b = jc["prior_b"][slots]
        src = jc["prior_src"][slots]
        p_a = 1.0 / PRIOR_SD_LOG_A**2
        p_b = 1.0 / PRIOR_SD_B**2
        l00 = p_a + jc["s0"][slots]
        l01 = jc["s1"][slots]
        l11 = p_b + jc["s2"][slots]
        e0 = p_a * mu_a + jc["sy"][slots]
        e1 = p_b * mu_b + jc["suy"][slots]
        det = l00 * l11 - l01 * l01
        theta0 = (l11 * e0 - l01 * e1) / det
        theta1 = (l00 * e1 - l01 * e0) / det
        u = np.log(1.0 - X_REF)
        var_post = (l11 - 2.0 * u * l01 + u * u * l00) / det
        var_prior = PRIOR_SD_LOG_A**2 + u * u * PRIOR_SD_B**2
        conf = np.clip(1.0 - np.sqrt(np.maximum(var_post, 0.0) / var_prior), 0.0, 1.0)
        a = np.clip(np.exp(theta0), 0.02, 2.5)
        b = np.clip(theta1, MIN_EXPONENT, 3.0)
        learned = conf >= self.settings.learned_confidence
        src = np.where(learned, "learned", src)
        return a, b, conf, src.astype(np.str_)

    def _posterior_cov(self, slots: IntArray) -> tuple[FloatArray, FloatArray, FloatArray]:
        """(var log a, cov, var b) of the given jobs' posteriors (their priors as cached)."""
        jc = self.jobs.cols
        l00 = 1.0 / PRIOR_SD_LOG_A**2 + jc["s0"][slots]
        l01 = jc["s1"][slots]
        l11 = 1.0 / PRIOR_SD_B**2 + jc["s2"][slots]
        det = l00 * l11 - l01 * l01
        return l11 / det, -l01 / det, l00 / det

    # -- per cycle --------------------------------------------------------------------------------

    def view(self, snapshot: Snapshot, busy: BoolArray) -> CurveView:
        """The current estimate per GPU (no learning)."""
        keys = self._keys(snapshot, busy)
        g = self.gpus.slots(snapshot.uuid)
        # Per job, not per GPU: look each job up once, then spread over its GPUs (a job not
        # known: the built-in prior).
        ids, names = self._grouper.ids(keys)
        name_slot, name_found = self.jobs.lookup(names)
        hit = np.flatnonzero(name_found & (names != ""))
        per_a = np.full(names.shape[0], self.prior_a)
        per_b = np.full(names.shape[0], self.prior_b)
        per_c = np.zeros(names.shape[0])
        per_s = np.full(names.shape[0], "prior", dtype="U16")
        if hit.size:
            pa, pb, pc, ps = self._posterior(name_slot[hit])
            per_a[hit], per_b[hit], per_c[hit], per_s[hit] = pa, pb, pc, ps
        a, b, conf, source = per_a[ids], per_b[ids], per_c[ids], per_s[ids]
        found = np.zeros(names.shape[0], dtype=bool)
        found[hit] = True
        unknown = ~found[ids] & busy
        if unknown.any():
            # Jobs not seen yet: the prior of their GPU model (pooled over classes).
            for model in np.unique(snapshot.model[unknown]).tolist():
                la, bb, src = self.prior_for(str(model), "")
                sel = unknown & (snapshot.model == model)
                a[sel], b[sel], source[sel] = np.exp(la), bb, src
        same_job = self.gpus.cols["job"][g] == self._grouper.hashes(keys)
        nc = np.where(same_job, self.gpus.cols["nc"][g], np.nan)
        return CurveView(
            a=a,
            b=np.maximum(b, MIN_EXPONENT),
            confidence=conf,
            source=source,
            natural_clock_mhz=nc,
            job_key=keys,
        )

    def _keys(self, snapshot: Snapshot, busy: BoolArray) -> npt.NDArray[np.str_]:
        """`job_keys`, made once per snapshot and busy mask (a cycle asks two or three times),
        read-only, so the groupers know them again by identity."""
        last = self._last_keys
        if last is not None and last[0]() is snapshot and np.array_equal(last[1], busy):
            return last[2]
        keys = job_keys(snapshot, busy)
        if keys is not snapshot.job:
            keys = freeze(keys)
        self._last_keys = (weakref.ref(snapshot), busy.copy(), keys)  # (not kept alive here)
        return keys

    def update(
        self,
        snapshot: Snapshot,
        busy: BoolArray,
        natural_w: FloatArray,
        natural_known: BoolArray,
        max_cap_w: FloatArray,
        exclude: BoolArray,
        cap_draw_frac: FloatArray | None = None,
    ) -> CurveView:
        """Learn from this snapshot (rows in `exclude` teach nothing), then the estimates.

        `cap_draw_frac`: per GPU, its learned draw / limit under a binding cap. Where the cap
        binds and that is known, the share of the natural draw is taken from the cap (k x cap /
        natural) rather than from the noisy draw of one cycle: noise in the regressor would bend
        the fitted exponent towards flat (errors in variables), while the cap is exact."""
        if snapshot.n_gpus == 0:
            return self.view(snapshot, busy)
        self.cycles += 1
        now = snapshot.time_s
        keys = self._keys(snapshot, busy)
        g, key_hash, warming = self._gpu_jobs(snapshot, busy, keys)
        gc = self.gpus.cols
        fresh = snapshot.fresh
        power, power_ok = snapshot.column(Metric.POWER_W)
        clock, clock_ok = snapshot.column(Metric.SM_CLOCK_MHZ)
        limit, limit_ok = snapshot.column(Metric.POWER_LIMIT_W)
        ok = fresh & busy & ~warming & power_ok & clock_ok & ~exclude & (keys != "")
        at_max = limit_ok & np.isfinite(max_cap_w) & (limit >= max_cap_w - 0.5)
        clear = at_max | (limit_ok & (power < CLEAR_OF_CAP_FRAC * limit))

        # Natural clock: the clock while the cap does not bind.
        learn_nc = ok & clear & (clock > 0)
        s_nc = g[learn_nc]
        old = gc["nc"][s_nc]
        gc["nc"][s_nc] = np.where(np.isnan(old), clock[learn_nc], 0.7 * old + 0.3 * clock[learn_nc])

        self._register_jobs(
            snapshot, busy, keys, (natural_w, natural_known, max_cap_w), cap_draw_frac
        )

        # Observations: one per job and cycle, the mean over its GPUs.
        nc = np.where(gc["job"][g] == key_hash, gc["nc"][g], np.nan)
        obs = ok & natural_known & np.isfinite(natural_w) & np.isfinite(nc) & (natural_w > 0)
        if obs.any():
            x = np.clip(power / natural_w, 0.0, 1.0)
            if cap_draw_frac is not None:
                k_ok = limit_ok & ~clear & np.isfinite(cap_draw_frac) & (cap_draw_frac > 0.5)
                x_cap = np.clip(
                    np.where(k_ok, cap_draw_frac, 1.0)
                    * np.where(limit_ok, limit, np.nan)
                    / natural_w,
                    0.0,
                    1.0,
                )
                x = np.where(k_ok, x_cap, x)
            self._observe(keys, obs, x, clock / nc)

        self._retire(now)
        return self.view(snapshot, busy)

    def _gpu_jobs(
        self, snapshot: Snapshot, busy: BoolArray, keys: npt.NDArray[np.str_]
    ) -> tuple[IntArray, IntArray, BoolArray]:
        """Each GPU's slot, its job's hash (a GPU whose job changed starts afresh) and whether
        its job is still warming up."""
        now = snapshot.time_s
        g = self.gpus.slots(snapshot.uuid)
        gc = self.gpus.cols
        key_hash = self._grouper.hashes(keys)
        changed = snapshot.fresh & (gc["job"][g] != key_hash)
        c = g[changed]
        gc["job"][c] = key_hash[changed]
        gc["since"][c] = np.where(busy[changed], now, np.nan)
        gc["nc"][c] = np.nan
        warming = busy & ((now - gc["since"][g]) < self.warmup_s)
        return g, key_hash, warming

    def _register_jobs(
        self,
        snapshot: Snapshot,
        busy: BoolArray,
        keys: npt.NDArray[np.str_],
        draws: tuple[FloatArray, BoolArray, FloatArray],
        cap_draw_frac: FloatArray | None,
    ) -> None:
        """Register and refresh this cycle's jobs, classify them, fold in their draws; every
        job's evidence fades a little (the job may change phase)."""
        natural_w, natural_known, max_cap_w = draws
        active = snapshot.fresh & (keys != "") & busy
        ids, names = self._grouper.ids(keys)
        if active.any():
            named = names != ""
            name_slot = np.zeros(names.shape[0], dtype=np.int64)
            name_slot[named] = self.jobs.slots(names[named])
            jslot = name_slot[ids[active]]
        else:
            jslot = np.zeros(0, dtype=np.int64)
        jc = self.jobs.cols
        for col in ("s0", "s1", "s2", "sy", "suy"):
            jc[col] *= self.settings.forget_per_cycle
        if active.any():
            jc["last_t"][jslot] = snapshot.time_s
            jc["retired"][jslot] = False
            new_model = self._model_changed(snapshot, active, jslot)
            jc["model"][jslot[new_model]] = snapshot.model[active][new_model]
            jc["prior_ver"][jslot[new_model]] = -1
            self._classify(snapshot, active, jslot, natural_w, natural_known, max_cap_w)
            self._job_draws(active, jslot, natural_w, natural_known, cap_draw_frac)

    def _observe(
        self, keys: npt.NDArray[np.str_], obs: BoolArray, x: FloatArray, t: FloatArray
    ) -> None:
        """One observation per job this cycle: the mean share of its natural draw `x` and of
        its natural clock `t` over its GPUs in `obs`, into its posterior's sums."""
        ids, names = self._grouper.ids(keys)
        m = np.bincount(ids[obs], minlength=names.shape[0]).astype(np.float64)
        sx = np.bincount(ids[obs], weights=x[obs], minlength=names.shape[0])
        stt = np.bincount(ids[obs], weights=t[obs], minlength=names.shape[0])
        has = m > 0
        xm = sx[has] / m[has]
        tm = stt[has] / m[has]
        cnt = m[has]
        good = (xm > 0.3) & (xm < 0.95) & (tm > 0.05) & (tm < 0.998)
        if not good.any():
            return
        slot = self.jobs.slots(names[has][good])
        jc = self.jobs.cols
        xm, tm, cnt = xm[good], tm[good], cnt[good]
        u = np.log1p(-xm)
        v = np.log1p(-tm)
        b_now = np.clip(self._posterior(slot)[1], MIN_EXPONENT, 3.0)
        var_u = (0.02 * xm / (1.0 - xm)) ** 2 / cnt
        var_v = (0.005 / (1.0 - tm)) ** 2 / cnt
        w = 1.0 / (var_v + b_now**2 * var_u + MODEL_ERR_LOG**2)
        np.add.at(jc["s0"], slot, w)
        np.add.at(jc["s1"], slot, w * u)
        np.add.at(jc["s2"], slot, w * u * u)
        np.add.at(jc["sy"], slot, w * v)
        np.add.at(jc["suy"], slot, w * u * v)
        np.add.at(jc["n_obs"], slot, 1)

    def _job_draws(
        self,
        active: BoolArray,
        jslot: IntArray,
        natural_w: FloatArray,
        natural_known: BoolArray,
        cap_draw_frac: FloatArray | None,
    ) -> None:
        """Fold this cycle's natural draws and cap-draw shares into each job's running means
        (the mean over the job's GPUs where known)."""
        jc = self.jobs.cols
        n_jobs = jc["nat_w"].shape[0]
        columns = [("nat_w", natural_w, natural_known[active] & np.isfinite(natural_w[active]))]
        if cap_draw_frac is not None:
            k = cap_draw_frac[active]
            columns.append(("cap_k", cap_draw_frac, np.isfinite(k) & (k > 0.5) & (k <= 1.0)))
        for name, values, ok in columns:
            if not ok.any():
                continue
            count = np.bincount(jslot[ok], minlength=n_jobs)
            total = np.bincount(jslot[ok], weights=values[active][ok], minlength=n_jobs)
            seen = np.flatnonzero(count)
            mean = total[seen] / count[seen]
            old = jc[name][seen]
            jc[name][seen] = np.where(np.isnan(old), mean, (1 - DRAW_EMA) * old + DRAW_EMA * mean)

    def _model_changed(self, snapshot: Snapshot, active: BoolArray, jslot: IntArray) -> BoolArray:
        """Per active GPU: is its job's GPU model not the GPU's? Compared per job where the
        fleet has one model (copying 100,000 wide strings to compare them costs more)."""
        models = self._models.ids(snapshot.model)[1]
        if models.shape[0] == 1:
            return np.asarray((self.jobs.cols["model"] != models[0])[jslot], dtype=bool)
        return np.asarray(self.jobs.cols["model"][jslot] != snapshot.model[active], dtype=bool)

    def _classify(
        self,
        snapshot: Snapshot,
        active: BoolArray,
        jslot: IntArray,
        natural_w: FloatArray,
        natural_known: BoolArray,
        max_cap_w: FloatArray,
    ) -> None:
        jc = self.jobs.cols
        label = snapshot.labels.get(self.settings.workload_label)
        if label is not None and label.shape == (snapshot.n_gpus,):
            named = active & (label != "")
            lab = label[active]
            has = lab != ""
            new = jc["klass"][jslot[has]] != np.char.add("w:", lab[has])
            jc["klass"][jslot[has][new]] = np.char.add("w:", lab[has][new])
            jc["prior_ver"][jslot[has][new]] = -1
            if named.all():
                return
        # A signature from telemetry, fixed once the job's natural draw is known.
        mem, mem_ok = snapshot.column(Metric.MEM_UTIL_PCT)
        sel = active & natural_known & mem_ok & np.isfinite(natural_w) & np.isfinite(max_cap_w)
        unset = (jc["klass"] == "")[jslot]  # (per job, then per GPU: no wide strings copied)
        pick = sel[active] & unset
        if not pick.any():
            return
        rows = np.flatnonzero(active)[pick]
        m_bin = np.rint(mem[rows] / 10.0).astype(np.int64)
        n_bin = np.rint(10.0 * natural_w[rows] / max_cap_w[rows]).astype(np.int64)
        sig = np.char.add(
            np.char.add("s:m", m_bin.astype(np.str_)), np.char.add("n", n_bin.astype(np.str_))
        )
        jc["klass"][jslot[pick]] = sig
        jc["prior_ver"][jslot[pick]] = -1

    def _retire(self, now: float, everything: bool = False) -> None:
        """Jobs gone for a while: their curve joins their class prior, then they are dropped."""
        jc = self.jobs.cols
        gone = (~jc["retired"]) & np.isfinite(jc["last_t"])
        if not everything:
            gone &= now - jc["last_t"] > self.settings.job_forget_s
        if not gone.any():
            return
        slots = np.flatnonzero(gone).astype(np.int64)
        a, b, conf, _ = self._posterior(slots)
        var_la, cov, var_b = self._posterior_cov(slots)
        for i, slot in enumerate(slots.tolist()):  # jobs ending this cycle: few
            learned = bool(conf[i] >= 0.3 and jc["n_obs"][slot] >= 5)
            model, klass = str(jc["model"][slot]), str(jc["klass"][slot])
            if learned:
                self._commit(model, klass, float(np.log(a[i])), float(b[i]), float(conf[i]))
            if klass and model:
                curve = (float(np.log(a[i])), float(b[i]), var_la[i], cov[i], var_b[i])
                draws = (float(jc["nat_w"][slot]), float(jc["cap_k"][slot]))
                self._class_stat(model, klass, float(conf[i]) if learned else 0.0, curve, draws)
        jc["retired"][slots] = True
        self.jobs.retain(~jc["retired"])

    def _class_stat(
        self,
        model: str,
        klass: str,
        weight: float,
        curve: tuple[float, float, float, float, float],
        draws: tuple[float, float],
    ) -> None:
        """One ended job into its class's statistics (its curve weighted by its confidence)."""
        entry = self.class_stats.setdefault(f"{model}|{klass}", [0.0] * CLASS_STATS_LEN)
        la, bb, v_la, c_ab, v_b = curve
        if weight > 0:
            for index, value in (
                (CS_W, 1.0),
                (CS_LA, la),
                (CS_B, bb),
                (CS_LA2, la * la),
                (CS_LAB, la * bb),
                (CS_B2, bb * bb),
                (CS_VLA, v_la),
                (CS_CAB, c_ab),
                (CS_VB, v_b),
            ):
                entry[index] += weight * value
        natural, k = draws
        if np.isfinite(natural):
            entry[CS_NAT_N] += 1.0
            entry[CS_NAT] += natural
            entry[CS_NAT2] += natural * natural
        if np.isfinite(k):
            entry[CS_K_N] += 1.0
            entry[CS_K] += k
            entry[CS_K2] += k * k
        entry[CS_JOBS] += 1.0

    def class_curves(self) -> list[ClassCurve]:
        """Each class's learned curve from the jobs that ended (those with a learned curve),
        with the spread of their curves plus their own uncertainty as its covariance."""
        out: list[ClassCurve] = []
        var_prior = PRIOR_SD_LOG_A**2 + np.log(1.0 - X_REF) ** 2 * PRIOR_SD_B**2
        u = float(np.log(1.0 - X_REF))
        for key, e in sorted(self.class_stats.items()):
            w = e[CS_W]
            if w <= 0:
                continue
            model, _, klass = key.partition("|")
            la, bb = e[CS_LA] / w, e[CS_B] / w
            var_la = max(e[CS_LA2] / w - la * la, 0.0) + e[CS_VLA] / w
            cov = e[CS_LAB] / w - la * bb + e[CS_CAB] / w
            var_b = max(e[CS_B2] / w - bb * bb, 0.0) + e[CS_VB] / w
            spread = var_la + 2.0 * u * cov + u * u * var_b
            out.append(
                ClassCurve(
                    model=model,
                    klass=klass,
                    log_a=la,
                    b=max(bb, MIN_EXPONENT),
                    cov=(var_la, cov, var_b),
                    confidence=float(np.clip(1.0 - np.sqrt(max(spread, 0.0) / var_prior), 0, 1)),
                    natural_w=_mean(e[CS_NAT], e[CS_NAT_N]),
                    cap_draw_frac=_mean(e[CS_K], e[CS_K_N]),
                    jobs=int(e[CS_JOBS]),
                    natural_sd_w=_sd(e[CS_NAT], e[CS_NAT2], e[CS_NAT_N]),
                    cap_draw_sd=_sd(e[CS_K], e[CS_K2], e[CS_K_N]),
                )
            )
        return out

    def unlearned_classes(self) -> list[tuple[str, str, int]]:
        """(model, class, jobs) of the classes whose jobs ended without a learned curve."""
        out = []
        for key, e in sorted(self.class_stats.items()):
            if e[CS_W] <= 0:
                model, _, klass = key.partition("|")
                out.append((model, klass, int(e[CS_JOBS])))
        return out

    def finish_all(self) -> None:
        """Commit every job's curve to its prior now (e.g. at the end of a benchmark)."""
        self._retire(0.0, everything=True)


def _mean(total: float, count: float) -> float:
    return total / count if count else float("nan")


def _sd(total: float, squares: float, count: float) -> float:
    """The spread of `count` values from their sum and sum of squares (0 for fewer than 2)."""
    if count < 2:
        return 0.0
    mean = total / count
    return float(np.sqrt(max(squares / count - mean * mean, 0.0) * count / (count - 1)))

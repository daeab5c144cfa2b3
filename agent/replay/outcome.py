"""Counterfactual outcomes: what a trace would have looked like under other power caps.

A trace shows what happened under the settings of its time (the *recorded* caps). Replay asks what
would have happened under the caps the replayed policies set instead. The model, per GPU and step:

- **power**: a busy GPU draws its uncapped draw D, or about `k x cap` when the cap binds:
  `min(D, k x cap_new)`. Where the recorded cap did not bind, D is the recorded draw (ramps and
  noise included); where it bound, D is the job's natural draw N (learned below), times the
  recorded draw's noise around `k x cap_old`. Idle GPUs draw what they drew (under any cap above
  it).
- **throughput**: the proxy is the SM clock relative to the job's uncapped clock (DVFS lowers the
  clock when a cap binds, and throughput follows it for compute-bound work), times utilization
  relative to its uncapped level (a job still starting up or stalled does less):
  `T = clock / natural_clock x util / natural_util`, the same proxy orient's curve learner uses.
  Under a new cap the clock part follows the job's power curve T(x) = 1 - a (1 - x)^b at the
  share x = power / N; where the recorded cap bound, the recorded clock is a point on the job's
  curve, and the estimate follows the curve through it with the job's exponent b.
- **what is learned, and from what** (the `learn` pass over the recorded trace, before replay):
  per GPU and job (a *segment*), the natural draw, clock and utilization from the samples where
  its cap did not bind, after the job's start-up; `k` from the samples where it did; the curve
  (a, b) and its confidence from orient's curve learner (`Situation.curves`), as learned by the
  end of the segment. A job its cap held down for all of its life has only a lower bound on its
  natural draw (what it drew under the cap): its N is drawn from the natural draws of this
  trace's other jobs on the same GPU model, above that bound.

What is carried forward, and how far: each job's progress under the new caps. A job whose end
the trace shows and that got ahead of its recorded progress has finished early: its GPU idles
(at the model's idle draw) until the trace shows it busy with another job. A job slowed down is
not carried past its recorded end (its GPU may run the next job in the trace): the work it did
not do shows as lost throughput, and the energy it would have drawn finishing is not counted.
Nor is the schedule changed: the next job starts when it started in the trace, and drains,
weights and requeues are counted but their effect on placement is not estimated. Over hours with
long jobs this is a small effect; over weeks it is not, and the report says so.

**Uncertainty** (90% intervals): KPIs are computed for the point estimate and for `draws`
parameter draws: the curve's loss a (1 - x)^b scaled by exp(sigma z), sigma shrinking with the
curve's confidence (0: the prior, sigma about 0.7, a factor of 3 on the loss at the 90% level;
through a recorded capped point, only b, within 0.35 (1 - confidence));
k within 1% (measured) or 3% (assumed); N within 2% (measured) or over its truncated
distribution (never seen uncapped). Draws are shared by every GPU (fully correlated): a wrong
prior is wrong for every job, so the intervals are conservative.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.core.curves import MIN_EXPONENT
from agent.core.efficiency import token_rows
from agent.core.keyed import KeyedColumns, LastKeys
from agent.core.situation import Situation
from agent.core.snapshot import CLOCK_EVENT_SW_POWER_CAP, Metric, Snapshot
from agent.orient.natural import BUSY_UTIL_PCT, CLEAR_OF_CAP_FRAC
from agent.orient.orienter import cap_bounds

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
StrArray = npt.NDArray[np.str_]

SEP = "\x1f"  # between a GPU's UUID and its job in a segment key
WARMUP_S = 180.0  # a job's start-up: its draw and clock say nothing about its natural level yet
FULL_UTIL_PCT = 90.0  # a GPU this busy is past its job's start-up
LEARNED_CONFIDENCE = 0.3  # a curve this confident counts as learned (not the prior) in notes
PRIOR_LOG_LOSS_SD = 0.70  # the prior's spread of log(a (1 - x)^b) near x = 0.75 (orient's prior)
B_SD_PER_LOSS_SD = 0.5  # the prior's sd of b (0.35) per sd of its log loss (0.70)
N_MEASURED_SD = 0.02  # relative uncertainty of a natural draw measured uncapped
K_MEASURED_SD = 0.01
K_ASSUMED_SD = 0.03
K_DEFAULT = 0.97  # draw / cap under a binding cap when a trace never shows one binding
DRAWS = 40


def busy_mask(snapshot: Snapshot) -> BoolArray:
    """Fresh GPUs with power that run work (a job, or utilization): orient's rule."""
    power_ok = snapshot.usable(Metric.POWER_W)
    util, util_ok = snapshot.column(Metric.UTIL_PCT)
    has_job = snapshot.job != ""
    return np.asarray(power_ok & (has_job | (util_ok & (util > BUSY_UTIL_PCT))), dtype=bool)


def binding_mask(snapshot: Snapshot, limit_w: FloatArray, max_w: FloatArray) -> BoolArray:
    """Where the recorded cap holds the GPU's draw down: the GPU says so (clock event reasons),
    else the cap is below the maximum and the draw is close to it."""
    power, _ = snapshot.column(Metric.POWER_W)
    cap_bit, reasons_ok = snapshot.power_cap_holds()
    lowered = np.isfinite(limit_w) & (np.nan_to_num(limit_w, nan=np.inf) < max_w - 0.5)
    with np.errstate(invalid="ignore"):
        near = lowered & (power >= CLEAR_OF_CAP_FRAC * limit_w)
    return np.asarray(np.where(reasons_ok, cap_bit & np.isfinite(limit_w), near), dtype=bool)


def segment_keys(uuid: StrArray, job: StrArray) -> StrArray:
    return np.asarray(np.char.add(np.char.add(uuid, SEP), job), dtype=np.str_)


class SegmentIndex:
    """Stable ids for (GPU, job) segments, append-only. A GPU's job rarely changes from one step
    to the next, so each call looks up only the rows whose (UUID, job) changed since the last
    (in a dict: a handful of keys a step, against a sorted array that every insert would copy)."""

    def __init__(self, keys: StrArray | None = None, uuids: StrArray | None = None) -> None:
        self.keys = np.zeros(0, dtype=np.str_) if keys is None else np.asarray(keys)
        self.uuids = np.zeros(0, dtype=np.str_) if uuids is None else np.asarray(uuids)
        self._id = {key: i for i, key in enumerate(self.keys.tolist())}
        self._last_uuid = LastKeys()
        self._rows: tuple[StrArray, IntArray, BoolArray] | None = None

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def _find(self, keys: StrArray) -> tuple[IntArray, BoolArray]:
        got = np.fromiter(
            (self._id.get(key, -1) for key in keys.tolist()), dtype=np.int64, count=keys.size
        )
        found = got >= 0
        return np.where(found, got, 0), found

    def _add(self, keys: StrArray, uuids: StrArray) -> None:
        new, first = np.unique(keys, return_index=True)
        start = self.keys.size
        self._id.update(zip(new.tolist(), range(start, start + new.size), strict=True))
        self.keys = np.concatenate([self.keys, new])
        self.uuids = np.concatenate([self.uuids, uuids[first]])

    def ids(self, uuid: StrArray, job: StrArray, add: bool) -> tuple[IntArray, BoolArray]:
        """Per row: its segment's id, and whether it is known (always, when `add`)."""
        last = self._rows
        if last is not None and self._last_uuid.same(uuid):
            rows = np.flatnonzero(last[0] != job)
            if rows.size == 0:
                return last[1], last[2]
            ids, found = last[1].copy(), last[2].copy()
        else:
            rows = np.arange(uuid.shape[0])
            ids = np.zeros(uuid.shape[0], dtype=np.int64)
            found = np.zeros(uuid.shape[0], dtype=bool)
        keys = segment_keys(uuid[rows], job[rows])
        got, hit = self._find(keys)
        if add and not hit.all():
            self._add(keys[~hit], uuid[rows][~hit])
            got, hit = self._find(keys)
        ids[rows], found[rows] = got, hit
        self._last_uuid.remember(uuid)
        self._rows = (job.copy(), ids, found)
        return ids, found


class GrowColumns:
    """Columns indexed by a stable id, grown by doubling."""

    def __init__(self, spec: dict[str, tuple[npt.DTypeLike, Any]]) -> None:
        self._spec = spec
        self._n = 0
        self._data = {name: np.full(64, fill, dtype=dt) for name, (dt, fill) in spec.items()}

    def ensure(self, n: int) -> None:
        if n > next(iter(self._data.values())).shape[0]:
            size = max(n, 2 * next(iter(self._data.values())).shape[0])
            for name, (dt, fill) in self._spec.items():
                grown = np.full(size, fill, dtype=dt)
                old = self._data[name]
                grown[: old.shape[0]] = old
                self._data[name] = grown
        self._n = max(self._n, n)

    @property
    def cols(self) -> dict[str, npt.NDArray[Any]]:
        return {name: arr[: self._n] for name, arr in self._data.items()}


class SegmentBook:
    """What the recorded trace shows about each (GPU, job): the `learn` pass."""

    def __init__(self) -> None:
        self.index = SegmentIndex()
        self.seg = GrowColumns(
            {
                "model": ("U64", ""),
                "since": (np.float64, np.nan),
                "n_clear": (np.int64, 0),
                "sum_p": (np.float64, 0.0),
                "sum_clock": (np.float64, 0.0),
                "n_clock": (np.int64, 0),
                "sum_util": (np.float64, 0.0),
                "n_bind": (np.int64, 0),
                "sum_k": (np.float64, 0.0),
                "bound_w": (np.float64, np.nan),  # the most it drew under a binding cap
                "max_cap": (np.float64, np.nan),
                "a": (np.float64, np.nan),
                "b": (np.float64, np.nan),
                "confidence": (np.float64, 0.0),
                "source": ("U16", ""),
                "busy_steps": (np.int64, 0),
                "sum_cu_dt": (np.float64, 0.0),  # clock x util x dt: the recorded work, raw
                "last_t": (np.float64, np.nan),
            }
        )
        self.gpus = KeyedColumns({"last_t": (np.float64, np.nan)})  # last seen fresh
        self.idle: dict[str, list[float]] = {}  # model -> [sum power, sum clock, samples]

    def learn(self, snapshot: Snapshot, situation: Situation | None, dt_s: float) -> None:
        """One recorded step (and what orient made of it); `dt_s` is the time it stands for."""
        busy = busy_mask(snapshot)
        fresh = snapshot.fresh
        if fresh.any():
            seen = self.gpus.slots(snapshot.uuid[fresh])
            self.gpus["last_t"][seen] = snapshot.time_s
        self._learn_idle(snapshot, fresh & snapshot.usable(Metric.POWER_W) & ~busy)
        if not busy.any():
            return
        rows = np.flatnonzero(busy)
        ids, _ = self.index.ids(snapshot.uuid, snapshot.job, add=True)
        slot = ids[rows]
        self.seg.ensure(len(self.index))
        c = self.seg.cols
        now = snapshot.time_s
        c["model"][slot] = snapshot.model[rows]
        new = np.isnan(c["since"][slot])
        c["since"][slot[new]] = now
        c["busy_steps"][slot] += 1
        c["last_t"][slot] = now
        limit, _mn, max_w, _df = cap_bounds(snapshot)
        c["max_cap"][slot] = max_w[rows]
        power = snapshot.column(Metric.POWER_W)[0][rows]
        bind = binding_mask(snapshot, limit, max_w)[rows]
        clock, clock_ok = snapshot.column(Metric.SM_CLOCK_MHZ)
        util, util_ok = snapshot.column(Metric.UTIL_PCT)
        # Past its start-up: by time, or by running flat out (a job loading data or setting up
        # keeps its GPU partly idle; one at full utilization is computing).
        warm = ((now - c["since"][slot]) >= WARMUP_S) | (
            util_ok[rows] & (util[rows] >= FULL_UTIL_PCT)
        )
        clear = warm & ~bind
        s = slot[clear]
        c["n_clear"][s] += 1
        c["sum_p"][s] += power[clear]
        has_clock = clear & clock_ok[rows] & util_ok[rows]
        s2 = slot[has_clock]
        c["n_clock"][s2] += 1
        c["sum_clock"][s2] += clock[rows][has_clock]
        c["sum_util"][s2] += util[rows][has_clock]
        works = clock_ok[rows] & util_ok[rows]
        c["sum_cu_dt"][slot[works]] += clock[rows][works] * util[rows][works] * dt_s
        held = bind & np.isfinite(limit[rows]) & (limit[rows] > 0)
        s3 = slot[held]
        c["n_bind"][s3] += 1
        c["sum_k"][s3] += power[held] / limit[rows][held]
        c["bound_w"][s3] = np.fmax(c["bound_w"][s3], power[held])
        if situation is not None and situation.snapshot.n_gpus == snapshot.n_gpus:
            cur = situation.curves
            c["a"][slot] = cur.a[rows]
            c["b"][slot] = cur.b[rows]
            c["confidence"][slot] = cur.confidence[rows]
            c["source"][slot] = cur.source[rows]

    def _learn_idle(self, snapshot: Snapshot, idle: BoolArray) -> None:
        if not idle.any():
            return
        power = snapshot.column(Metric.POWER_W)[0]
        clock, clock_ok = snapshot.column(Metric.SM_CLOCK_MHZ)
        for model in np.unique(snapshot.model[idle]).tolist():
            rows = idle & (snapshot.model == model)
            entry = self.idle.setdefault(str(model), [0.0, 0.0, 0.0, 0.0])
            entry[0] += float(power[rows].sum())
            entry[1] += float(rows.sum())
            ok = rows & clock_ok
            entry[2] += float(clock[ok].sum())
            entry[3] += float(ok.sum())

    def ended(self) -> BoolArray:
        """Per segment: its GPU was seen fresh after it (its job ended inside the trace)."""
        if len(self.index) == 0:
            return np.zeros(0, dtype=bool)
        self.seg.ensure(len(self.index))
        pos, found = self.gpus.lookup(self.index.uuids)
        gpu_last = np.where(found, self.gpus["last_t"][pos], np.nan)
        return np.asarray(gpu_last > self.seg.cols["last_t"], dtype=bool)

    def estimates(self, draws: int = DRAWS, seed: int = 0) -> Estimates:
        return Estimates.from_book(self, draws, seed)


@dataclass(frozen=True, eq=False)
class Estimates:
    """Per segment (by id): the counterfactual's parameters, point and draws."""

    keys: StrArray
    uuids: StrArray
    natural_w: FloatArray
    natural_w_draws: FloatArray  # (segments, draws)
    natural_known: BoolArray  # seen uncapped after its start-up
    natural_clock_mhz: FloatArray
    natural_util_pct: FloatArray
    k: FloatArray
    k_sd: FloatArray
    a: FloatArray
    b: FloatArray
    loss_sd: FloatArray  # sd of log(loss) (0.7 at confidence 0)
    learned: BoolArray  # the curve counts as learned (confident), not a prior
    z_loss: FloatArray  # (draws,) shared standard normal shocks
    z_k: FloatArray
    z_n: FloatArray
    work_total: FloatArray  # the recorded work of a segment that ended in the trace (else inf)
    idle_w: dict[str, float] = field(default_factory=dict)  # per GPU model: idle draw
    idle_clock_mhz: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    summary: dict[str, float] = field(default_factory=dict)

    @property
    def draws(self) -> int:
        return int(self.z_loss.shape[0])

    @staticmethod
    def from_book(book: SegmentBook, draws: int, seed: int) -> Estimates:
        book.seg.ensure(len(book.index))
        c = book.seg.cols
        keys = book.index.keys
        s = keys.shape[0]
        rng = np.random.default_rng(seed)
        z_loss = rng.standard_normal(draws)
        z_k = rng.standard_normal(draws)
        z_n = rng.standard_normal(draws)
        u_n = (np.arange(draws) + 0.5) / draws
        rng.shuffle(u_n)  # stratified: the truncated distribution is covered evenly
        with np.errstate(invalid="ignore", divide="ignore"):
            natural_mean = c["sum_p"] / c["n_clear"]
            clock = c["sum_clock"] / c["n_clock"]
            util = c["sum_util"] / c["n_clock"]
            k_seg = c["sum_k"] / c["n_bind"]
        known = c["n_clear"] > 0
        ran = c["busy_steps"] > 0  # a segment ids also name idle GPUs: only those that ran count
        notes: list[str] = []
        natural = np.where(known, natural_mean, np.nan)
        n_draws = np.repeat(natural[:, None], draws, axis=1) * (1 + N_MEASURED_SD * z_n)[None, :]
        k = np.full(s, K_DEFAULT)
        k_sd = np.full(s, K_ASSUMED_SD)
        models = np.unique(c["model"]) if s else np.zeros(0, dtype=np.str_)
        for model in models:
            mine = c["model"] == model
            # k: the segment's own, else its GPU model's (median of the segments seen capped).
            seen_k = mine & (c["n_bind"] > 0) & np.isfinite(k_seg)
            model_k = float(np.median(k_seg[seen_k])) if seen_k.any() else K_DEFAULT
            k[mine] = np.where(seen_k[mine], k_seg[mine], model_k)
            k_sd[mine] = np.where(seen_k[mine], K_MEASURED_SD, K_ASSUMED_SD)
            # Natural clock and utilization: the segment's own, else the model's median.
            has_clock = mine & (c["n_clock"] > 0)
            if has_clock.any():
                clock[mine & ~has_clock] = float(np.median(clock[has_clock]))
                util[mine & ~has_clock] = float(np.median(util[has_clock]))
            _unseen_natural(c, mine, known, mine & ~known & ran, natural, n_draws, u_n)
        # Jobs seen for one step only (a label that lags the draw) are not worth a note.
        unknown_all = ~known & (c["busy_steps"] > 1)
        if unknown_all.any():
            notes.append(
                f"{int(unknown_all.sum())} of {int((c['busy_steps'] > 1).sum())} jobs (per GPU) "
                "were never seen "
                "uncapped: their "
                "natural draw is estimated from the trace's other jobs, above what they drew"
            )
        a = np.where(np.isfinite(c["a"]), c["a"], 1.13)
        b = np.maximum(np.where(np.isfinite(c["b"]), c["b"], 1.65), MIN_EXPONENT)
        conf = np.clip(np.nan_to_num(c["confidence"]), 0.0, 1.0)
        learned = (conf >= LEARNED_CONFIDENCE) & (c["source"] != "prior")
        learned_share = _curve_note(c, learned, notes)
        with np.errstate(invalid="ignore", divide="ignore"):
            work = c["sum_cu_dt"] / (clock * util)
        work_total = np.where(book.ended() & np.isfinite(work), work, np.inf)
        idle_w = {m: e[0] / e[1] for m, e in book.idle.items() if e[1] > 0}
        idle_clock = {m: e[2] / e[3] for m, e in book.idle.items() if e[3] > 0}
        return Estimates(
            keys=keys,
            uuids=book.index.uuids,
            natural_w=natural,
            natural_w_draws=n_draws,
            natural_known=known,
            natural_clock_mhz=clock,
            natural_util_pct=util,
            k=np.clip(k, 0.5, 1.0),
            k_sd=k_sd,
            a=a,
            b=b,
            loss_sd=PRIOR_LOG_LOSS_SD * (1.0 - conf),
            learned=learned,
            z_loss=z_loss,
            z_k=z_k,
            z_n=z_n,
            work_total=work_total,
            idle_w=idle_w,
            idle_clock_mhz=idle_clock,
            notes=tuple(notes),
            summary={
                "segments": float(ran.sum()),
                "natural_known_share": float(known[ran].mean()) if ran.any() else 0.0,
                "learned_curve_share": learned_share,
                "capped_segments": float((c["n_bind"] > 0).sum()),
                "never_uncapped_segments": float(unknown_all.sum()),
            },
        )

    def index(self) -> SegmentIndex:
        return SegmentIndex(self.keys, self.uuids)


def _unseen_natural(
    c: dict[str, npt.NDArray[Any]],
    mine: BoolArray,
    known: BoolArray,
    unknown: BoolArray,
    natural: FloatArray,
    n_draws: FloatArray,
    u_n: FloatArray,
) -> None:
    """The natural draw of jobs (of one GPU model, `mine`) never seen uncapped: the model's
    known draws above what they drew under their cap (set in `natural` and `n_draws`)."""
    if not unknown.any():
        return
    lo = np.nan_to_num(c["bound_w"][unknown], nan=0.0)
    hi = np.nan_to_num(c["max_cap"][unknown], nan=np.nanmax(lo, initial=0.0))
    pool = np.sort(natural[mine & known])
    if pool.size >= 5:
        n_pt, n_dr = _truncated(pool, lo, hi, u_n)
    else:  # nothing to learn from: anywhere between the bound and the maximum limit
        n_pt = np.maximum(lo, 0.9 * hi)
        n_dr = lo[:, None] + (hi - lo)[:, None] * u_n[None, :]
    natural[unknown] = n_pt
    n_draws[unknown] = n_dr


def _curve_note(c: dict[str, npt.NDArray[Any]], learned: BoolArray, notes: list[str]) -> float:
    """The share of busy GPU time with a learned curve; below half, a note says why."""
    steps = c["busy_steps"].astype(np.float64)
    total = float(steps.sum())
    learned_share = float(steps[learned].sum()) / total if total else 0.0
    capped_share = float(steps[c["n_bind"] > 0].sum()) / total if total else 0.0
    if total and learned_share < 0.5:
        why = (
            "the trace shows few caps binding, little to learn curves from"
            if capped_share < 0.2
            else "orient did not learn them with confidence from this trace"
        )
        notes.append(
            f"power curves learned for {learned_share:.0%} of busy GPU time ({why}): where a "
            "replayed cap binds on the rest, the GPU model's prior curve stands in, with its "
            "uncertainty"
        )
    return learned_share


def _truncated(
    pool: FloatArray, lo: FloatArray, hi: FloatArray, u: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Quantiles of the empirical distribution `pool` (sorted) truncated to [lo, hi], per bound:
    the median and the levels `u`."""
    m = pool.size
    levels = (np.arange(m) + 0.5) / m
    f_lo = np.interp(lo, pool, levels, left=0.0, right=1.0)
    f_hi = np.interp(hi, pool, levels, left=0.0, right=1.0)
    f_hi = np.maximum(f_hi, f_lo)

    def at(q: FloatArray) -> FloatArray:
        return np.asarray(np.interp(q, levels, pool), dtype=np.float64)

    point = np.clip(at(f_lo + 0.5 * (f_hi - f_lo)), lo, np.maximum(lo, hi))
    grid = f_lo[:, None] + u[None, :] * (f_hi - f_lo)[:, None]
    drawn = at(grid.ravel()).reshape(grid.shape)
    drawn = np.clip(drawn, lo[:, None], np.maximum(lo, hi)[:, None])
    return np.asarray(point, dtype=np.float64), np.asarray(drawn, dtype=np.float64)


def _throughput(x: FloatArray, a: FloatArray, b: FloatArray, scale: FloatArray) -> FloatArray:
    """T(x) = 1 - a (1 - x)^b x scale, clipped to [0, 1]."""
    loss = a * np.power(np.clip(1.0 - x, 0.0, 1.0), b) * scale
    return np.asarray(np.clip(1.0 - loss, 0.0, 1.0), dtype=np.float64)


CAP_QUANTILES = (0.1, 0.5, 0.9)  # the spread of caps in force the report plots


@dataclass
class StepOutcome:
    """One step of the counterfactual (fleet totals; power includes node overhead)."""

    time_s: float
    fleet_obs_w: float
    fleet_cf_w: float
    fleet_cf_draws_w: FloatArray  # (draws,)
    work_obs: float  # throughput proxy summed over busy GPUs (GPU-equivalents)
    work_cf: float
    work_cf_draws: FloatArray
    capped_obs: int  # busy GPUs whose cap binds
    capped_cf: int
    mean_cap_obs_w: float  # over GPUs with a known cap
    mean_cap_cf_w: float
    lowered_cf: int  # GPUs whose counterfactual cap is below their maximum
    finished_early: int  # GPUs whose job would have ended already (idle instead)
    # The caps in force over GPUs with a known cap: the CAP_QUANTILES (10%, median, 90%).
    cap_q_obs_w: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    cap_q_cf_w: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    # Application tokens a second of the GPUs reporting them (agent.core.efficiency), and their
    # draw: as recorded, and under the replayed caps. 0 with none (the KPI is then unknown).
    tokens_obs: float = 0.0
    tokens_obs_w: float = 0.0
    tokens_cf: float = 0.0
    tokens_cf_w: float = 0.0


@dataclass
class Tally:
    """What a replayed set's outcome rests on, in GPU-seconds (and seconds for `held_s`): the
    reasons its intervals are as wide or as narrow as they are."""

    busy_gpu_s: float = 0.0  # busy GPUs (a job the learn pass saw), as replayed
    estimated_gpu_s: float = 0.0  # where a parameter matters: a cap binds (either) or a job ends
    bound_gpu_s: float = 0.0  # a replayed cap binds (not the one recorded)
    bound_prior_gpu_s: float = 0.0  # ... on a job whose power curve is the GPU model's prior
    held_s: float = 0.0  # a policy holding the budget planned caps (the draws are closed-loop)
    duration_s: float = 0.0


@dataclass(frozen=True, eq=False)
class _Point:
    """One step of the point estimate, per GPU (the snapshot's rows)."""

    seg: IntArray
    usable: BoolArray  # fresh, with a power reading
    busy: BoolArray
    known: BoolArray  # busy, in a segment the learn pass saw
    done: BoolArray  # its job would have finished already: idle instead
    total: FloatArray  # the segment's recorded work (inf: its end is not in the trace)
    bind_q: BoolArray  # the recorded cap bound
    bind_p: BoolArray  # the replayed cap binds
    recapped: BoolArray  # the replayed cap is not the recorded one
    k: FloatArray
    idle_w: FloatArray
    power_w: FloatArray  # under the replayed caps; NaN where not usable
    c_obs: FloatArray  # recorded clock / natural clock
    u_obs: FloatArray  # recorded utilization / natural utilization
    proxy_ok: BoolArray
    a: FloatArray
    b: FloatArray
    natural_clock_mhz: FloatArray
    clock_cf: FloatArray  # clock share under the replayed caps
    t_obs: FloatArray
    t_cf: FloatArray


class Counterfactual:
    """The replayed policies' world: their caps (keyed by UUID), and each recorded step as it
    would have been under them.

    The decisions are the point estimate's; each parameter draw re-prices them. A policy that
    holds the budget (`holds_budget`: power_budget) would not have left a draw's world above it:
    it sees the fleet's draw every cycle and re-plans its caps to the budget, so a model that
    gets `k` or a natural draw 3% wrong changes what its caps cost in throughput, not how long
    the fleet stays above the budget. While such a policy plans caps (`held_budget`), each draw's
    fleet is steered back to the point estimate's through the caps of its busy GPUs (within their
    limits, the throughput following each job's curve); while it does not, a draw's fleet above
    the budget is brought down to it. Without such a policy the draws are open-loop, as nothing
    would have reacted to the fleet's power."""

    def __init__(
        self, estimates: Estimates, overhead_per_node_w: float = 0.0, holds_budget: bool = False
    ) -> None:
        self.est = estimates
        self.overhead_per_node_w = overhead_per_node_w
        self.holds_budget = holds_budget
        self.budget_held = False  # did the last cycle's budget policy plan caps?
        self.caps = KeyedColumns({"cap_w": (np.float64, np.nan), "default_w": (np.float64, np.nan)})
        self._energy_cf_j = KeyedColumns({"delta_j": (np.float64, 0.0)})
        self.index = estimates.index()
        s = estimates.keys.shape[0]
        self.progress = np.zeros(s)  # per segment: work done under the new caps (proxy units)
        self.progress_d = np.zeros((s, estimates.draws))
        self.tally = Tally()

    # -- what the replayed policies do (called by the dry-run cap recorder) -------------------

    def set_caps(self, uuids: StrArray, watts: FloatArray) -> None:
        slot = self.caps.slots(uuids)
        self.caps["cap_w"][slot] = watts

    def release_caps(self, uuids: StrArray) -> None:
        slot = self.caps.slots(uuids)
        self.caps["cap_w"][slot] = self.caps["default_w"][slot]

    def cap_of(self, uuids: StrArray) -> FloatArray:
        pos, found = self.caps.lookup(uuids)
        return np.where(found, self.caps["cap_w"][pos], np.nan)

    def unfinished(self) -> tuple[float, float]:
        """Work the replayed caps left undone at the recorded ends of the jobs they slowed
        (seconds at full speed), and the energy doing it at their natural draws would take (J):
        counted as lost throughput, as the schedule is held as recorded."""
        est = self.est
        lost = np.where(np.isfinite(est.work_total), est.work_total - self.progress, 0.0)
        lost = np.clip(np.nan_to_num(lost), 0.0, None)
        return float(lost.sum()), float(np.nansum(lost * est.natural_w))

    def held_budget(self, planned: bool) -> None:
        """After each replayed cycle: whether a policy holding the budget planned caps in it
        (until the next cycle, the draws' fleets are steered where the point estimate's is)."""
        self.budget_held = planned and self.holds_budget

    # -- one step ---------------------------------------------------------------------------

    def step(
        self, snap: Snapshot, dt_s: float, budget_w: float | None = None
    ) -> tuple[Snapshot, StepOutcome]:
        """The recorded step under the replayed caps: the policies' view of it, and its outcome.
        `budget_w` is the budget in force (the draws' closed loop steers to it)."""
        limit, min_w, max_w, default_w = cap_bounds(snap)
        cap_p = self._caps_in_force(snap, limit, default_w)
        cap_eff = np.where(np.isfinite(cap_p), cap_p, np.inf)
        pt = self._point(snap, limit, max_w, cap_eff)
        overhead = self.overhead_per_node_w * snap.n_nodes
        fleet_cf = float(np.nansum(pt.power_w)) + overhead
        fleet_draws, work_draws = self._draws(
            snap, pt, (limit, min_w, max_w, cap_eff), fleet_cf, budget_w, dt_s
        )
        rows_k = np.flatnonzero(pt.known)
        self.progress[pt.seg[rows_k]] += pt.t_cf[rows_k] * dt_s
        self.progress_d[pt.seg[rows_k]] += pt.t_cf[rows_k, None] * dt_s
        power = snap.column(Metric.POWER_W)[0]
        has_cap = np.isfinite(limit) & pt.usable
        shown = pt.usable & np.isfinite(cap_p)
        capped_cf = pt.bind_p & (cap_p < max_w - 0.5)
        self._count(pt, capped_cf & pt.recapped, dt_s)
        tokens = _tokens(snap, pt)
        out = StepOutcome(
            time_s=snap.time_s,
            fleet_obs_w=float(np.nansum(np.where(pt.usable, power, 0.0))) + overhead,
            fleet_cf_w=fleet_cf,
            fleet_cf_draws_w=fleet_cf + fleet_draws,
            work_obs=float(pt.t_obs.sum()),
            work_cf=float(pt.t_cf.sum()),
            work_cf_draws=float(pt.t_cf.sum()) + work_draws,
            capped_obs=int((pt.bind_q & (limit < max_w - 0.5)).sum()),
            capped_cf=int(capped_cf.sum()),
            mean_cap_obs_w=float(limit[has_cap].mean()) if has_cap.any() else math.nan,
            mean_cap_cf_w=float(cap_p[shown].mean()) if shown.any() else math.nan,
            lowered_cf=int((pt.usable & (cap_p < max_w - 0.5)).sum()),
            finished_early=int(pt.done.sum()),
            cap_q_obs_w=_cap_quantiles(limit, has_cap),
            cap_q_cf_w=_cap_quantiles(cap_p, shown),
            tokens_obs=tokens[0],
            tokens_obs_w=tokens[1],
            tokens_cf=tokens[2],
            tokens_cf_w=tokens[3],
        )
        idle_clock = self._per_model(
            snap, self.est.idle_clock_mhz, snap.column(Metric.SM_CLOCK_MHZ)[0]
        )
        clock_view = np.where(pt.done, idle_clock, pt.clock_cf * pt.natural_clock_mhz)
        view = self._view(snap, pt.power_w, cap_p, clock_view, pt.bind_p, pt.done, dt_s)
        return view, out

    def _caps_in_force(
        self, snap: Snapshot, limit: FloatArray, default_w: FloatArray
    ) -> FloatArray:
        """Each GPU's replayed cap; at first sight, the cap it had in the trace then."""
        gslot = self.caps.slots(snap.uuid)
        first = np.isnan(self.caps["cap_w"][gslot])
        start = np.where(np.isfinite(limit), limit, default_w)
        self.caps["cap_w"][gslot[first]] = start[first]
        self.caps["default_w"][gslot] = default_w
        return np.asarray(self.caps["cap_w"][gslot], dtype=np.float64)

    def _point(
        self, snap: Snapshot, limit: FloatArray, max_w: FloatArray, cap_eff: FloatArray
    ) -> _Point:
        est = self.est
        power, power_ok = snap.column(Metric.POWER_W)
        usable = power_ok & snap.fresh
        busy = busy_mask(snap)
        seg, found = self.index.ids(snap.uuid, snap.job, add=False)
        known = busy & found
        # A job that got ahead of its recorded progress has finished: its GPU idles.
        total = np.where(known, est.work_total[seg], np.inf)
        done = known & (self.progress[seg] >= total * (1.0 - 1e-9))
        idle_w = self._per_model(snap, est.idle_w, power)
        bind_q = binding_mask(snap, limit, max_w) & known
        natural = np.where(known, est.natural_w[seg], np.nan)
        k_floor, over = _as_recorded(power, limit, bind_q)
        k = np.minimum(np.fmax(np.where(known, est.k[seg], K_DEFAULT), k_floor), 1.0)
        # Where the recorded cap bound, the job would have drawn at least what it allowed.
        d_now = np.where(bind_q, np.fmax(natural, k * limit), power)
        with np.errstate(invalid="ignore", divide="ignore"):
            noise = np.where(bind_q, np.clip(power / (k * limit), 0.8, 1.2), 1.0)
        busy_power = np.minimum(d_now, k * cap_eff) * noise
        power_cf = np.where(busy, busy_power, np.minimum(power, cap_eff * over))
        power_cf = np.where(done, idle_w, power_cf)
        power_cf = np.where(usable, np.minimum(power_cf, cap_eff * over), np.nan)
        bind_p = busy & ~done & (k * cap_eff < d_now)
        # Throughput proxy, recorded and counterfactual (point estimate).
        clock, clock_ok = snap.column(Metric.SM_CLOCK_MHZ)
        util, util_ok = snap.column(Metric.UTIL_PCT)
        nc = np.where(known, est.natural_clock_mhz[seg], np.nan)
        nu = np.where(known, est.natural_util_pct[seg], np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            c_obs = np.clip(clock / nc, 0.0, 1.2)
            u_obs = np.clip(util / nu, 0.0, 1.0)
            x_obs = np.where(bind_q, np.minimum(1.0, k * limit / d_now), 1.0)
            x_cf = np.minimum(1.0, k * cap_eff / d_now)
        proxy_ok = known & clock_ok & util_ok & np.isfinite(c_obs) & np.isfinite(u_obs)
        a = np.where(known, est.a[seg], 1.0)
        b = np.where(known, est.b[seg], 2.0)
        x_obs = np.nan_to_num(x_obs, nan=1.0)
        x_cf = np.nan_to_num(x_cf, nan=1.0)
        clock_cf = _clock_share(c_obs, x_obs, x_cf, bind_q, a, b, 0.0, np.zeros(snap.n_gpus))
        return _Point(
            seg=seg,
            usable=usable,
            busy=busy,
            known=known,
            done=done,
            total=total,
            bind_q=bind_q,
            bind_p=bind_p,
            recapped=~np.isclose(
                cap_eff, np.where(np.isfinite(limit), limit, np.inf), rtol=0.0, atol=0.5
            ),
            k=k,
            idle_w=idle_w,
            power_w=power_cf,
            c_obs=c_obs,
            u_obs=u_obs,
            proxy_ok=proxy_ok,
            a=a,
            b=b,
            natural_clock_mhz=nc,
            clock_cf=clock_cf,
            t_obs=np.where(proxy_ok, c_obs * u_obs, 0.0),
            t_cf=np.where(proxy_ok & ~done, clock_cf * u_obs, 0.0),
        )

    def _draws(
        self,
        snap: Snapshot,
        pt: _Point,
        bounds: tuple[FloatArray, FloatArray, FloatArray, FloatArray],
        fleet_cf_w: float,
        budget_w: float | None,
        dt_s: float,
    ) -> tuple[FloatArray, FloatArray]:
        """Each draw's fleet power and work less the point estimate's (m,); the draws' job
        progress advances. Only where a cap other than the recorded one binds (or the recorded
        one bound and is gone), or a job may have finished, do the parameters matter."""
        est = self.est
        m = est.draws
        done_d = self.progress_d[pt.seg] >= pt.total[:, None] * (1.0 - 1e-9)  # (n, m)
        maybe = done_d.any(axis=1) | pt.done
        # A cap as recorded gives the step as recorded, whatever the parameters.
        r = np.flatnonzero(pt.usable & pt.known & ((pt.bind_q | pt.bind_p) & pt.recapped | maybe))
        self.tally.estimated_gpu_s += r.size * dt_s
        if not r.size or not m:
            return np.zeros(m), np.zeros(m)
        limit, min_w, max_w, cap_eff = (x[r] for x in bounds)
        power = snap.column(Metric.POWER_W)[0][r]
        sg = pt.seg[r]
        nat_d = est.natural_w_draws[sg].T  # (m, A)
        k_floor, over = _as_recorded(power, limit, pt.bind_q[r])
        k_d = pt.k[r][None, :] * (1.0 + est.k_sd[sg][None, :] * est.z_k[:, None])
        k_d = np.clip(np.fmax(k_d, k_floor), 0.5, 1.0)
        bq = pt.bind_q[r][None, :]
        # What it would draw uncapped: at least what a recorded cap that bound allowed.
        d_d = np.where(bq, np.fmax(nat_d, k_d * limit), power[None, :])
        dd = done_d[r].T
        with np.errstate(invalid="ignore", divide="ignore"):
            noise_d = np.where(bq, np.clip(power / (k_d * limit), 0.8, 1.2), 1.0)
            p_open = np.minimum(np.minimum(d_d, k_d * cap_eff) * noise_d, cap_eff * over)
            xo = np.where(bq, np.minimum(1.0, k_d * limit / d_d), 1.0)
            xc = np.minimum(1.0, k_d * cap_eff / d_d)
        p_open = np.where(dd, np.minimum(pt.idle_w[r], cap_eff), p_open)
        point_w = float(np.nansum(pt.power_w[r]))
        open_fleet = fleet_cf_w + np.nansum(p_open, axis=1) - point_w
        want = self._budget_correction(open_fleet, fleet_cf_w, budget_w)
        live = ~dd
        floor = np.where(
            live & np.isfinite(min_w), np.minimum(p_open, k_d * min_w * noise_d), p_open
        )
        ceiling = np.where(live, np.maximum(p_open, np.fmin(d_d * noise_d, max_w)), p_open)
        p_d = _steer(p_open, floor, ceiling, want)
        with np.errstate(invalid="ignore", divide="ignore"):
            xc = np.where(p_open > 0, xc * p_d / p_open, xc)  # the steered caps' share
        cc = _clock_share(
            np.broadcast_to(pt.c_obs[r], xo.shape),
            np.nan_to_num(xo, nan=1.0),
            np.nan_to_num(xc, nan=1.0),
            bq,
            pt.a[r],
            pt.b[r],
            est.z_loss[:, None],
            est.loss_sd[sg][None, :],
        )
        tc = np.where(pt.proxy_ok[r] & ~dd, cc * pt.u_obs[r], 0.0)
        self.progress_d[sg] += (tc.T - pt.t_cf[r, None]) * dt_s
        return np.nansum(p_d, axis=1) - point_w, tc.sum(axis=1) - float(pt.t_cf[r].sum())

    def _budget_correction(
        self, open_fleet_w: FloatArray, fleet_cf_w: float, budget_w: float | None
    ) -> FloatArray:
        """Per draw, the watts a policy holding the budget would have taken off its fleet
        (negative: given back), seeing that draw's world instead of the point estimate's."""
        if not self.holds_budget or budget_w is None or not math.isfinite(budget_w):
            return np.zeros_like(open_fleet_w)
        if self.budget_held:
            return np.asarray(open_fleet_w - fleet_cf_w, dtype=np.float64)
        return np.asarray(np.maximum(open_fleet_w - budget_w, 0.0), dtype=np.float64)

    def _count(self, pt: _Point, capped_cf: BoolArray, dt_s: float) -> None:
        t = self.tally
        live = pt.known & ~pt.done
        t.busy_gpu_s += float(live.sum()) * dt_s
        t.bound_gpu_s += float(capped_cf.sum()) * dt_s
        prior = capped_cf & pt.known & ~self.est.learned[pt.seg]
        t.bound_prior_gpu_s += float(prior.sum()) * dt_s
        t.held_s += dt_s if self.budget_held else 0.0
        t.duration_s += dt_s

    @staticmethod
    def _per_model(snap: Snapshot, levels: dict[str, float], fallback: FloatArray) -> FloatArray:
        out = np.array(fallback, dtype=np.float64, copy=True)
        for model, level in levels.items():
            out[snap.model == model] = level
        return out

    def _view(
        self,
        snap: Snapshot,
        power_cf: FloatArray,
        cap_p: FloatArray,
        clock_cf_mhz: FloatArray,
        bind_p: BoolArray,
        done: BoolArray,
        dt_s: float,
    ) -> Snapshot:
        """The recorded snapshot as the replayed policies would have seen it under their caps."""
        values = dict(snap.values)
        valid = dict(snap.valid)
        usable = snap.usable(Metric.POWER_W)

        def put(metric: Metric, column: FloatArray) -> None:
            values[metric] = column
            valid[metric] = np.isfinite(column)

        put(Metric.POWER_W, np.where(usable, power_cf, np.nan))
        shown_cap = np.where(snap.fresh, cap_p, np.nan)
        put(Metric.POWER_LIMIT_W, shown_cap)
        if Metric.ENFORCED_LIMIT_W in values:
            put(Metric.ENFORCED_LIMIT_W, shown_cap)
        clock, clock_ok = snap.column(Metric.SM_CLOCK_MHZ)
        if Metric.SM_CLOCK_MHZ in values:
            changed = clock_ok & np.isfinite(clock_cf_mhz) & busy_mask(snap)
            put(Metric.SM_CLOCK_MHZ, np.where(changed, clock_cf_mhz, clock))
        for metric in (Metric.UTIL_PCT, Metric.MEM_UTIL_PCT):
            if metric in values and done.any():
                put(metric, np.where(done, 0.0, values[metric]))
        reasons, reasons_ok = snap.column(Metric.CLOCKS_EVENT_REASONS)
        if Metric.CLOCKS_EVENT_REASONS in values:
            bits = np.nan_to_num(reasons).astype(np.int64) & ~CLOCK_EVENT_SW_POWER_CAP
            bits |= np.where(bind_p, CLOCK_EVENT_SW_POWER_CAP, 0)
            put(Metric.CLOCKS_EVENT_REASONS, np.where(reasons_ok, bits.astype(np.float64), np.nan))
        energy, energy_ok = snap.column(Metric.ENERGY_J)
        if Metric.ENERGY_J in values:
            # The counter runs on what the GPU would have drawn: recorded plus what changed.
            power = snap.column(Metric.POWER_W)[0]
            slot = self._energy_cf_j.slots(snap.uuid)
            delta = self._energy_cf_j["delta_j"]
            step = np.where(usable, np.nan_to_num(power_cf - power) * dt_s, 0.0)
            delta[slot] += step
            put(Metric.ENERGY_J, np.where(energy_ok, energy + delta[slot], np.nan))
        job = np.where(done, "", snap.job) if done.any() else snap.job
        return replace(snap, values=values, valid=valid, job=job)


def _as_recorded(
    power_w: FloatArray, limit_w: FloatArray, bind_q: npt.ArrayLike
) -> tuple[FloatArray, FloatArray]:
    """What a GPU's recorded step says of its cap, so that the cap it had gives what it drew:
    a GPU that drew `power` under a cap that did not bind draws at least that close to a cap
    that binds (the lowest `k` it can have), and one that drew a little over its cap may."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(np.isfinite(limit_w) & (limit_w > 0), power_w / limit_w, np.nan)
    k_floor = np.where(np.asarray(bind_q, dtype=bool), 0.0, np.nan_to_num(ratio, nan=0.0))
    over = np.fmax(np.nan_to_num(ratio, nan=1.0), 1.0)
    return np.asarray(k_floor, dtype=np.float64), np.asarray(over, dtype=np.float64)


def _steer(
    power_w: FloatArray, floor_w: FloatArray, ceiling_w: FloatArray, want_w: FloatArray
) -> FloatArray:
    """Each draw's rows (draws, rows) moved by `want_w` watts in all (positive: down toward
    `floor_w`, negative: up toward `ceiling_w`), each row in proportion to its room, as far as
    the room goes: a budget policy re-planning its caps to the draw's world."""
    down = np.clip(np.nan_to_num(power_w - floor_w), 0.0, None)
    up = np.clip(np.nan_to_num(ceiling_w - power_w), 0.0, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        f_down = np.where(want_w > 0, np.clip(want_w / down.sum(axis=1), 0.0, 1.0), 0.0)
        f_up = np.where(want_w < 0, np.clip(-want_w / up.sum(axis=1), 0.0, 1.0), 0.0)
    f_down, f_up = np.nan_to_num(f_down), np.nan_to_num(f_up)
    return np.asarray(power_w - f_down[:, None] * down + f_up[:, None] * up, dtype=np.float64)


def _tokens(snap: Snapshot, pt: _Point) -> tuple[float, float, float, float]:
    """Tokens a second and watts of the GPUs reporting application tokens, as recorded and under
    the replayed caps: a GPU's tokens scale with its throughput proxy's pace (the replay's model
    of a capped job, ASSUMPTIONS), its draw is the counterfactual's. Only GPUs with a rate and
    a draw known on both sides count."""
    rows, rate = token_rows(snap)
    if rows.size == 0:
        return 0.0, 0.0, 0.0, 0.0
    power_obs = snap.column(Metric.POWER_W)[0][rows]
    power_cf = pt.power_w[rows]
    ok = np.isfinite(rate) & np.isfinite(power_obs) & np.isfinite(power_cf) & pt.usable[rows]
    t_obs, t_cf = pt.t_obs[rows], pt.t_cf[rows]
    with np.errstate(invalid="ignore", divide="ignore"):
        pace = np.where(pt.known[rows] & (t_obs > 0), t_cf / t_obs, 1.0)
    return (
        float(rate[ok].sum()),
        float(power_obs[ok].sum()),
        float((rate * pace)[ok].sum()),
        float(power_cf[ok].sum()),
    )


def _cap_quantiles(caps_w: FloatArray, ok: BoolArray) -> tuple[float, float, float]:
    if not ok.any():
        return (math.nan, math.nan, math.nan)
    lo, mid, hi = np.quantile(caps_w[ok], CAP_QUANTILES)
    return float(lo), float(mid), float(hi)


def _clock_share(
    c_obs: npt.ArrayLike,
    x_obs: FloatArray,
    x_cf: FloatArray,
    bind_q: npt.ArrayLike,
    a: npt.ArrayLike,
    b: npt.ArrayLike,
    z: npt.ArrayLike,
    loss_sd: npt.ArrayLike,
) -> FloatArray:
    """The clock share (of the natural clock) under the new cap.

    Recorded uncapped: what was seen, times the curve's T at the new share (the curve's level
    uncertain: its loss scaled by exp(loss_sd z)). Recorded under a binding cap: the recorded
    point (x_obs, c_obs) lies on the job's curve, so the curve through it with the exponent b,
    loss(x) = loss_obs ((1 - x) / (1 - x_obs))^b; only b is uncertain there (sd b_sd z)."""
    a_ = np.asarray(a, dtype=np.float64)
    b_ = np.asarray(b, dtype=np.float64)
    z_ = np.asarray(z, dtype=np.float64)
    sd = np.asarray(loss_sd, dtype=np.float64)
    c = np.asarray(c_obs, dtype=np.float64)
    scale = np.exp(sd * z_)
    b_d = np.maximum(b_ + B_SD_PER_LOSS_SD * sd * z_, MIN_EXPONENT)
    t_cf = _throughput(x_cf, a_, b_, scale)
    gap = 1.0 - x_obs
    loss_obs = np.clip(1.0 - c, 0.0, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(gap > 0.02, np.clip(1.0 - x_cf, 0.0, 1.0) / gap, 1.0)
        through = 1.0 - loss_obs * np.power(ratio, b_d)
        # Hardly bound: the curve's level through the recorded point (the same cap, the same
        # clock).
        level = c * t_cf / _throughput(x_obs, a_, b_, scale)
    capped = np.where(gap > 0.02, through, level)
    out = np.where(np.asarray(bind_q, dtype=bool), capped, c * t_cf)
    return np.asarray(np.clip(out, 0.0, 1.2), dtype=np.float64)


NARROW_SHARE = 0.02  # under this share of busy GPU time estimated, the outcome is the recording's
UNFINISHED_NOTE_RATIO = 0.01  # work left undone, as a share of the recorded work, worth a note


def explain(tally: Tally, kpis: Mapping[str, Any], holds_budget: bool) -> list[str]:
    """Why a replayed set's intervals are as wide, or as narrow, as they are (its notes)."""
    busy = tally.busy_gpu_s
    if busy <= 0:
        return []
    if tally.estimated_gpu_s == 0:
        return [
            "its caps never bound a busy GPU: the outcome is the trace as recorded, nothing is "
            "estimated, and the intervals have no width"
        ]
    notes: list[str] = []
    bound = tally.bound_gpu_s / busy
    bound_h = tally.bound_gpu_s / 3600.0
    if tally.estimated_gpu_s / busy < NARROW_SHARE:
        notes.append(
            f"its caps bound busy GPUs {bound:.1%} of their time ({bound_h:,.1f} GPU-hours): the "
            "rest is as recorded, so the intervals are narrow"
        )
    elif tally.bound_gpu_s > 0 and tally.bound_prior_gpu_s >= 0.5 * tally.bound_gpu_s:
        prior = tally.bound_prior_gpu_s / tally.bound_gpu_s
        notes.append(
            f"its caps bound busy GPUs {bound:.0%} of their time, {prior:.0%} of that on jobs "
            "whose power curve is the GPU model's prior, none learned from the trace: the "
            "throughput interval is wide for that (a prior's loss is uncertain by a factor of "
            "about 3)"
        )
    if holds_budget and tally.held_s > 0:
        notes.append(
            f"a budget policy planned caps {tally.held_s / tally.duration_s:.0%} of the time: "
            "there each draw is re-planned to the budget as the policy would have (it sees the "
            "fleet's draw), so the model's uncertainty shows in throughput rather than in "
            "energy or seconds above budget"
        )
    unfinished = kpis.get("unfinished") or {}
    share, kwh = unfinished.get("work_ratio"), unfinished.get("energy_kwh")
    if share is not None and kwh is not None and share > UNFINISHED_NOTE_RATIO:
        notes.append(
            f"jobs it slowed left {share:.1%} of the recorded work unfinished at their recorded "
            "ends: the estimate counts it as lost (the schedule is held as recorded). Done "
            f"later, it would add up to {share:.3f} to throughput and {kwh:,.1f} kWh to energy; "
            "the intervals do not include that"
        )
    lo, hi = kpis.get("interval", {}).get("budget_violation_s", (None, None))
    if not holds_budget and lo is not None and hi - lo > max(60.0, 0.05 * tally.duration_s):
        notes.append(
            "no policy of the set holds the budget, so nothing would have corrected the "
            "fleet's draw: seconds above budget range as widely as the model's power (each "
            "job's draw under its cap, its natural draw) is uncertain"
        )
    return notes

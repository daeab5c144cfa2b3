"""Normal-but-surprising phases of a real GPU fleet, played by the twin.

A real fleet's telemetry is not a flat line per job: training jobs stall to write checkpoints,
pause to evaluate, starve on their data loaders and warm up for minutes; inference services follow
their users' day and burst; a sensor reading freezes; an exporter restarts. None of these is a
fault, and the agent must take no action on any of them. Each is played here, columnar over GPUs
(numpy, no per-GPU or per-job Python objects in the step) and seeded:

- checkpoint: a synchronous checkpoint. Every GPU of the training job waits on storage, its
  draw near idle, for 30 s to 3 min, every 15 to 60 min after its warm-up; all GPUs of the job
  stop together. Llama 3 (Dubey et al. 2024, sec. 3.3.4): tens of thousands of GPUs "waiting for
  checkpointing ... to finish" move a site's draw by tens of megawatts; Choukse et al. 2025
  ("Power Stabilization for AI Training Datacenters", arXiv:2508.14318): GPUs fall to near idle
  while they checkpoint; CheckFreq (Mohan et al., FAST 2021) describes the stall. Interval:
  Young's optimum sqrt(2 C M) (Young 1974, CACM 17(9)) for a write time C of 30-180 s and a mean
  time between interruptions M of 1-6 h (Llama 3: 419 unexpected interruptions in 54 days on
  16,384 GPUs) is 8 to 46 min; smaller jobs fail less often, so the twin draws 15 to 60 min.
- evaluation: a validation pass every 30 to 120 min for 2 to 10 min, in half of the training
  jobs. Forward passes only are about a third of a training step's arithmetic (Kaplan et al.
  2020: ~2N FLOPs per token forward, ~6N to train), so a lower, different draw: 45-75 % of the
  job's dynamic draw (an assumption within that bound); its progress goes on.
- loader_stall: an input-bound job (30 % of training jobs) starves on its data loader: short
  (2-20 s), random dips of 20-70 % of its dynamic draw, 4 to 30 an hour. Data stalls: Mohan et
  al., "Analyzing and Mitigating Data Stalls in DNN Training", VLDB 2021 (rates and depths here
  are assumptions).
- warmup: a job's start (loading data and weights, compiling, initializing its collectives) near
  idle for 20-50 % of its warm-up, then a ramp to its draw; warm-ups last 1 to 10 min,
  log-uniform (an assumption: no published distribution was found).
- inference: a share of the nodes run inference services all day. Their draw follows a daily
  load curve (a trough at 30-60 % of the peak at night, the peak in the afternoon, as in the
  week-long Azure LLM inference traces of DynamoLLM, Stojkovic et al., HPCA 2025; the ratio is
  an assumption; the peak runs at 80 % of the service's full draw, headroom kept for bursts), a
  minute-to-minute jitter and bursts (about one an hour, 1-5 min, +15-40 % of the full draw).
  Their curve is the llm_train class's (transformer kernels; the calibration data has no
  inference sweeps).
- flatline: a GPU's power and temperature readings, as DCGM serves them, freeze at their last
  value for 10 min to 2 h while the GPU keeps working (exporter hangs: NVIDIA/go-dcgm#38, "All
  GPU metrics suddenly hang ... nvidia-smi can display real statistic"). NVML reads (the node
  daemon's) stay true.
- exporter_restart: a node's exporter restarts. Its series vanish for 10-35 s (one or two 15-s
  scrapes; Prometheus marks a failed target's series stale at once) and come back with the
  energy counter restarted from zero.

Randomness is counter-based (a hash of the seed, the phase, the job or GPU and the time slot), so
every GPU of a job draws its job's value with no per-job state, a run repeats exactly under its
seed, and the base twin's own random stream is untouched: a twin without phases runs exactly as
before. The rates of the `normal-day` preset are chosen so that a day has several of each.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import IntFlag
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
U64Array = npt.NDArray[np.uint64]

DAY_S = 86400.0


class Phase(IntFlag):
    """What a GPU is going through now (ground truth, a bit mask per GPU: `Twin.phase_mask`)."""

    CHECKPOINT = 1
    EVALUATION = 2
    LOADER_STALL = 4
    WARMUP = 8
    INFERENCE = 16
    BURST = 32
    FLATLINE = 64
    EXPORTER_RESTART = 128


PHASE_NAMES: dict[Phase, str] = {
    Phase.CHECKPOINT: "checkpoint",
    Phase.EVALUATION: "evaluation",
    Phase.LOADER_STALL: "loader_stall",
    Phase.WARMUP: "warmup",
    Phase.INFERENCE: "inference",
    Phase.BURST: "burst",
    Phase.FLATLINE: "flatline",
    Phase.EXPORTER_RESTART: "exporter_restart",
}

# -- shapes and timings (the module docstring says where each comes from) ---------------------
CHECKPOINT_PERIOD_S = (900.0, 3600.0)
CHECKPOINT_DURATION_S = (30.0, 180.0)
CHECKPOINT_ACTIVITY = 0.04  # share of the dynamic draw while it waits on storage: near idle
CHECKPOINT_UTIL = 0.05  # a few copies still run
EVAL_SHARE = 0.5
EVAL_PERIOD_S = (1800.0, 7200.0)
EVAL_DURATION_S = (120.0, 600.0)
EVAL_ACTIVITY = (0.45, 0.75)
EVAL_UTIL = 0.9
LOADER_SHARE = 0.3
LOADER_RATE_PER_H = (4.0, 30.0)
LOADER_SLOT_S = 60.0  # at most one stall per job a minute
LOADER_DURATION_S = (2.0, 20.0)
LOADER_DEPTH = (0.2, 0.7)
WARMUP_S = (60.0, 600.0)  # log-uniform
WARMUP_LOAD_FRAC = (0.2, 0.5)  # of the warm-up spent near idle before the ramp
INFERENCE_CLASS = "llm_train"
INFERENCE_PEAK_H = (13.0, 16.0)
INFERENCE_TROUGH = (0.3, 0.6)  # of the daily peak
INFERENCE_PEAK_LOAD = 0.8  # the daily peak's share of the full draw: headroom for bursts
INFERENCE_JITTER = 0.04  # sd of the minute-to-minute load jitter (share of the full draw)
INFERENCE_MIN_LOAD = 0.05
BURST_SLOT_S = 600.0
BURSTS_PER_H = 1.0
BURST_DURATION_S = (60.0, 300.0)
BURST_EXTRA = (0.15, 0.4)
FLATLINE_SLOT_S = 21600.0
FLATLINE_DURATION_S = (600.0, 7200.0)
RESTART_SLOT_S = 3600.0
RESTART_DURATION_S = (10.0, 35.0)

# Salts: one stream of draws per phase parameter.
_S_CKPT, _S_EVAL, _S_LOADER, _S_WARM, _S_INFER, _S_BURST, _S_JITTER, _S_FLAT, _S_RESTART = (
    100 * k for k in range(1, 10)
)


@dataclass(frozen=True, slots=True)
class PhaseSpec:
    """Which phases the twin plays. All off by default: the twin of `ooda demo` and of the
    policy goldens runs without them. `PRESETS` holds the named sets (`normal-day`)."""

    checkpoint: bool = False
    evaluation: bool = False
    loader_stalls: bool = False
    warmup: bool = False
    inference_share: float = 0.0  # share of the nodes running inference services all day
    flatlines_per_gpu_day: float = 0.0
    exporter_restarts_per_node_day: float = 0.0
    day_start_h: float = 0.0  # the hour of day at twin time 0 (for the services' daily curve)
    # The services' daily peak load, a share of their capacity (the rest is kept for bursts).
    inference_peak_load: float = INFERENCE_PEAK_LOAD

    def __post_init__(self) -> None:
        if not 0.0 <= self.inference_share <= 1.0:
            raise ValueError("phases.inference_share is a share of the nodes in [0, 1]")
        # A slot holds at most one event: the rates are bounded by the slots.
        if not 0.0 <= self.flatlines_per_gpu_day <= DAY_S / FLATLINE_SLOT_S:
            raise ValueError(
                f"phases.flatlines_per_gpu_day must lie in [0, {DAY_S / FLATLINE_SLOT_S:g}]"
            )
        if not 0.0 <= self.exporter_restarts_per_node_day <= DAY_S / RESTART_SLOT_S:
            raise ValueError(
                f"phases.exporter_restarts_per_node_day must lie in [0, {DAY_S / RESTART_SLOT_S:g}]"
            )
        if not 0.0 <= self.day_start_h < 24.0:
            raise ValueError("phases.day_start_h is an hour of day in [0, 24)")
        if not 0.0 < self.inference_peak_load <= 1.0:
            raise ValueError("phases.inference_peak_load is a share of capacity in (0, 1]")

    @property
    def any(self) -> bool:
        return self != PhaseSpec(
            day_start_h=self.day_start_h, inference_peak_load=self.inference_peak_load
        )

    @property
    def job_phases(self) -> bool:
        return (
            self.checkpoint
            or self.evaluation
            or self.loader_stalls
            or self.warmup
            or self.inference_share > 0
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def setting_names() -> tuple[str, ...]:
        return tuple(f.name for f in fields(PhaseSpec))


NO_PHASES = PhaseSpec()
NORMAL_DAY = PhaseSpec(
    checkpoint=True,
    evaluation=True,
    loader_stalls=True,
    warmup=True,
    inference_share=0.125,
    flatlines_per_gpu_day=0.05,
    exporter_restarts_per_node_day=1.0,
)
PRESETS: dict[str, PhaseSpec] = {"none": NO_PHASES, "normal-day": NORMAL_DAY}


# -- counter-based draws ----------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_U64 = 2**64


def _mix(z: U64Array) -> U64Array:
    """splitmix64's finalizer, in place (integer arithmetic wraps, as intended)."""
    z ^= z >> _S30
    z *= _M1
    z ^= z >> _S27
    z *= _M2
    z ^= z >> _S31
    return z


def uniform(seed: int, salt: int, *keys: npt.ArrayLike) -> FloatArray:
    """A uniform draw in [0, 1) per element of the (broadcast) keys: the same seed, salt and
    keys always give the same number."""
    arrays = [np.asarray(k, dtype=np.int64) for k in keys]
    if any(a.shape != arrays[0].shape for a in arrays):
        arrays = list(np.broadcast_arrays(*arrays))
    start = np.uint64((seed * 0x100000001B3 + salt) % _U64)
    z = _mix(np.full(arrays[0].shape, start, dtype=np.uint64))
    for key in arrays:
        z ^= key.astype(np.uint64) * _GOLDEN
        z = _mix(z)
    return (z >> _S11).astype(np.float64) * 2.0**-53


def _between(bounds: tuple[float, float], u: FloatArray) -> FloatArray:
    lo, hi = bounds
    return lo + (hi - lo) * u


@dataclass(frozen=True, slots=True)
class JobEffects:
    """Per busy GPU: what its job's phase does to it now (1.0: nothing)."""

    activity: FloatArray  # share of its dynamic draw (natural - idle) it draws
    pace: FloatArray  # share of its throughput that is progress of the job
    util: FloatArray  # share of its busy utilization
    clock: FloatArray  # share of its busy SM clock above idle
    mask: IntArray  # Phase bits


@dataclass(frozen=True, slots=True)
class _Slotted:
    """Events of one slot: at most one per key, at [start_s, end_s) (end -inf: none)."""

    slot: int
    start_s: FloatArray
    end_s: FloatArray

    def on(self, t_s: float) -> BoolArray:
        return np.asarray((t_s >= self.start_s) & (t_s < self.end_s), dtype=bool)


class _JobTable:
    """Per job row: its phase parameters, drawn once from its id (columnar, growable)."""

    NAMES = (
        "warm_s",
        "load_s",
        "ckpt_period_s",
        "ckpt_duration_s",
        "ckpt_first_s",
        "eval_period_s",
        "eval_duration_s",
        "eval_first_s",
        "eval_level",
        "loader_chance",
        "peak_h",
        "trough",
    )

    def __init__(self) -> None:
        self.n = 0
        self._columns: dict[str, FloatArray] = {name: np.zeros(64) for name in self.NAMES}

    def __getitem__(self, name: str) -> FloatArray:
        return self._columns[name][: self.n]

    def extend(self, drawn: dict[str, FloatArray]) -> None:
        """Append rows; capacity doubles, so a day of arrivals costs O(jobs) in all."""
        count = drawn["warm_s"].shape[0]
        capacity = self._columns["warm_s"].shape[0]
        if self.n + count > capacity:
            size = max(2 * capacity, self.n + count)
            for name, column in self._columns.items():
                grown = np.zeros(size)
                grown[: self.n] = column[: self.n]
                self._columns[name] = grown
        for name in self.NAMES:
            self._columns[name][self.n : self.n + count] = drawn[name]
        self.n += count


class PhasePlayer:
    """Plays a PhaseSpec for one twin: job effects per step, and what DCGM reports."""

    def __init__(
        self, spec: PhaseSpec, seed: int, nodes: int, gpus_per_node: int, startup_s: float
    ) -> None:
        self.spec = spec
        self.seed = seed
        self.nodes = nodes
        self.gpus_per_node = gpus_per_node
        self.startup_s = startup_s
        n = nodes * gpus_per_node
        self._table = _JobTable()
        self._windows: dict[int, _Slotted] = {}
        self._flat_prev = np.zeros(n, dtype=bool)
        self._frozen_power_w = np.zeros(n)
        self._frozen_temp_c = np.zeros(n)
        self._restart_prev = np.zeros(nodes, dtype=bool)
        self._energy_base_j = np.zeros(n)

    # -- jobs ------------------------------------------------------------------------------------

    @property
    def service_nodes(self) -> int:
        """How many nodes (the last ones) run inference services."""
        share = self.spec.inference_share
        return 0 if share <= 0 else min(self.nodes, max(1, round(share * self.nodes)))

    @property
    def seed_start_s(self) -> float:
        """How long before time 0 the jobs a twin starts with began: past any warm-up."""
        return max(self.startup_s, WARMUP_S[1]) if self.spec.warmup else self.startup_s

    def sync(self, job_ids: IntArray) -> None:
        """Draw the parameters of the job rows not seen yet (`job_ids`: every row's id)."""
        if job_ids.shape[0] <= self._table.n:
            return
        ids = job_ids[self._table.n :]
        seed = self.seed

        def draw(salt: int, bounds: tuple[float, float]) -> FloatArray:
            return _between(bounds, uniform(seed, salt, ids))

        lo, hi = math.log(WARMUP_S[0]), math.log(WARMUP_S[1])
        warm = np.exp(draw(_S_WARM, (lo, hi)))
        if not self.spec.warmup:
            warm = np.full(ids.shape, self.startup_s)
        ckpt_period = draw(_S_CKPT, CHECKPOINT_PERIOD_S)
        eval_period = draw(_S_EVAL, EVAL_PERIOD_S)
        evaluates = uniform(seed, _S_EVAL + 10, ids) < EVAL_SHARE
        bound = uniform(seed, _S_LOADER + 10, ids) < LOADER_SHARE
        loader_rate = draw(_S_LOADER + 11, LOADER_RATE_PER_H)
        self._table.extend(
            {
                "warm_s": warm,
                "load_s": warm * draw(_S_WARM + 1, WARMUP_LOAD_FRAC)
                if self.spec.warmup
                else 0 * warm,
                "ckpt_period_s": ckpt_period,
                "ckpt_duration_s": draw(_S_CKPT + 1, CHECKPOINT_DURATION_S),
                "ckpt_first_s": ckpt_period * draw(_S_CKPT + 2, (0.5, 1.0)),
                "eval_period_s": np.where(evaluates, eval_period, np.inf),
                "eval_duration_s": draw(_S_EVAL + 1, EVAL_DURATION_S),
                "eval_first_s": eval_period * draw(_S_EVAL + 2, (0.5, 1.0)),
                "eval_level": draw(_S_EVAL + 11, EVAL_ACTIVITY),
                "loader_chance": np.where(bound, loader_rate * LOADER_SLOT_S / 3600.0, 0.0),
                "peak_h": draw(_S_INFER, INFERENCE_PEAK_H),
                "trough": draw(_S_INFER + 1, INFERENCE_TROUGH),
            }
        )

    def warmup(self, rows: IntArray) -> tuple[FloatArray, FloatArray]:
        """Per GPU of the job rows (synced): its job's warm-up (s) and the part of it spent near
        idle before the ramp (s)."""
        return self._table["warm_s"][rows], self._table["load_s"][rows]

    def _periodic(self, name: str, rows: IntArray, run_s: FloatArray) -> BoolArray:
        """On for the job's duration every period of its run (the first at 0.5-1 period)."""
        t = self._table
        since = run_s - t[f"{name}_first_s"][rows]
        period = t[f"{name}_period_s"][rows]
        with np.errstate(invalid="ignore"):  # an infinite period: never
            phase = np.mod(since, period)
        return np.asarray((since >= 0) & (phase < t[f"{name}_duration_s"][rows]), dtype=bool)

    def _slotted(
        self,
        salt: int,
        key: IntArray,
        t_s: float,
        slot_s: float,
        chance: FloatArray | float,
        duration_s: tuple[float, float],
    ) -> _Slotted:
        """At most one event per key and slot of `slot_s`, with `chance`, at a drawn offset."""
        slot = math.floor(t_s / slot_s)
        slots = np.full(key.shape, slot, dtype=np.int64)
        hit = uniform(self.seed, salt, key, slots) < chance
        duration = _between(duration_s, uniform(self.seed, salt + 1, key, slots))
        start = slot * slot_s + (slot_s - duration) * uniform(self.seed, salt + 2, key, slots)
        return _Slotted(slot, start, np.where(hit, start + duration, -np.inf))

    def _window(
        self,
        salt: int,
        count: int,
        t_s: float,
        slot_s: float,
        chance: float,
        dur: tuple[float, float],
    ) -> _Slotted:
        """The events of keys 0..count-1 in t_s's slot (drawn once per slot)."""
        cached = self._windows.get(salt)
        if cached is None or cached.slot != math.floor(t_s / slot_s):
            key = np.arange(count, dtype=np.int64)
            cached = self._windows[salt] = self._slotted(salt, key, t_s, slot_s, chance, dur)
        return cached

    def job_effects(
        self, t_s: float, rows: IntArray, job_ids: IntArray, run_s: FloatArray, service: BoolArray
    ) -> JobEffects:
        """Per busy GPU (its job row, its job's id, the time since its warm-up ended, whether it
        serves): what its job's phase does to it now."""
        n = rows.shape[0]
        fx = JobEffects(np.ones(n), np.ones(n), np.ones(n), np.ones(n), np.zeros(n, np.int64))
        if not self.spec.job_phases or n == 0:
            return fx
        training = ~service
        if self.spec.warmup:
            fx.mask[run_s < 0] |= int(Phase.WARMUP)
        stalled = np.zeros(n, dtype=bool)
        if self.spec.checkpoint:
            stalled = self._checkpoint(fx, rows, run_s, training)
        if self.spec.evaluation:
            stalled |= self._evaluation(fx, rows, run_s, training & ~stalled)
        if self.spec.loader_stalls:
            self._loader_stalls(fx, t_s, rows, job_ids, run_s, training & ~stalled)
        if service.any():
            self._inference(fx, t_s, rows[service], job_ids[service], service)
        return fx

    def _checkpoint(
        self, fx: JobEffects, rows: IntArray, run_s: FloatArray, eligible: BoolArray
    ) -> BoolArray:
        on = eligible & self._periodic("ckpt", rows, run_s)
        fx.activity[on] = CHECKPOINT_ACTIVITY
        fx.pace[on] = 0.0
        fx.util[on] = CHECKPOINT_UTIL
        fx.clock[on] = 0.0
        fx.mask[on] |= int(Phase.CHECKPOINT)
        return on

    def _evaluation(
        self, fx: JobEffects, rows: IntArray, run_s: FloatArray, eligible: BoolArray
    ) -> BoolArray:
        on = eligible & self._periodic("eval", rows, run_s)
        fx.activity[on] = self._table["eval_level"][rows[on]]
        fx.util[on] = EVAL_UTIL
        fx.mask[on] |= int(Phase.EVALUATION)
        return on

    def _loader_stalls(
        self,
        fx: JobEffects,
        t_s: float,
        rows: IntArray,
        job_ids: IntArray,
        run_s: FloatArray,
        eligible: BoolArray,
    ) -> None:
        chance = self._table["loader_chance"][rows]
        candidates = eligible & (run_s >= 0) & (chance > 0)
        if not candidates.any():
            return
        ids = job_ids[candidates]
        ev = self._slotted(
            _S_LOADER, ids, t_s, LOADER_SLOT_S, chance[candidates], LOADER_DURATION_S
        )
        slots = np.full(ids.shape, ev.slot, dtype=np.int64)
        depth = _between(LOADER_DEPTH, uniform(self.seed, _S_LOADER + 12, ids, slots))
        on = np.zeros(rows.shape[0], dtype=bool)
        on[candidates] = ev.on(t_s)
        level = np.ones(rows.shape[0])
        level[candidates] = 1.0 - depth
        # A stall of seconds leaves the clock where it was (the checkpoint's minutes let it fall).
        for column in (fx.activity, fx.pace, fx.util):
            column[on] = level[on]
        fx.mask[on] |= int(Phase.LOADER_STALL)

    def daily_load(self, t_s: float, rows: IntArray) -> FloatArray:
        """A service's load from its users' day alone (1.0: its full draw)."""
        hour = (self.spec.day_start_h + t_s / 3600.0) % 24.0
        peak_h, trough = self._table["peak_h"][rows], self._table["trough"][rows]
        daily = trough + (1.0 - trough) * 0.5 * (1.0 + np.cos(2.0 * np.pi * (hour - peak_h) / 24.0))
        return self.spec.inference_peak_load * daily

    def _inference(
        self, fx: JobEffects, t_s: float, rows: IntArray, job_ids: IntArray, service: BoolArray
    ) -> None:
        burst = self._slotted(
            _S_BURST,
            job_ids,
            t_s,
            BURST_SLOT_S,
            BURSTS_PER_H * BURST_SLOT_S / 3600.0,
            BURST_DURATION_S,
        )
        bursting = burst.on(t_s)
        slots = np.full(job_ids.shape, burst.slot, dtype=np.int64)
        extra = _between(BURST_EXTRA, uniform(self.seed, _S_BURST + 10, job_ids, slots))
        minute = np.full(job_ids.shape, math.floor(t_s / 60.0), dtype=np.int64)
        # Uniform jitter scaled to sd INFERENCE_JITTER (sd of U(-0.5, 0.5) is 1/sqrt(12)).
        jitter = (uniform(self.seed, _S_JITTER, job_ids, minute) - 0.5) * math.sqrt(12.0)
        load = self.daily_load(t_s, rows) + np.where(bursting, extra, 0.0)
        load = np.clip(load + INFERENCE_JITTER * jitter, INFERENCE_MIN_LOAD, 1.0)
        fx.activity[service] = load
        fx.pace[service] = load
        fx.util[service] = 0.35 + 0.65 * load
        fx.mask[service] |= int(Phase.INFERENCE) | np.where(bursting, int(Phase.BURST), 0)

    # -- sensors: what DCGM reports ----------------------------------------------------------

    def restarts(self, t_s: float) -> tuple[BoolArray, FloatArray]:
        """Per node: whether its exporter is restarting now, and since when (NaN: it is not)."""
        rate = self.spec.exporter_restarts_per_node_day
        if rate <= 0:
            return np.zeros(self.nodes, dtype=bool), np.full(self.nodes, np.nan)
        chance = rate * RESTART_SLOT_S / DAY_S
        ev = self._window(_S_RESTART, self.nodes, t_s, RESTART_SLOT_S, chance, RESTART_DURATION_S)
        on = ev.on(t_s)
        return on, np.where(on, ev.start_s, np.nan)

    def flatlined(self, t_s: float) -> BoolArray:
        """Per GPU: whether its DCGM power and temperature readings are frozen now."""
        rate = self.spec.flatlines_per_gpu_day
        n = self.nodes * self.gpus_per_node
        if rate <= 0:
            return np.zeros(n, dtype=bool)
        chance = rate * FLATLINE_SLOT_S / DAY_S
        return self._window(_S_FLAT, n, t_s, FLATLINE_SLOT_S, chance, FLATLINE_DURATION_S).on(t_s)

    def report(
        self,
        t_s: float,
        power_w: FloatArray,
        temp_c: FloatArray,
        energy_j: FloatArray,
        restarting: BoolArray,
        previous: tuple[FloatArray, FloatArray],
    ) -> tuple[FloatArray, FloatArray, FloatArray, BoolArray]:
        """What DCGM reports for power, temperature and energy (and which GPUs are flat-lined):
        the truth, but frozen where a reading flat-lines (at the value reported before), and the
        energy counted from the end of the node's last exporter restart."""
        flat = self.flatlined(t_s)
        reported_power, reported_temp = power_w, temp_c
        if flat.any():
            new = flat & ~self._flat_prev
            self._frozen_power_w[new] = previous[0][new]
            self._frozen_temp_c[new] = previous[1][new]
            reported_power = np.where(flat, self._frozen_power_w, power_w)
            reported_temp = np.where(flat, self._frozen_temp_c, temp_c)
        self._flat_prev = flat
        back = self._restart_prev & ~restarting
        if back.any():
            gpus = np.repeat(back, self.gpus_per_node)
            self._energy_base_j[gpus] = energy_j[gpus]
        self._restart_prev = restarting.copy()
        reported_energy = energy_j - self._energy_base_j if self._energy_base_j.any() else energy_j
        return reported_power, reported_temp, reported_energy, flat


def preset(name: str) -> PhaseSpec:
    """A named set of phases; a bad name raises ValueError naming the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown phase preset {name!r} (known: {', '.join(sorted(PRESETS))})"
        ) from None

"""The digital twin: N nodes x G GPUs running a stream of jobs, on a virtual or real clock.

Physics per GPU, vectorized over the fleet (columnar numpy, no per-GPU objects):
- power: a busy GPU draws its job's natural draw, or `cap_draw_frac` x its cap when the cap binds
  (agent.core.curves), ramping up from idle over the job's start-up; noise on top, never above the
  enforced limit; an idle GPU draws the model's idle power.
- throughput: the job's curve (agent/sim/calibration.py, from Zeus's measured sweeps); a job
  advances at the pace of its slowest GPU (synchronous data-parallel training).
- temperature: first order, T' = (ambient + R * P - T) / tau, with per-GPU variation in R; above
  the slowdown temperature the hardware throttles (clock and power drop).
- jobs: Poisson arrivals sized to a target occupancy (or given per hour of day), lognormal amounts
  of work (or a real cluster's durations, agent/sim/jobmix.py), FIFO with backfill onto the
  lowest-weight, best-fitting undrained node (Slurm's habit), a job larger than a node on whole
  free nodes; a capped job takes longer. Workloads are the built-in classes
  (agent/sim/calibration.py) or measured curves (agent/sim/measured.py).
- a facility budget that changes over time (a demand-response drop), and injected faults.
- optionally, the normal-but-surprising phases of a real fleet (agent/sim/phases.py: checkpoint
  stalls, evaluations, data-loader stalls, warm-ups, inference services, flat-lined readings,
  exporter restarts); `phase_mask` says which each GPU is in. Telemetry readers take power,
  temperature and energy from the `reported_*` columns (what DCGM serves), the physics and the
  KPIs from the true ones.

Deterministic under its seed. Ground truth (true curves) is readable only through `true_curves()`,
which only the oracle uses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from agent.core.curves import throughput_at_power
from agent.core.gpu_models import H100_SXM, GpuModel
from agent.sim.calibration import DEFAULT_MIX, WORKLOADS, WorkloadClass
from agent.sim.faults import FaultKind, FaultSpec
from agent.sim.inference import ServiceMeters, ServiceState, service_state
from agent.sim.jobmix import HOURS, WorkTable, sizes_for
from agent.sim.phases import INFERENCE_CLASS, NO_PHASES, Phase, PhasePlayer, PhaseSpec

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

IDLE_SM_CLOCK_MHZ = 345.0
# The lowest graphics clock a GPU supports (NVML's supported clocks: 210 MHz on H100 and A100).
MIN_SUPPORTED_CLOCK_MHZ = 210.0
# A clock-locked training GPU: the share of its dynamic draw that does not scale with the SM
# clock, and the exponent of the rest (as the inference services' prefill: agent/sim/inference.py).
LOCKED_STATIC_SHARE = 0.15
LOCKED_POWER_EXP = 2.4
THROTTLE_THROUGHPUT = 0.5  # hardware thermal slowdown: the clock drops hard
THROTTLE_POWER = 0.6
# A failed fan stops within seconds; the heat sink's thermal mass (thermal_tau_s) is what spreads
# the temperature rise over a minute or two.
FAN_RAMP_S = 10.0
FATAL_XIDS = frozenset({48, 62, 64, 74, 79, 95, 119, 120, 140})  # the GPU stops doing work

JOB_PENDING, JOB_RUNNING, JOB_DONE = 0, 1, 2


# The labels the twin gives each GPU (Snapshot.labels): its job's priority class, and with
# `TwinSpec.workload_label` its job's workload class (as a cluster whose jobs say what they run).
PRIORITY_LABEL = "priority"
WORKLOAD_LABEL = "workload"
TWIN_LABELS = (PRIORITY_LABEL, WORKLOAD_LABEL)


@dataclass(frozen=True, slots=True)
class BudgetSchedule:
    """A piecewise-constant facility budget: (start_s, budget_w) steps, the first at 0."""

    steps: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if not self.steps or self.steps[0][0] != 0.0:
            raise ValueError("a budget schedule starts at t=0")
        times = [t for t, _ in self.steps]
        if times != sorted(times) or len(set(times)) != len(times):
            raise ValueError("budget schedule times must increase")
        if any(w <= 0 for _, w in self.steps):
            raise ValueError("budgets must be positive watts")

    def at(self, t_s: float) -> float:
        budget = self.steps[0][1]
        for start, watts in self.steps:
            if t_s >= start:
                budget = watts
        return budget

    def change_times(self) -> list[float]:
        return [t for t, _ in self.steps[1:]]

    @staticmethod
    def constant(budget_w: float) -> BudgetSchedule:
        return BudgetSchedule(((0.0, budget_w),))

    @staticmethod
    def demand_response(
        normal_w: float, drop_w: float, start_s: float, duration_s: float
    ) -> BudgetSchedule:
        """The budget at `normal_w`, dropping to `drop_w` for `duration_s` from `start_s`."""
        return BudgetSchedule(
            ((0.0, normal_w), (start_s, drop_w), (start_s + duration_s, normal_w))
        )


@dataclass(frozen=True)
class TwinSpec:
    nodes: int = 8
    gpus_per_node: int = 8
    model: GpuModel = H100_SXM
    seed: int = 0
    step_s: float = 1.0  # physics resolution (twin seconds)
    occupancy: float = 0.85  # target share of busy GPUs; arrivals are sized to it
    median_job_s: float = 2400.0  # median work of a job, in seconds at full speed
    job_sizes: tuple[tuple[int, float], ...] = ((1, 0.2), (2, 0.15), (4, 0.25), (8, 0.4))
    priorities: tuple[tuple[int, float], ...] = ((0, 0.3), (1, 0.5), (2, 0.2))
    mix: tuple[tuple[str, float], ...] = tuple(DEFAULT_MIX.items())
    startup_s: float = 90.0  # a job ramps from idle to its natural draw (loading, init)
    ambient_c: float = 30.0
    thermal_tau_s: float = 45.0
    power_noise_frac: float = 0.02
    node_overhead_w: float = 0.0  # non-GPU power per node counted against the budget
    budget: BudgetSchedule | None = None  # None: no facility budget
    faults: tuple[FaultSpec, ...] = ()
    initial_jobs: bool = True  # start with the cluster at its target occupancy
    phases: PhaseSpec = NO_PHASES  # normal-but-surprising phases (none by default)
    # Workload classes beside the built-in ones (measured curves), usable in `mix`.
    workloads: tuple[WorkloadClass, ...] = ()
    # A real cluster's durations (agent/sim/jobmix.py) instead of the lognormal of median_job_s.
    durations: WorkTable | None = None
    # Arrivals by hour of day (24 values, the hour from phases.day_start_h): relative to the
    # occupancy-sized rate (`arrival_shape`, mean 1), or jobs per hour (`arrivals_per_h`, which
    # then set the rate instead of the occupancy).
    arrival_shape: tuple[float, ...] = ()
    arrivals_per_h: tuple[float, ...] = ()
    multi_node: bool = False  # sizes above a node take whole nodes (else they are left out)
    workload_label: bool = False  # telemetry labels each GPU with its job's workload class
    job_mix: str = ""  # the name of the job mix played, for the record

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError("the twin needs at least one node and one GPU per node")
        if not 0.0 <= self.occupancy <= 1.0:
            raise ValueError("occupancy is a fraction in [0, 1]")
        if self.step_s <= 0:
            raise ValueError("step_s must be positive")
        catalog = self.catalog()
        unknown = [name for name, _ in self.mix if name not in catalog]
        if unknown:
            raise ValueError(
                f"unknown workload classes in mix: {unknown} (known: {sorted(catalog)})"
            )
        if not self.mix or sum(p for _, p in self.mix) <= 0:
            raise ValueError("the workload mix needs a positive share")
        for name, hours in (
            ("arrival_shape", self.arrival_shape),
            ("arrivals_per_h", self.arrivals_per_h),
        ):
            if hours and (len(hours) != HOURS or min(hours) < 0):
                raise ValueError(f"{name}: {HOURS} values, none negative, one per hour of day")
        for fault in self.faults:
            if fault.node > self.nodes:
                raise ValueError(f"fault {fault}: the twin has only {self.nodes} nodes")
            if fault.gpu is not None and fault.gpu >= self.gpus_per_node:
                raise ValueError(f"fault {fault}: nodes have GPUs 0..{self.gpus_per_node - 1}")

    @property
    def n_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def thermal_r_c_per_w(self) -> float:
        # At TDP a healthy, well-cooled GPU settles 10 C under its slowdown temperature.
        return (self.model.slowdown_temp_c - 10.0 - self.ambient_c) / self.model.tdp_w

    def catalog(self) -> dict[str, WorkloadClass]:
        """The workload classes jobs are drawn from: the built-in ones and `workloads`."""
        return {**WORKLOADS, **{w.name: w for w in self.workloads}}

    def expected_demand_w(self) -> float:
        """Expected fleet draw with no caps at the target occupancy (for sizing budgets)."""
        total_share = sum(p for _, p in self.mix)
        catalog = self.catalog()
        busy_w = sum(catalog[n].natural_frac * p for n, p in self.mix) / total_share
        busy_w *= self.model.max_cap_w
        per_gpu = self.occupancy * busy_w + (1 - self.occupancy) * self.model.idle_w
        return self.n_gpus * per_gpu + self.nodes * self.node_overhead_w


class _Jobs:
    """The job table, columnar and growable."""

    def __init__(self) -> None:
        self.n = 0
        cap = 64
        self.job_id = np.zeros(cap, dtype=np.int64)
        self.workload = np.zeros(cap, dtype=np.int64)
        self.natural_w = np.zeros(cap)
        self.a = np.zeros(cap)
        self.b = np.zeros(cap)
        self.cap_draw_frac = np.zeros(cap)
        self.clock_frac = np.zeros(cap)
        self.n_gpus = np.zeros(cap, dtype=np.int64)
        self.work_left_s = np.zeros(cap)
        self.priority = np.zeros(cap, dtype=np.int64)
        self.submit_s = np.zeros(cap)
        self.start_s = np.full(cap, np.nan)
        self.state = np.zeros(cap, dtype=np.int64)
        self.requeues = np.zeros(cap, dtype=np.int64)
        self.external = np.zeros(cap, dtype=bool)  # placed from outside (e.g. mirrored Slurm)
        self.service = np.zeros(cap, dtype=bool)  # an inference service (runs all day)

    def _grow(self) -> None:
        for name, arr in list(vars(self).items()):
            if isinstance(arr, np.ndarray):
                extra = np.full_like(arr, np.nan) if name == "start_s" else np.zeros_like(arr)
                setattr(self, name, np.concatenate([arr, extra]))

    def add(self, **values: float) -> int:
        if self.n == self.job_id.shape[0]:
            self._grow()
        row = self.n
        for name, value in values.items():
            getattr(self, name)[row] = value
        self.n += 1
        return row


@dataclass(frozen=True, slots=True)
class _Levels:
    """Per GPU, this step: its warm-up ramp, and its job phase's share of its dynamic draw, of
    its progress, of its utilization and of its SM clock above idle (1.0: no phase)."""

    ramp: FloatArray
    activity: FloatArray
    pace: FloatArray
    util: FloatArray
    clock: FloatArray


@dataclass
class StepLog:
    """Per physics step: what the KPIs are computed from (columnar, appended in chunks)."""

    t_s: list[FloatArray] = field(default_factory=list)
    fleet_w: list[FloatArray] = field(default_factory=list)
    budget_w: list[FloatArray] = field(default_factory=list)
    work_gpu_s: list[FloatArray] = field(default_factory=list)


class Twin:
    """The twin's state and physics. Time starts at 0 (twin seconds)."""

    def __init__(self, spec: TwinSpec) -> None:
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.t_s = 0.0
        self._init_inventory()
        self._init_state()
        self._init_phases()
        self._init_jobs()
        self._fault_state(0.0)
        self._start_services()
        if spec.initial_jobs:
            self._seed_jobs()
        self._exporter_state(0.0)
        self._physics(0.0)
        self._report()
        self.node_last_seen_s[:] = 0.0

    def _init_inventory(self) -> None:
        """Who is where: nodes, GPU indices, UUIDs, bus ids, and the GPUs' power limits."""
        spec, model = self.spec, self.spec.model
        n, g = spec.n_gpus, spec.gpus_per_node
        self.node_of = np.repeat(np.arange(spec.nodes, dtype=np.int64), g)
        self.gpu_idx = np.tile(np.arange(g, dtype=np.int64), spec.nodes)
        self.node_names = np.array([f"node{k + 1}" for k in range(spec.nodes)], dtype=np.str_)
        self.uuid = np.array([_uuid(spec.seed, i) for i in range(n)], dtype=np.str_)
        self.pci_bus_id = np.array(
            [f"00000000:{0x17 + 0x10 * int(i):02X}:00.0" for i in self.gpu_idx], dtype=np.str_
        )
        self.cap_w = np.full(n, model.default_cap_w)
        self.enforced_w = self.cap_w.copy()
        self.min_w = np.full(n, model.min_cap_w)
        self.max_w = np.full(n, model.max_cap_w)
        self.default_w = np.full(n, model.default_cap_w)
        # Supported graphics clocks, and the locked range (NaN: not locked; NVML's
        # nvmlDeviceSetGpuLockedClocks / ResetGpuLockedClocks).
        self.min_clock_mhz = np.full(n, MIN_SUPPORTED_CLOCK_MHZ)
        self.max_clock_mhz = np.full(n, model.max_sm_clock_mhz)
        self.clock_lock_min_mhz = np.full(n, np.nan)
        self.clock_lock_max_mhz = np.full(n, np.nan)
        self._any_locked = False

    def _init_state(self) -> None:
        """The GPUs' and nodes' physical state and telemetry, idle."""
        spec, model = self.spec, self.spec.model
        n = spec.n_gpus
        self.thermal_r = spec.thermal_r_c_per_w * self.rng.uniform(0.95, 1.05, n)
        self.temp_c = np.full(n, spec.ambient_c + model.idle_w * spec.thermal_r_c_per_w)
        self.energy_j = np.zeros(n)
        self.job_row = np.full(n, -1, dtype=np.int64)
        self.xid = np.zeros(n, dtype=np.int64)
        self.ecc_dbe = np.zeros(n)
        self.remapped_uncorrectable = np.zeros(n)
        self.row_remap_failure = np.zeros(n)
        self.power_w = np.full(n, model.idle_w)
        # The draw without its sampling noise (ground truth, for benchmarks: what knowing the
        # present exactly would give a forecast).
        self.noise_free_power_w = np.full(n, model.idle_w)
        self.util_pct = np.zeros(n)
        self.mem_util_pct = np.zeros(n)
        self.sm_clock_mhz = np.full(n, IDLE_SM_CLOCK_MHZ)
        self.throughput = np.zeros(n)  # relative to uncapped, per GPU
        # What its cap alone costs a working GPU's throughput (ground truth, for benchmarks).
        self.cap_slowdown = np.zeros(n)
        self.throttled = np.zeros(n, dtype=bool)
        self.clocks_event_reasons = np.zeros(n, dtype=np.int64)  # NVML/DCGM throttle bitmask
        self.services = ServiceMeters()  # the inference services' vLLM counters
        self.node_drained = np.zeros(spec.nodes, dtype=bool)
        self.node_weight = np.ones(spec.nodes, dtype=np.int64)
        self.node_features: list[set[str]] = [set() for _ in range(spec.nodes)]
        self.exporter_up = np.ones(spec.nodes, dtype=bool)
        self.node_last_seen_s = np.zeros(spec.nodes)

    def _init_phases(self) -> None:
        """The normal-but-surprising phases' player and what DCGM reports (the truth, so far)."""
        spec, n = self.spec, self.spec.n_gpus
        self.phases = PhasePlayer(
            spec.phases, spec.seed, spec.nodes, spec.gpus_per_node, spec.startup_s
        )
        # Per node: its exporter is restarting (its series are gone), since when (NaN: it is not).
        self.exporter_restarting = np.zeros(spec.nodes, dtype=bool)
        self.restart_since_s = np.full(spec.nodes, np.nan)
        self.phase_mask = np.zeros(n, dtype=np.int64)  # Phase bits per GPU (ground truth)
        self._activity = np.ones(n)  # share of its dynamic draw each GPU's job phase allows
        # What DCGM reports (flat-lined readings frozen, the energy counter reset by a restart).
        self.reported_power_w = self.power_w
        self.reported_temp_c = self.temp_c
        self.reported_energy_j = self.energy_j

    def _init_jobs(self) -> None:
        """The job table, the KPIs' counters, and the arrivals' mix, sizes and rate."""
        spec, n, g = self.spec, self.spec.n_gpus, self.spec.gpus_per_node
        self.jobs = _Jobs()
        self.pending: list[int] = []
        self.work_done_gpu_s = 0.0
        # Work done per priority class (index = class), for priority-weighted comparisons.
        self.work_by_priority_gpu_s = np.zeros(int(max(p for p, _ in spec.priorities)) + 1)
        self.energy_total_j = 0.0
        self.log = StepLog()
        self._log_buf: list[tuple[float, float, float, float]] = []
        self._catalog = spec.catalog()
        self._workload_names = [name for name, _ in spec.mix]
        total = sum(p for _, p in spec.mix)
        self._workload_p = np.array([p / total for _, p in spec.mix])
        # Training jobs share the GPUs the inference services (the last nodes) leave.
        self.training_gpus = n - self.phases.service_nodes * g
        self._sizes, self._sizes_p = sizes_for(
            spec.job_sizes, g, self.training_gpus, spec.multi_node
        )
        prio = spec.priorities
        self._prio = np.array([p for p, _ in prio], dtype=np.int64)
        self._prio_p = np.array([w for _, w in prio]) / sum(w for _, w in prio)
        mean_size = float((self._sizes * self._sizes_p).sum())
        if spec.durations is not None:
            mean_work = spec.durations.mean_s()
        else:
            mean_work = spec.median_job_s * float(np.exp(0.8**2 / 2))  # lognormal mean
        self.arrival_rate_per_s = spec.occupancy * self.training_gpus / (mean_size * mean_work)
        # Per hour of day: the rate (jobs a second) the arrivals follow.
        if spec.arrivals_per_h:
            self._rate_by_hour = np.asarray(spec.arrivals_per_h, dtype=np.float64) / 3600.0
            self.arrival_rate_per_s = float(self._rate_by_hour.mean())
        elif spec.arrival_shape:
            shape = np.asarray(spec.arrival_shape, dtype=np.float64)
            self._rate_by_hour = self.arrival_rate_per_s * shape / shape.mean()
        else:
            self._rate_by_hour = np.zeros(0)
        self._ecc_counted: set[int] = set()

    # -- jobs -----------------------------------------------------------------------------------

    def _new_job(self, now_s: float, work_s: float | None = None) -> int:
        wl_idx = int(self.rng.choice(len(self._workload_names), p=self._workload_p))
        wl = self._catalog[self._workload_names[wl_idx]]
        # Per-job natural draw within the class's measured spread (IQR ~ 1.35 sigma).
        sigma = (wl.natural_frac_hi - wl.natural_frac_lo) / 1.35
        lo_frac = self.spec.model.idle_w / self.spec.model.max_cap_w + 0.05
        frac = float(np.clip(self.rng.normal(wl.natural_frac, sigma), lo_frac, 0.98))
        if work_s is None:
            work_s = self._draw_work()
        size = int(self.rng.choice(self._sizes, p=self._sizes_p))
        row = self.jobs.add(
            job_id=1000 + self.jobs.n,
            workload=wl_idx,
            natural_w=frac * self.spec.model.max_cap_w,
            a=wl.a,
            b=wl.b,
            cap_draw_frac=wl.cap_draw_frac,
            clock_frac=float(self.rng.uniform(0.9, 1.0)),
            n_gpus=size,
            work_left_s=work_s,
            priority=int(self.rng.choice(self._prio, p=self._prio_p)),
            submit_s=now_s,
            state=JOB_PENDING,
        )
        self.pending.append(row)
        return row

    def _draw_work(self) -> float:
        """A new job's work (seconds at full speed)."""
        if self.spec.durations is not None:
            return self.spec.durations.sample(self.rng)
        return self._lognormal_work()

    def _draw_running_work(self) -> float:
        """The whole work of a job found running at time 0 (a long job is more likely found)."""
        if self.spec.durations is not None:
            return self.spec.durations.sample_running(self.rng)
        return self._lognormal_work()

    def _lognormal_work(self) -> float:
        """Without a duration table: lognormal about median_job_s, 5 minutes to 12 hours."""
        work_s = self.rng.lognormal(np.log(self.spec.median_job_s), 0.8)
        return float(np.clip(work_s, 300, 12 * 3600))

    def _start_services(self) -> None:
        """One inference service per node on the last `service_nodes` nodes, running all day at
        the inference class's natural draw (its load curve scales that)."""
        count = self.phases.service_nodes
        if count == 0:
            return
        if INFERENCE_CLASS not in self._workload_names:  # drawn never: the mix has no such jobs
            self._workload_names.append(INFERENCE_CLASS)
            self._workload_p = np.append(self._workload_p, 0.0)
        wl = self._catalog[INFERENCE_CLASS]
        g = self.spec.gpus_per_node
        for node in range(self.spec.nodes - count, self.spec.nodes):
            row = self.jobs.add(
                job_id=1000 + self.jobs.n,
                workload=self._workload_names.index(INFERENCE_CLASS),
                natural_w=wl.natural_frac * self.spec.model.max_cap_w,
                a=wl.a,
                b=wl.b,
                cap_draw_frac=wl.cap_draw_frac,
                clock_frac=1.0,
                n_gpus=g,
                work_left_s=np.inf,
                priority=int(self._prio.max()),
                submit_s=0.0,
                state=JOB_PENDING,
                service=True,
            )
            self.assign(row, np.arange(node * g, (node + 1) * g), -self.phases.seed_start_s)

    def _seed_jobs(self) -> None:
        """Fill the cluster to its target occupancy with jobs already past their start-up,
        packed node by node (O(GPUs): a 100,000-GPU twin starts in seconds)."""
        limit = self.training_gpus  # the rows before the inference services' nodes
        target = round(self.spec.occupancy * limit)
        g = self.spec.gpus_per_node
        busy = 0
        cursor = 0  # the next free GPU row; nodes fill in order, a job never spans two nodes
        misses = 0  # jobs too big for what is left: keep drawing (smaller ones fit), boundedly
        while busy < target and misses < 100:
            # Remaining work of a job caught mid-run: uniform share of a fresh job's work.
            work = self._draw_running_work()
            row = self._new_job(0.0, work * float(self.rng.uniform(0.05, 1.0)))
            self.pending.pop()
            size = int(self.jobs.n_gpus[row])
            start = cursor
            if size > g:
                start += (g - start % g) % g  # a multi-node job starts on a node of its own
            elif start % g + size > g:
                start += g - start % g  # does not fit on this node: start the next one
            if start + size > limit or busy + size > target + size // 2:
                self.jobs.state[row] = JOB_DONE  # does not fit what is left
                misses += 1
                continue
            self.assign(row, np.arange(start, start + size), -self.phases.seed_start_s)
            cursor = start + size
            busy += size

    def _free_mask(self) -> BoolArray:
        failed = np.isin(self.xid, list(FATAL_XIDS))
        return np.asarray(
            (self.job_row < 0) & ~failed & ~self.node_drained[self.node_of], dtype=bool
        )

    def _place(self, row: int, now_s: float) -> bool:
        size = int(self.jobs.n_gpus[row])
        free = self._free_mask()
        free_per_node = np.bincount(self.node_of[free], minlength=self.spec.nodes)
        g = self.spec.gpus_per_node
        if size > g:  # whole free nodes, lowest weight first
            whole = np.flatnonzero(free_per_node == g)
            if whole.size * g < size:
                return False
            order = np.lexsort((whole, self.node_weight[whole]))
            nodes = whole[order[: size // g]]
            self.assign(row, np.flatnonzero(np.isin(self.node_of, nodes) & free), now_s)
            return True
        fits = np.flatnonzero(free_per_node >= size)
        if fits.size == 0:
            return False
        # Lowest weight first, then best fit (fewest free GPUs), then lowest index.
        order = np.lexsort((fits, free_per_node[fits], self.node_weight[fits]))
        node = int(fits[order[0]])
        gpus = np.flatnonzero(free & (self.node_of == node))[:size]
        self.assign(row, gpus, now_s)
        return True

    def assign(self, row: int, gpu_rows: npt.ArrayLike, now_s: float) -> None:
        """Start job `row` on the given GPUs (also used by an external scheduler mirror)."""
        gpus = np.asarray(gpu_rows, dtype=np.int64)
        self.job_row[gpus] = row
        self.jobs.n_gpus[row] = gpus.size
        self.jobs.state[row] = JOB_RUNNING
        self.jobs.start_s[row] = now_s

    def add_external_job(self, job_id: int, priority: int, now_s: float) -> int:
        """A job an outside scheduler places (e.g. a mirrored Slurm job): drawn like the twin's own
        (workload class, natural draw) but never placed, finished or requeued by the twin itself;
        `assign` and `release_job` move it. Returns its row."""
        row = self._new_job(now_s, work_s=np.inf)
        self.pending.remove(row)
        self.jobs.job_id[row] = job_id
        self.jobs.priority[row] = priority
        self.jobs.external[row] = True
        return row

    def release_job(self, row: int, finished: bool) -> None:
        """Free the GPUs of job `row`: it ended (`finished`) or went back to waiting."""
        self.job_row[self.job_row == row] = -1
        self.jobs.state[row] = JOB_DONE if finished else JOB_PENDING
        self.jobs.start_s[row] = np.nan

    def arrival_rate_at(self, t_s: float) -> float:
        """Jobs a second arriving at twin time t_s (by its hour of day, when given)."""
        if self._rate_by_hour.size == 0:
            return self.arrival_rate_per_s
        hour = int((self.spec.phases.day_start_h + t_s / 3600.0) % 24.0)
        return float(self._rate_by_hour[hour])

    def _arrivals_and_scheduling(self, dt: float) -> None:
        arrivals = int(self.rng.poisson(self.arrival_rate_at(self.t_s) * dt))
        for _ in range(arrivals):
            self._new_job(self.t_s)
        if not self.pending:
            return
        still: list[int] = []
        for row in self.pending:
            if not self._place(row, self.t_s):
                still.append(row)
        self.pending = still

    def requeue_job(self, job_id: int) -> bool:
        """Stop a running job and put it back in the queue (its progress is kept)."""
        rows = np.flatnonzero(self.jobs.job_id[: self.jobs.n] == job_id)
        if rows.size == 0 or self.jobs.state[rows[0]] != JOB_RUNNING:
            return False
        row = int(rows[0])
        self.job_row[self.job_row == row] = -1
        self.jobs.state[row] = JOB_PENDING
        self.jobs.start_s[row] = np.nan
        self.jobs.requeues[row] += 1
        if not self.jobs.external[row]:  # an outside scheduler places its own jobs again
            self.pending.insert(0, row)
        return True

    def running_job_ids(self) -> dict[int, list[int]]:
        """Job id -> GPU rows, for running jobs."""
        out: dict[int, list[int]] = {}
        for gpu, row in enumerate(self.job_row):
            if row >= 0:
                out.setdefault(int(self.jobs.job_id[row]), []).append(gpu)
        return out

    # -- faults ---------------------------------------------------------------------------------

    def _fault_rows(self, fault: FaultSpec) -> IntArray:
        base = (fault.node - 1) * self.spec.gpus_per_node
        if fault.gpu is None:
            return np.arange(base, base + self.spec.gpus_per_node, dtype=np.int64)
        return np.array([base + fault.gpu], dtype=np.int64)

    def _fault_state(self, t_s: float) -> None:
        """Set the per-GPU fault effects active at t_s."""
        n = self.spec.n_gpus
        self.fan_factor = np.ones(n)
        self.straggler_factor = np.ones(n)
        self.spike_w = np.zeros(n)
        self.exporter_up[:] = True
        xid_now = np.zeros(n, dtype=np.int64)
        for fault_no, fault in enumerate(self.spec.faults):
            rows = self._fault_rows(fault)
            if fault.kind is FaultKind.DROPOUT:
                if fault.active(t_s):
                    self.exporter_up[fault.node - 1] = False
                continue
            if not fault.active(t_s):
                continue
            if fault.kind is FaultKind.XID:
                xid_now[rows] = int(fault.param)
            elif fault.kind is FaultKind.ECC:
                xid_now[rows] = np.maximum(xid_now[rows], 48)  # a DBE raises XID 48
                self.row_remap_failure[rows] = 1.0
                if fault_no not in self._ecc_counted:  # counters rise once per fault
                    self.ecc_dbe[rows] += fault.param
                    self.remapped_uncorrectable[rows] += 1.0
                    self._ecc_counted.add(fault_no)
            elif fault.kind is FaultKind.FAN:
                ramp = min(1.0, (t_s - fault.start_s) / FAN_RAMP_S)
                self.fan_factor[rows] = 1.0 + (fault.param - 1.0) * ramp
            elif fault.kind is FaultKind.STRAGGLER:
                self.straggler_factor[rows] = fault.param
            elif fault.kind is FaultKind.SPIKE:
                extra = 0.4 * self.spec.model.tdp_w if np.isnan(fault.param) else fault.param
                self.spike_w[rows] = extra
        self.xid = xid_now
        # A recovered GPU's ECC condition clears with the reset that recovers it; the reset also
        # clears the volatile double-bit counter (the remapped-row count is persistent).
        ecc_active = np.zeros(n, dtype=bool)
        for fault in self.spec.faults:
            if fault.kind is FaultKind.ECC and fault.active(t_s):
                ecc_active[self._fault_rows(fault)] = True
        self.row_remap_failure[~ecc_active] = 0.0
        self.ecc_dbe[~ecc_active] = 0.0

    # -- physics --------------------------------------------------------------------------------

    def _physics(self, dt: float) -> None:
        spec, model, jobs = self.spec, self.spec.model, self.jobs
        busy = self.job_row >= 0
        rows = self.job_row[busy]
        failed = np.isin(self.xid, list(FATAL_XIDS))
        self.enforced_w = self.cap_w.copy()

        lv = self._job_levels(busy, rows)
        ramp = lv.ramp
        natural = np.full(spec.n_gpus, model.idle_w)
        natural[busy] = (
            model.idle_w + (jobs.natural_w[rows] - model.idle_w) * ramp[busy] * lv.activity[busy]
        )
        k = np.ones(spec.n_gpus)
        k[busy] = jobs.cap_draw_frac[rows]
        a = np.zeros(spec.n_gpus)
        b = np.ones(spec.n_gpus)
        a[busy] = jobs.a[rows]
        b[busy] = jobs.b[rows]

        working = busy & ~failed
        straggle = self.straggler_factor
        natural_eff = np.where(working, natural * (0.85 + 0.15 * straggle), model.idle_w)
        # A clock lock holds a training GPU's draw as a cap would; an inference service's
        # phases have their own clock model (agent/sim/inference.py).
        locked_w = self._locked_draw_w(natural_eff)
        mean_power = np.minimum(locked_w, k * self.enforced_w)
        svc = self._serve(busy, rows, lv, k, working)
        if svc is not None:
            natural_eff[svc[0]], mean_power[svc[0]] = svc[1].natural_w, svc[1].power_w
        noise = 1.0 + spec.power_noise_frac * self.rng.standard_normal(spec.n_gpus)
        # A spike is an excursion the GPU's power limiter does not hold (a firmware or sensor
        # fault, or a surge faster than the limiter): the draw can pass the enforced limit, up to
        # the board's maximum. Without one, the limit holds.
        ceiling = np.where(
            self.spike_w > 0, np.maximum(self.enforced_w, self.max_w), self.enforced_w
        )
        self.throttled = self.temp_c >= model.slowdown_temp_c
        spiking = self.spike_w > 0

        def draw(noise: FloatArray | float) -> FloatArray:
            """The draw at a sampling noise (1.0: none, the level it scatters about)."""
            power = np.minimum(mean_power * noise + self.spike_w, ceiling)
            power = np.where(working | spiking, power, model.idle_w * (1 + 0.01 * (noise - 1)))
            return np.maximum(np.where(self.throttled, power * THROTTLE_POWER, power), 0.0)

        self.power_w = draw(noise)
        self.noise_free_power_w = draw(1.0)

        under_cap = throughput_at_power(mean_power, natural_eff, a, b)
        self.cap_slowdown = np.where(working, 1.0 - under_cap, 0.0)
        tput = np.where(working, under_cap * ramp, 0.0)
        tput *= straggle
        tput = np.where(self.throttled, tput * THROTTLE_THROUGHPUT, tput)
        self.throughput = tput * lv.pace  # a stalled job draws, and clocks, but does not progress
        # What NVML reports as clock event reasons: the power cap (0x4) binds when the job
        # would draw more than the cap lets it; thermal slowdown (0x20 | 0x40) when throttled.
        cap_binds = working & (np.minimum(natural_eff, locked_w) > k * self.enforced_w)
        self.clocks_event_reasons = np.asarray(
            np.where(cap_binds, 0x4, 0) | np.where(self.throttled, 0x60, 0), dtype=np.int64
        )

        self._telemetry(busy, rows, working, failed, noise, tput, lv)
        if svc is not None:
            self._service_telemetry(svc[0], svc[1], lv, dt)

        if dt > 0:
            target = spec.ambient_c + self.thermal_r * self.fan_factor * self.power_w
            self.temp_c += (target - self.temp_c) * (1.0 - np.exp(-dt / spec.thermal_tau_s))
            self.energy_j += self.power_w * dt

    def _lock_frac(self) -> FloatArray:
        """Per GPU: its locked clock's share of the maximum (1.0: not locked)."""
        if not self._any_locked:  # the common case: no lock anywhere, nothing to compute
            return np.ones(self.spec.n_gpus)
        lock = self.clock_lock_max_mhz
        return np.where(np.isfinite(lock), np.minimum(lock / self.max_clock_mhz, 1.0), 1.0)

    def _locked_draw_w(self, natural_w: FloatArray) -> FloatArray:
        """Per GPU: the most a clock lock lets it draw (its natural draw where not locked)."""
        if not self._any_locked:
            return natural_w
        r = self._lock_frac()
        idle = self.spec.model.idle_w
        scale = LOCKED_STATIC_SHARE + (1.0 - LOCKED_STATIC_SHARE) * r**LOCKED_POWER_EXP
        return np.where(r < 1.0, idle + np.maximum(natural_w - idle, 0.0) * scale, natural_w)

    def _serve(
        self, busy: BoolArray, rows: IntArray, lv: _Levels, k: FloatArray, working: BoolArray
    ) -> tuple[IntArray, ServiceState] | None:
        """The inference services' GPUs and their state this step (None: no services)."""
        serving = np.zeros(self.spec.n_gpus, dtype=bool)
        serving[busy] = self.jobs.service[rows]
        serving &= working
        if not serving.any():
            return None
        gpus = np.flatnonzero(serving)
        model = self.spec.model
        state = service_state(
            load=lv.activity[gpus] * lv.ramp[gpus],
            lock_frac=self._lock_frac()[gpus],
            limit_w=k[gpus] * self.enforced_w[gpus],
            idle_w=model.idle_w,
            board_w=model.max_cap_w,
            gpus=np.ones(gpus.shape[0]),
        )
        return gpus, state

    def _service_telemetry(
        self, gpus: IntArray, state: ServiceState, lv: _Levels, dt: float
    ) -> None:
        """A service GPU's progress (its share of the tokens asked of it), SM clock (the phases'
        clocks, weighted by their time) and the vLLM counters of its service (the service's
        tokens are its GPUs' sum; its latencies its slowest GPU's)."""
        load = lv.activity[gpus] * lv.ramp[gpus]
        self.throughput[gpus] = np.where(self.throttled[gpus], 0.5, 1.0) * state.pace * load
        self.cap_slowdown[gpus] = 1.0 - state.pace
        r = (1.0 - state.prefill_share) * state.r_decode + state.prefill_share * state.r_prefill
        self.sm_clock_mhz[gpus] = np.maximum(r * self.max_clock_mhz[gpus], IDLE_SM_CLOCK_MHZ)
        binds = (state.r_prefill < self._lock_frac()[gpus] - 1e-9) | (
            state.r_decode < self._lock_frac()[gpus] - 1e-9
        )
        self.clocks_event_reasons[gpus] |= np.where(binds, 0x4, 0)
        job_rows, inverse = np.unique(self.job_row[gpus], return_inverse=True)
        per_service = _per_service(state, inverse, job_rows.shape[0])
        self.services.ensure(job_rows)
        self.services.add(per_service, dt)

    def _job_levels(self, busy: BoolArray, rows: IntArray) -> _Levels:
        """Per GPU: its job's warm-up ramp and what its job's phase does to it now (also sets
        `phase_mask` and what true_curves reads)."""
        n = self.spec.n_gpus
        jobs = self.jobs
        lv = _Levels(np.zeros(n), np.ones(n), np.ones(n), np.ones(n), np.ones(n))
        lv.ramp[busy], since_warm_s = self._ramp(rows)
        fx = self.phases.job_effects(
            self.t_s, rows, jobs.job_id[rows], since_warm_s, jobs.service[rows]
        )
        lv.activity[busy], lv.pace[busy], lv.util[busy], lv.clock[busy] = (
            fx.activity,
            fx.pace,
            fx.util,
            fx.clock,
        )
        self._activity = lv.activity
        self.phase_mask = np.zeros(n, dtype=np.int64)
        self.phase_mask[busy] = fx.mask
        return lv

    def _telemetry(
        self,
        busy: BoolArray,
        rows: IntArray,
        working: BoolArray,
        failed: BoolArray,
        noise: FloatArray,
        tput: FloatArray,
        lv: _Levels,
    ) -> None:
        """Utilization and SM clock as a DCGM exporter would show them (`tput` before the
        job's pace: a stalled GPU still clocks what it runs)."""
        spec, model, jobs = self.spec, self.spec.model, self.jobs
        ramp = lv.ramp
        wl_mem = np.zeros(spec.n_gpus)
        if busy.any():
            mem_by_class = np.array([self._catalog[w].mem_util_pct for w in self._workload_names])
            wl_mem[busy] = mem_by_class[jobs.workload[rows]]
        self.util_pct = np.where(working, np.clip(97.0 * ramp * lv.util + noise - 1.0, 0, 100), 0.0)
        self.mem_util_pct = np.where(
            working, wl_mem * ramp * lv.util * np.where(self.throughput > 0, 1.0, 0.0), 0.0
        )
        clock_frac = np.ones(spec.n_gpus)
        clock_frac[busy] = jobs.clock_frac[rows]
        sm = (
            model.max_sm_clock_mhz
            * clock_frac
            * np.where(ramp > 0, tput / np.maximum(ramp, 1e-9), 0)
        )
        # A stalled GPU's clock falls toward idle (where, not a blend, so 1.0 changes nothing).
        sm = np.where(lv.clock < 1.0, IDLE_SM_CLOCK_MHZ + (sm - IDLE_SM_CLOCK_MHZ) * lv.clock, sm)
        self.sm_clock_mhz = np.where(working, np.maximum(sm, IDLE_SM_CLOCK_MHZ), IDLE_SM_CLOCK_MHZ)
        self.sm_clock_mhz = np.where(failed, 0.0, self.sm_clock_mhz)
        # A locked clock never runs above its lock (fmin: NaN, not locked, leaves it).
        self.sm_clock_mhz = np.fmin(self.sm_clock_mhz, self.clock_lock_max_mhz)

    def _ramp(self, rows: IntArray) -> tuple[FloatArray, FloatArray]:
        """Per GPU of the given job rows: its warm-up ramp (0 to 1) and the time since its
        warm-up ended (negative during it)."""
        jobs = self.jobs
        self.phases.sync(jobs.job_id[: jobs.n])
        warm_s, load_s = self.phases.warmup(rows)
        since_start_s = self.t_s - jobs.start_s[rows]
        ramp = np.clip((since_start_s - load_s) / np.maximum(warm_s - load_s, 1e-9), 0.0, 1.0)
        return ramp, since_start_s - warm_s

    def _exporter_state(self, t_s: float) -> None:
        """Which nodes' exporters are restarting at t_s (an exporter_restart phase)."""
        self.exporter_restarting, self.restart_since_s = self.phases.restarts(t_s)

    def _report(self) -> None:
        """What DCGM reports now: the truth, unless a reading is flat-lined or a restart reset
        the energy counter."""
        power, temp, energy, flat = self.phases.report(
            self.t_s,
            self.power_w,
            self.temp_c,
            self.energy_j,
            self.exporter_restarting,
            (self.reported_power_w, self.reported_temp_c),
        )
        self.reported_power_w, self.reported_temp_c, self.reported_energy_j = power, temp, energy
        if flat.any() or self.exporter_restarting.any():
            self.phase_mask |= np.where(flat, int(Phase.FLATLINE), 0)
            restarting = self.exporter_restarting[self.node_of]
            self.phase_mask |= np.where(restarting, int(Phase.EXPORTER_RESTART), 0)

    def _progress(self, dt: float) -> float:
        """Advance jobs by dt; returns the work done (GPU-seconds at full speed)."""
        busy = self.job_row >= 0
        if not busy.any():
            return 0.0
        rows = self.job_row[busy]
        rate = np.full(self.jobs.n, np.inf)
        np.minimum.at(rate, rows, self.throughput[busy])
        running = np.flatnonzero(np.isfinite(rate))
        rate_run = rate[running]
        self.jobs.work_left_s[running] -= rate_run * dt
        done = running[self.jobs.work_left_s[running] <= 0]
        if done.size:
            self.jobs.state[done] = JOB_DONE
            self.job_row[np.isin(self.job_row, done)] = -1
        work = rate_run * self.jobs.n_gpus[running] * dt
        np.add.at(self.work_by_priority_gpu_s, self.jobs.priority[running], work)
        return float(work.sum())

    def fleet_power_w(self) -> float:
        return float(self.power_w.sum()) + self.spec.nodes * self.spec.node_overhead_w

    def budget_w(self) -> float | None:
        return None if self.spec.budget is None else self.spec.budget.at(self.t_s)

    def step(self, dt: float | None = None, control: Callable[[Twin], None] | None = None) -> None:
        """Advance by one physics step. `control` (the oracle) acts after scheduling, before
        physics."""
        dt = self.spec.step_s if dt is None else dt
        self._fault_state(self.t_s)
        self._exporter_state(self.t_s)
        self._arrivals_and_scheduling(dt)
        if control is not None:
            control(self)
        self._physics(dt)
        self._report()
        work = self._progress(dt)
        self.work_done_gpu_s += work
        fleet = self.fleet_power_w()
        self.energy_total_j += fleet * dt
        budget = self.budget_w()
        self._log_buf.append((self.t_s, fleet, np.nan if budget is None else budget, work))
        if len(self._log_buf) >= 4096:
            self._flush_log()
        self.t_s += dt
        self.node_last_seen_s[self.exporter_up & ~self.exporter_restarting] = self.t_s

    def run_until(
        self,
        t_end_s: float,
        control: Callable[[Twin], None] | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> None:
        """Step to `t_end_s`; `progress` is told the twin seconds done, a minute at a time."""
        reported = self.t_s
        while self.t_s < t_end_s - 1e-9:
            self.step(min(self.spec.step_s, t_end_s - self.t_s), control)
            if progress is not None and (self.t_s - reported >= 60.0 or self.t_s >= t_end_s):
                progress(self.t_s - reported)
                reported = self.t_s

    def _flush_log(self) -> None:
        if not self._log_buf:
            return
        arr = np.asarray(self._log_buf, dtype=np.float64)
        self.log.t_s.append(arr[:, 0])
        self.log.fleet_w.append(arr[:, 1])
        self.log.budget_w.append(arr[:, 2])
        self.log.work_gpu_s.append(arr[:, 3])
        self._log_buf = []

    def drop_step_log(self) -> None:
        """Forget the per-step log: a long-running host (`ooda run`) has no KPIs to compute and
        the log would grow without end."""
        self._log_buf = []
        self.log = StepLog()

    def step_log(self) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """(t_s, fleet_w, budget_w, work_gpu_s) per physics step so far."""
        self._flush_log()
        if not self.log.t_s:
            empty = np.zeros(0)
            return empty, empty, empty, empty
        return (
            np.concatenate(self.log.t_s),
            np.concatenate(self.log.fleet_w),
            np.concatenate(self.log.budget_w),
            np.concatenate(self.log.work_gpu_s),
        )

    # -- actuation (what a node daemon or Slurm would do to the twin) ---------------------------

    def set_caps(self, rows: npt.ArrayLike, watts: npt.ArrayLike) -> None:
        idx = np.asarray(rows, dtype=np.int64)
        w = np.asarray(watts, dtype=np.float64)
        if np.any(w < self.min_w[idx]) or np.any(w > self.max_w[idx]):
            raise ValueError("cap outside the GPU's constraints")
        self.cap_w[idx] = w

    def lock_clocks(
        self, rows: npt.ArrayLike, min_mhz: npt.ArrayLike, max_mhz: npt.ArrayLike
    ) -> None:
        """Lock the SM clocks to [min_mhz, max_mhz] (nvmlDeviceSetGpuLockedClocks): within the
        GPU's supported clocks, or ValueError."""
        idx = np.asarray(rows, dtype=np.int64)
        lo = np.broadcast_to(np.asarray(min_mhz, dtype=np.float64), idx.shape)
        hi = np.broadcast_to(np.asarray(max_mhz, dtype=np.float64), idx.shape)
        if (
            np.any(lo > hi)
            or np.any(lo < self.min_clock_mhz[idx])
            or np.any(hi > self.max_clock_mhz[idx])
        ):
            raise ValueError("locked clocks outside the GPU's supported clocks")
        self.clock_lock_min_mhz[idx] = lo
        self.clock_lock_max_mhz[idx] = hi
        self._any_locked = bool(np.isfinite(self.clock_lock_max_mhz).any())

    def reset_clocks(self, rows: npt.ArrayLike) -> None:
        """Unlock the SM clocks (nvmlDeviceResetGpuLockedClocks)."""
        idx = np.asarray(rows, dtype=np.int64)
        self.clock_lock_min_mhz[idx] = np.nan
        self.clock_lock_max_mhz[idx] = np.nan
        self._any_locked = bool(np.isfinite(self.clock_lock_max_mhz).any())

    def rows_for(self, nodes: Sequence[str], gpus: Sequence[int]) -> IntArray:
        """Twin rows for (node name, GPU index) pairs; -1 where unknown."""
        g = self.spec.gpus_per_node
        out = np.full(len(nodes), -1, dtype=np.int64)
        for i, (node, gpu) in enumerate(zip(nodes, gpus, strict=True)):
            if node.startswith("node") and node[4:].isdecimal():
                k = int(node[4:]) - 1
                if 0 <= k < self.spec.nodes and 0 <= int(gpu) < g:
                    out[i] = k * g + int(gpu)
        return out

    def job_labels(self) -> npt.NDArray[np.str_]:
        """Per GPU: the running job's id as a string ("" when idle)."""
        ids = np.where(self.job_row >= 0, self.jobs.job_id[np.maximum(self.job_row, 0)], -1)
        return np.where(ids >= 0, ids.astype(np.str_), "")

    def job_priority(self) -> IntArray:
        return np.where(self.job_row >= 0, self.jobs.priority[np.maximum(self.job_row, 0)], 0)

    def job_workload(self) -> npt.NDArray[np.str_]:
        """Per GPU: its job's workload class ("" when idle)."""
        names = np.array([*self._workload_names, ""], dtype=np.str_)
        index = np.where(self.job_row >= 0, self.jobs.workload[np.maximum(self.job_row, 0)], -1)
        return names[index]

    def labels(self) -> dict[str, npt.NDArray[np.str_]]:
        """What the twin's telemetry labels each GPU with (Snapshot.labels)."""
        out = {PRIORITY_LABEL: self.job_priority().astype(np.str_)}
        if self.spec.workload_label:
            out[WORKLOAD_LABEL] = self.job_workload()
        return out

    # -- ground truth (the oracle only) ---------------------------------------------------------

    def true_curves(self) -> dict[str, FloatArray]:
        """Per GPU: the true natural draw (ramp and job phase included), a, b and
        cap_draw_frac."""
        model, jobs = self.spec.model, self.jobs
        busy = (self.job_row >= 0) & ~np.isin(self.xid, list(FATAL_XIDS))
        rows = self.job_row[busy]
        ramp, _ = self._ramp(rows)
        natural = np.full(self.spec.n_gpus, model.idle_w)
        natural[busy] = (
            model.idle_w + (jobs.natural_w[rows] - model.idle_w) * ramp * self._activity[busy]
        )
        natural *= 0.85 + 0.15 * self.straggler_factor
        a = np.zeros(self.spec.n_gpus)
        b = np.ones(self.spec.n_gpus)
        k = np.ones(self.spec.n_gpus)
        a[busy], b[busy], k[busy] = jobs.a[rows], jobs.b[rows], jobs.cap_draw_frac[rows]
        return {"busy": busy.astype(np.float64), "natural_w": natural, "a": a, "b": b, "k": k}


def _per_service(state: ServiceState, inverse: IntArray, count: int) -> ServiceState:
    """Per-GPU service states pooled per service: tokens summed, latencies and utilization at
    the slowest GPU, clocks and pace at the lowest."""

    def total(x: FloatArray) -> FloatArray:
        return np.bincount(inverse, weights=x, minlength=count).astype(np.float64)

    def worst(x: FloatArray) -> FloatArray:
        out = np.full(count, -np.inf)
        np.maximum.at(out, inverse, x)
        return out

    def least(x: FloatArray) -> FloatArray:
        out = np.full(count, np.inf)
        np.minimum.at(out, inverse, x)
        return out

    return ServiceState(
        r_prefill=least(state.r_prefill),
        r_decode=least(state.r_decode),
        power_w=total(state.power_w),
        natural_w=total(state.natural_w),
        tokens_per_s=total(state.tokens_per_s),
        prompt_tokens_per_s=total(state.prompt_tokens_per_s),
        requests_per_s=total(state.requests_per_s),
        rho=worst(state.rho),
        ttft_median_s=worst(state.ttft_median_s),
        tpot_median_s=worst(state.tpot_median_s),
        pace=least(state.pace),
        prefill_share=worst(state.prefill_share),
    )


def _uuid(seed: int, index: int) -> str:
    digest = hashlib.sha1(f"ooda-twin-{seed}-{index}".encode()).hexdigest()
    return f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"

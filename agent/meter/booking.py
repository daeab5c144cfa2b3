"""Booking one interval's energy: columnar numpy over the fleet's GPUs, aggregated per job.

A `Reading` is what the meter keeps of one instant (per GPU: UUID, energy counter, power, job,
partition, share of its node's overhead); `book_interval` turns two consecutive readings into a
`Booking`: per (job, partition) key the GPU energy, the node overhead, GPU-seconds, and how much of
the energy came from the energy counter and how much from integrated power.

Per GPU (UUIDs matched between the two readings):
- energy: the counter's difference where both readings have one and it did not go back (a reset)
  or jump past what the GPU can draw; else the power integrated over the interval (trapezoid);
  else nothing (the GPU is counted as unmetered: missing is never 0 J). The counter is trusted
  over the power readings where both are there: a power reading can freeze (a flat-lined
  sensor) or miss a dip between two samples, the counter misses nothing. A GPU not read for a
  while (an exporter restarting) keeps its last good reading (`carry`, up to `max_gap_s`): when
  it is read again, the gap is booked from its two ends.
- the job: the same at both ends -> all of it to that job. Different (one job ended, another
  started, or the GPU fell idle) -> split between them. Where the scheduler says when the first
  ended or the second started (inside the interval), that time splits it: the first job drew its
  reading's power until then, the rest is the second's. Otherwise a two-level model: the GPU drew
  the first reading's power until the switch and the second's after it, so the switch's time
  follows from the interval's energy (`f0 = (E/dt - p1) / (p0 - p1)`, clipped to [0, 1]); with
  no power known, or two equal powers, half each. A job that ends at full draw thus keeps its
  energy up to its end instead of leaving it to the idle GPU after it. An idle side draws at most
  the idle level (GPUs idle at both ends), and when one job ended and another started with only
  the start known, the time between goes to idle by three levels (the first job's, idle, and the
  second's, rising from idle as jobs start).
- the node's non-GPU overhead (configured per node) is split over the node's GPUs, so each job
  takes its share of the node's GPUs; idle GPUs' share goes to their partition as idle, with
  their own energy (job "").

Nothing here touches a per-GPU Python object: codes and bincounts, so 100,000 GPUs book in tens
of milliseconds (bench/meter.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import cached_property

import numpy as np
import numpy.typing as npt

from agent.core.situation import NodeStates
from agent.core.snapshot import PLAUSIBLE, Metric, Snapshot

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
StrArray = npt.NDArray[np.str_]
BoolArray = npt.NDArray[np.bool_]

# The most a GPU can draw: a counter that moved more than this over an interval is not believed.
MAX_GPU_POWER_W = PLAUSIBLE[Metric.POWER_W][1]
# Below this difference two powers are "the same": the switch time is not read from them.
SAME_POWER_W = 1.0


# A job's (start, end) in the clock's seconds, NaN where not known.
JobTimes = Callable[[str], tuple[float, float]]


class EnergySource(StrEnum):
    AUTO = "auto"  # the counter where it is usable, else integrated power
    COUNTER = "counter"  # only the counter (a GPU without one is unmetered)
    POWER = "power"  # only integrated power


@dataclass(frozen=True, eq=False)
class Reading:
    """The fleet at one instant, as the meter needs it. `job_code` indexes `job_names`,
    `partition_code` indexes `partition_names`; `order` sorts `uuid` (for matching)."""

    time_s: float
    uuid: StrArray
    energy_j: FloatArray  # the cumulative counter (NaN: none)
    power_w: FloatArray  # NaN: none
    job_names: StrArray  # unique, sorted; "" is idle
    job_code: IntArray
    partition_names: StrArray  # unique, sorted
    partition_code: IntArray
    overhead_w: FloatArray  # per GPU: its share of its node's non-GPU power
    # Per GPU, when its values were read, where a GPU's last good reading was carried over a
    # gap (`carry`); None: all at `time_s`.
    read_s: FloatArray | None = None

    def times(self) -> FloatArray:
        """Per GPU: when its values were read."""
        if self.read_s is None:
            return np.full(self.n_gpus, self.time_s)
        return self.read_s

    @cached_property
    def order(self) -> IntArray:
        return np.argsort(self.uuid, kind="stable").astype(np.int64)

    @property
    def n_gpus(self) -> int:
        return int(self.uuid.shape[0])

    def jobs(self) -> StrArray:
        return np.asarray(self.job_names[self.job_code], dtype=np.str_)


def node_partitions(nodes: NodeStates | None, n_nodes: int) -> list[str]:
    """Per node: the partition its idle GPUs are booked to (the first of its partitions in name
    order; "" where the placement system does not say)."""
    if nodes is None or nodes.partitions is None or len(nodes.partitions) != n_nodes:
        return [""] * n_nodes
    return [min(p) if p else "" for p in nodes.partitions]


def reading_of(
    snapshot: Snapshot,
    partitions: Sequence[str],
    node_overhead_w: float = 0.0,
) -> Reading:
    """A Reading of the snapshot; `partitions` per node (aligned with `snapshot.node_names`).
    Values of stale GPUs are not used (the snapshot makes them NaN)."""
    n = snapshot.n_gpus
    usable = snapshot.fresh
    energy, energy_ok = snapshot.column(Metric.ENERGY_J)
    power, power_ok = snapshot.column(Metric.POWER_W)
    energy = np.where(energy_ok & usable, energy, np.nan)
    power = np.where(power_ok & usable, power, np.nan)
    job_names, job_code = np.unique(snapshot.job, return_inverse=True)
    if "" not in job_names:  # idle is always a key, so every reading can name it
        job_names = np.concatenate([np.array([""], dtype=np.str_), job_names])
        job_code = job_code + 1
    node_part = np.asarray(list(partitions) or [""], dtype=np.str_)
    partition_names, node_part_code = np.unique(node_part, return_inverse=True)
    gpus_per_node = np.bincount(snapshot.node, minlength=snapshot.n_nodes).astype(np.float64)
    overhead = (
        node_overhead_w / np.maximum(gpus_per_node[snapshot.node], 1.0)
        if n
        else np.zeros(0, dtype=np.float64)
    )
    return Reading(
        time_s=float(snapshot.time_s),
        uuid=snapshot.uuid,
        energy_j=energy,
        power_w=power,
        job_names=np.asarray(job_names, dtype=np.str_),
        job_code=np.asarray(job_code, dtype=np.int64).reshape(n),
        partition_names=np.asarray(partition_names, dtype=np.str_),
        partition_code=np.asarray(node_part_code[snapshot.node] if n else [], dtype=np.int64),
        overhead_w=np.asarray(overhead, dtype=np.float64),
    )


@dataclass(frozen=True, eq=False)
class Booking:
    """One interval (t0_s, t1_s], per key (job, partition): energies in joules. Job "" is the
    idle GPUs of that partition."""

    t0_s: float
    t1_s: float
    job: StrArray
    partition: StrArray
    gpu_j: FloatArray
    overhead_j: FloatArray
    counter_j: FloatArray  # the part of gpu_j read from energy counters
    power_j: FloatArray  # the part of gpu_j integrated from power
    gpu_s: FloatArray  # GPU-seconds
    metered_gpus: int
    unmetered_gpus: int  # seen at either end, but with neither counter nor power at both
    idle_w: float = math.nan  # what GPUs idle at both ends drew (NaN: none was idle)

    def __len__(self) -> int:
        return int(self.job.shape[0])

    @property
    def total_j(self) -> float:
        return float(self.gpu_j.sum() + self.overhead_j.sum())


def match(prev: Reading, cur: Reading) -> IntArray:
    """Per GPU of `cur`: its row in `prev` (-1: not there). The same UUIDs in the same order
    (the common case) cost one comparison."""
    if prev.uuid.shape == cur.uuid.shape and np.array_equal(prev.uuid, cur.uuid):
        return np.arange(cur.n_gpus, dtype=np.int64)
    if prev.n_gpus == 0:
        return np.full(cur.n_gpus, -1, dtype=np.int64)
    keys = prev.uuid[prev.order]
    pos = np.clip(np.searchsorted(keys, cur.uuid), 0, keys.shape[0] - 1)
    return np.where(keys[pos] == cur.uuid, prev.order[pos], -1).astype(np.int64)


def _energy(
    prev: Reading, cur: Reading, at: IntArray, dt: FloatArray, source: EnergySource
) -> tuple[FloatArray, BoolArray, BoolArray]:
    """Per GPU of `cur`: the interval's energy (NaN: unmetered), and whether it came from the
    counter or from integrated power."""
    seen = at >= 0
    safe = np.maximum(at, 0)
    e0 = np.where(seen, prev.energy_j[safe], np.nan)
    p0 = np.where(seen, prev.power_w[safe], np.nan)
    power = np.isfinite(p0) & np.isfinite(cur.power_w)
    with np.errstate(invalid="ignore"):
        delta = cur.energy_j - e0
        counter = np.isfinite(delta) & (delta >= 0) & (delta <= MAX_GPU_POWER_W * dt)
    if source is EnergySource.POWER:
        counter = np.zeros_like(counter)
    elif source is EnergySource.COUNTER:
        power = np.zeros_like(power)
    power &= ~counter
    joules = np.where(counter, delta, np.where(power, (p0 + cur.power_w) / 2.0 * dt, np.nan))
    return joules, counter, power


def idle_level_w(p0: FloatArray, p1: FloatArray, idle0: BoolArray, idle1: BoolArray) -> float:
    """What the GPUs idle at both ends of the interval draw (their median); NaN: none is."""
    both_idle = idle0 & idle1 & np.isfinite(p0) & np.isfinite(p1)
    if not both_idle.any():
        return math.nan
    return float(np.median((p0[both_idle] + p1[both_idle]) / 2.0))


def _levels(
    p0: FloatArray, p1: FloatArray, idle0: BoolArray, idle1: BoolArray, idle_w: float
) -> tuple[FloatArray, FloatArray]:
    """The power levels before and after a switch. An idle side draws at most the idle level:
    a reading taken as a job ends can still show the job's draw (the sample averages the
    moments before), which must not make the idle GPU look busy."""
    if not math.isfinite(idle_w):
        return p0, p1
    with np.errstate(invalid="ignore"):
        return np.where(idle0, np.minimum(p0, idle_w), p0), np.where(
            idle1, np.minimum(p1, idle_w), p1
        )


def _first_share(
    joules: FloatArray, p0: FloatArray, p1: FloatArray, dt: FloatArray, switched: BoolArray
) -> FloatArray:
    """Per GPU: the share of the interval spent on the first reading's job (two-level model)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        level = joules / dt
        f0 = np.clip((level - p1) / (p0 - p1), 0.0, 1.0)
    known = np.isfinite(f0) & (np.abs(p0 - p1) > SAME_POWER_W)
    return np.where(switched, np.where(known, f0, 0.5), 0.0)


def _known_switch(
    switched: BoolArray,
    code0: IntArray,
    code1: IntArray,
    names: StrArray,
    t0_s: FloatArray,
    t1_s: float,
    times: JobTimes | None,
) -> tuple[FloatArray, FloatArray]:
    """Per GPU, where the scheduler says: when (as a share of the interval) the first job ended
    and when the second started, if inside the interval; NaN elsewhere."""
    ended = np.full(switched.shape[0], np.nan)
    started = np.full(switched.shape[0], np.nan)
    rows = np.flatnonzero(switched)
    if times is None or rows.size == 0:
        return ended, started
    start = np.full(names.shape[0], np.nan)
    end = np.full(names.shape[0], np.nan)
    for code in np.unique(np.concatenate([code0[rows], code1[rows]])).tolist():
        start[code], end[code] = times(str(names[code]))
    t0 = t0_s[rows]
    dt = t1_s - t0
    with np.errstate(invalid="ignore"):
        first_end = (end[code0[rows]] - t0) / dt
        second_start = (start[code1[rows]] - t0) / dt
    inside = (first_end >= 0) & (first_end <= 1)
    ended[rows] = np.where(inside, first_end, np.nan)
    inside = (second_start >= 0) & (second_start <= 1)
    started[rows] = np.where(inside, second_start, np.nan)
    return ended, started


@dataclass(frozen=True, eq=False)
class _Split:
    """Per GPU: the first job's share of the interval and energy, then the idle time between
    the two jobs (where known); the second job has the rest."""

    f0: FloatArray
    e0: FloatArray
    f_idle: FloatArray
    e_idle: FloatArray


def _split(
    joules: FloatArray,
    levels: tuple[FloatArray, FloatArray, float],
    dt: FloatArray,
    switched: BoolArray,
    idle: tuple[BoolArray, BoolArray],
    known: tuple[FloatArray, FloatArray],
) -> _Split:
    """How a GPU's interval divides between its two jobs (module docstring). `levels`: the
    power before and after the switch and the idle level; `idle`: whether each job is idle;
    `known`: the scheduler's end of the first job and start of the second (shares, NaN)."""
    level0, level1, idle_w = levels
    ended, started = known
    f0 = _first_share(joules, level0, level1, dt, switched)
    f0 = np.where(np.isfinite(ended), ended, np.where(np.isfinite(started), started, f0))
    e0 = np.minimum(joules, np.where(np.isfinite(level0), level0 * f0 * dt, joules * f0))
    # A job that fell idle: the idle time draws the idle level and no more, so the job keeps
    # the rest, also what it drew above its own first reading (it left a low phase, say).
    to_idle = switched & idle[1] & ~idle[0] & np.isfinite(level1)
    e0 = np.where(to_idle, np.clip(joules - level1 * (1.0 - f0) * dt, e0, joules), e0)
    zero = np.zeros_like(joules)
    f_idle, e_idle = zero, zero
    if math.isfinite(idle_w):
        # Both jobs real and the second's start known: the first may have ended earlier, the
        # GPU idle in between. The first job's end is the scheduler's where it says, else it
        # follows from the energy before the start (three levels: the first job's, idle, the
        # second's). The idle time draws the idle level; the first job has the rest of what
        # came before the start (also what it drew above its first reading).
        jobs = switched & ~idle[0] & ~idle[1] & np.isfinite(started)
        gap_known = jobs & np.isfinite(ended) & (ended <= started)
        guess = jobs & ~np.isfinite(ended) & (level0 - idle_w > SAME_POWER_W)
        with np.errstate(invalid="ignore", divide="ignore"):
            # A job starts from idle (loading, warming up): its draw rises to the second
            # reading's, so it spent about the mean of the two since its start.
            rising = (idle_w + np.maximum(level1, idle_w)) / 2.0
            before = joules - np.clip(rising * (1.0 - started) * dt, 0.0, joules)
            f_guess = np.clip((before / dt - idle_w * started) / (level0 - idle_w), 0.0, started)
        three = gap_known | guess
        f0 = np.where(gap_known, ended, np.where(guess, f_guess, f0))
        f_idle = np.where(three, started - f0, 0.0)
        e_idle = np.where(three, np.clip(idle_w * f_idle * dt, 0.0, before), 0.0)
        e0 = np.where(three, before - e_idle, e0)
    return _Split(
        f0=np.where(switched, f0, 0.0),
        e0=np.where(switched, e0, 0.0),
        f_idle=np.where(switched, f_idle, 0.0),
        e_idle=np.where(switched, e_idle, 0.0),
    )


def book_interval(
    prev: Reading,
    cur: Reading,
    source: EnergySource = EnergySource.AUTO,
    times: JobTimes | None = None,
    known_idle_w: float = math.nan,
) -> Booking:
    """The energy of (prev.time_s, cur.time_s], per (job, partition). `times` says when a job
    started and ended (NaN: not known); where it places a switch inside the interval, that
    time splits it instead of the two-level model. `known_idle_w`: the idle level seen before,
    for an interval where no GPU is idle at both ends (the booking says the level it saw)."""
    if not cur.time_s > prev.time_s:
        raise ValueError(
            f"an interval must move forward in time (got {cur.time_s - prev.time_s} s)"
        )
    at = match(prev, cur)
    # Per GPU, from its last reading: the interval, or longer where a gap was carried over.
    start_s = np.where(at >= 0, prev.times()[np.maximum(at, 0)], prev.time_s)
    dt = np.maximum(cur.time_s - start_s, 1e-9)
    joules, by_counter, by_power = _energy(prev, cur, at, dt, source)
    metered = by_counter | by_power
    seen = at >= 0
    safe = np.maximum(at, 0)
    names = np.union1d(prev.job_names, cur.job_names)
    code0 = np.searchsorted(names, prev.job_names)[prev.job_code[safe]]
    code1 = np.searchsorted(names, cur.job_names)[cur.job_code]
    switched = seen & (code0 != code1)
    idle_code = int(np.searchsorted(names, ""))  # "" is in every reading's names
    p0 = np.where(seen, prev.power_w[safe], np.nan)
    idle0, idle1 = code0 == idle_code, code1 == idle_code
    idle_w = idle_level_w(p0, cur.power_w, idle0, idle1)
    level_idle = idle_w if math.isfinite(idle_w) else known_idle_w
    level0, level1 = _levels(p0, cur.power_w, idle0, idle1, level_idle)
    known = _known_switch(switched, code0, code1, names, start_s, cur.time_s, times)
    split = _split(joules, (level0, level1, level_idle), dt, switched, (idle0, idle1), known)
    rows = np.flatnonzero(metered)
    n_part = cur.partition_names.shape[0]
    part = cur.partition_code[rows]
    # Keys: job code x partition code; each GPU gives to its first job, the idle time between
    # (where known) and its second job.
    keys = np.concatenate(
        [code0[rows] * n_part + part, idle_code * n_part + part, code1[rows] * n_part + part]
    )
    first, between = split.f0[rows], split.f_idle[rows]
    e0, e_idle = split.e0[rows], split.e_idle[rows]
    energy = np.concatenate([e0, e_idle, joules[rows] - e0 - e_idle])
    overhead_j = cur.overhead_w[rows] * dt[rows]
    shares = np.concatenate([first, between, 1.0 - first - between])
    counter_part = np.tile(by_counter[rows], 3)
    uniq, inverse = np.unique(keys, return_inverse=True)
    size = uniq.shape[0]

    def total(values: FloatArray) -> FloatArray:
        return np.bincount(inverse, weights=values, minlength=size).astype(np.float64)

    gpu_s = total(shares * np.tile(dt[rows], 3))
    keep = gpu_s > 0  # a job that held a GPU for none of the interval gets no row
    return Booking(
        t0_s=prev.time_s,
        t1_s=cur.time_s,
        job=np.asarray(names[uniq[keep] // n_part], dtype=np.str_),
        partition=np.asarray(cur.partition_names[uniq[keep] % n_part], dtype=np.str_),
        gpu_j=total(energy)[keep],
        overhead_j=total(np.tile(overhead_j, 3) * shares)[keep],
        counter_j=total(np.where(counter_part, energy, 0.0))[keep],
        power_j=total(np.where(counter_part, 0.0, energy))[keep],
        gpu_s=gpu_s[keep],
        metered_gpus=int(rows.size),
        unmetered_gpus=int(cur.n_gpus - rows.size),
        idle_w=idle_w,
    )


def carry(prev: Reading, cur: Reading, max_gap_s: float) -> Reading:
    """`cur`, with the last good reading of each GPU that has none now (its exporter
    restarting, its series stale) carried over from `prev`, with its time, for at most
    `max_gap_s`: when the GPU is read again, the gap is booked from its two ends (the energy
    counter's difference where it did not reset, else the power at both ends), and nothing of
    it is lost. What the GPU's job was is the job at its last good reading."""
    usable = np.isfinite(cur.energy_j) | np.isfinite(cur.power_w)
    if bool(usable.all()) or prev.n_gpus == 0:
        return cur
    at = match(prev, cur)
    safe = np.maximum(at, 0)
    last_s = prev.times()[safe]
    had = np.isfinite(prev.energy_j[safe]) | np.isfinite(prev.power_w[safe])
    keep = ~usable & (at >= 0) & had & (cur.time_s - last_s <= max_gap_s)
    if not keep.any():
        return cur
    names = np.union1d(prev.job_names, cur.job_names)
    code = np.where(
        keep,
        np.searchsorted(names, prev.job_names)[prev.job_code[safe]],
        np.searchsorted(names, cur.job_names)[cur.job_code],
    )
    return replace(
        cur,
        energy_j=np.where(keep, prev.energy_j[safe], cur.energy_j),
        power_w=np.where(keep, prev.power_w[safe], cur.power_w),
        job_names=np.asarray(names, dtype=np.str_),
        job_code=code.astype(np.int64),
        read_s=np.where(keep, last_s, cur.time_s),
    )

"""The columnar Snapshot: one instant of the whole fleet, one numpy array per field.

Missing or stale is explicit: every metric column carries a validity mask, and an invalid value is
NaN, never 0.0 (a dead GPU must not look idle). GPUs are rows; rows are only meaningful within one
Snapshot (use `uuid` to follow a GPU across cycles).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import cached_property

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
StrArray = npt.NDArray[np.str_]


class Metric(StrEnum):
    """Per-GPU telemetry fields, with their units in the name."""

    POWER_W = "power_w"
    POWER_LIMIT_W = "power_limit_w"  # the power-management limit we (or someone) set
    ENFORCED_LIMIT_W = "enforced_limit_w"  # what applies after every limiter
    MIN_LIMIT_W = "min_limit_w"  # NVML constraints
    MAX_LIMIT_W = "max_limit_w"
    DEFAULT_LIMIT_W = "default_limit_w"
    TEMP_C = "temp_c"
    UTIL_PCT = "util_pct"
    MEM_UTIL_PCT = "mem_util_pct"
    SM_CLOCK_MHZ = "sm_clock_mhz"
    XID = "xid"  # the last XID error code seen (DCGM keeps only the last); 0 = none
    ECC_DBE_TOTAL = "ecc_dbe_total"  # volatile double-bit ECC errors
    REMAPPED_ROWS_UNCORRECTABLE = "remapped_rows_uncorrectable"
    ROW_REMAP_FAILURE = "row_remap_failure"
    ENERGY_J = "energy_j"  # cumulative energy counter
    # DCGM_FI_DEV_CLOCKS_EVENT_REASONS (throttle bitmask); bits in CLOCK_EVENT_* below
    CLOCKS_EVENT_REASONS = "clocks_event_reasons"
    # The application's own figures (agent.core.app_metrics), per GPU: its share of its job's
    # rate (tokens or steps per second, `throughput_unit` label), and its job's p90 latencies.
    APP_RATE_PER_S = "app_rate_per_s"
    TTFT_P90_S = "ttft_p90_s"
    TPOT_P90_S = "tpot_p90_s"


# Bits of the clocks-event-reasons mask (NVML nvmlClocksEventReason*, DCGM field 112).
CLOCK_EVENT_SW_POWER_CAP = 0x4  # the power limit is holding the clocks down
CLOCK_EVENT_SW_THERMAL = 0x20
CLOCK_EVENT_HW_THERMAL = 0x40


@dataclass(frozen=True, eq=False)
class Snapshot:
    """The fleet at `time_s`. Arrays are indexed by GPU row; `node` indexes into `node_names`."""

    time_s: float
    node_names: StrArray  # unique node names
    node: IntArray  # per GPU: index into node_names
    gpu: IntArray  # per GPU: index on its node
    uuid: StrArray
    model: StrArray  # NVML model name
    job: StrArray  # per GPU: the job running there ("" = none known)
    values: Mapping[Metric, FloatArray]
    valid: Mapping[Metric, BoolArray]
    age_s: FloatArray  # age of the GPU's newest sample (NaN if never seen)
    stale: BoolArray  # seen in the inventory window but too old to act on
    budget_w: float | None = None  # the facility budget signal, when the source provides one
    errors: tuple[str, ...] = ()  # what the source says is wrong this cycle
    labels: Mapping[str, StrArray] = field(default_factory=dict)  # extra per-GPU labels (rack...)
    # Per account: its share of the cluster, as the scheduler says (Slurm's fairshare tree);
    # empty: it does not. The `account` label names each GPU's account (agent.core.jobs).
    account_shares: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.uuid.shape[0]
        for name in ("node", "gpu", "model", "job", "age_s", "stale"):
            if getattr(self, name).shape != (n,):
                raise ValueError(
                    f"Snapshot.{name} has shape {getattr(self, name).shape}, want ({n},)"
                )
        for metric, column in self.values.items():
            if column.shape != (n,) or self.valid[metric].shape != (n,):
                raise ValueError(f"Snapshot column {metric} does not have {n} rows")

    @property
    def n_gpus(self) -> int:
        return int(self.uuid.shape[0])

    @property
    def n_nodes(self) -> int:
        return int(self.node_names.shape[0])

    @property
    def fresh(self) -> BoolArray:
        """GPUs the agent may act on: seen and not stale."""
        return np.asarray(~self.stale & np.isfinite(self.age_s), dtype=bool)

    def column(self, metric: Metric) -> tuple[FloatArray, BoolArray]:
        """Values (NaN where invalid) and the validity mask; an absent column is all invalid."""
        if metric in self.values:
            return self.values[metric], self.valid[metric]
        return np.full(self.n_gpus, np.nan), np.zeros(self.n_gpus, dtype=bool)

    @cached_property
    def job_key(self) -> StrArray:
        """Per GPU: its job, or the GPU itself (`gpu:UUID`) where no job is known: what GPUs
        that run at one pace share."""
        # (Only the rows without a job are joined: joining 100,000 strings costs a tenth of a
        # second.) The type is the one `np.where(job != "", job, "gpu:" + uuid)` would have.
        without = np.flatnonzero(self.job == "")
        own = np.char.add("gpu:", self.uuid[without].astype(np.str_))
        out = self.job.astype(np.result_type(self.job.dtype, own.dtype))
        out[without] = own
        return np.asarray(out, dtype=np.str_)

    def power_cap_holds(self) -> tuple[BoolArray, BoolArray]:
        """Per GPU: whether its clock event reasons say the power limit holds its clocks down,
        and whether it reports them at all (where it does not, nothing is known either way)."""
        reasons, reported = self.column(Metric.CLOCKS_EVENT_REASONS)
        bit = (np.nan_to_num(reasons).astype(np.int64) & CLOCK_EVENT_SW_POWER_CAP) > 0
        return np.asarray(bit & reported, dtype=bool), reported

    def usable(self, metric: Metric) -> BoolArray:
        """Valid and fresh."""
        return np.asarray(self.column(metric)[1] & self.fresh, dtype=bool)

    def node_of(self) -> StrArray:
        """Per GPU: its node's name."""
        return np.asarray(self.node_names[self.node])

    def target(self, row: int) -> str:
        """A GPU's target name, as operators write it: `node2/gpu1`."""
        return f"{self.node_names[self.node[row]]}/gpu{int(self.gpu[row])}"

    def targets(self, rows: npt.ArrayLike) -> list[str]:
        idx = np.asarray(rows, dtype=np.int64)
        names = self.node_names[self.node[idx]]
        return [f"{n}/gpu{int(g)}" for n, g in zip(names, self.gpu[idx], strict=True)]

    def rows_of_node(self, node_name: str) -> IntArray:
        hits = np.flatnonzero(self.node_names == node_name)
        if hits.size == 0:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.node == hits[0]).astype(np.int64)

    def metrics(self) -> Iterator[Metric]:
        return iter(self.values)

    @staticmethod
    def empty(
        time_s: float, errors: tuple[str, ...] = (), budget_w: float | None = None
    ) -> Snapshot:
        """No GPUs seen (e.g. the source is unreachable)."""
        return Snapshot(
            time_s=time_s,
            node_names=np.zeros(0, dtype=np.str_),
            node=np.zeros(0, dtype=np.int64),
            gpu=np.zeros(0, dtype=np.int64),
            uuid=np.zeros(0, dtype=np.str_),
            model=np.zeros(0, dtype=np.str_),
            job=np.zeros(0, dtype=np.str_),
            values={},
            valid={},
            age_s=np.zeros(0),
            stale=np.zeros(0, dtype=bool),
            budget_w=budget_w,
            errors=errors,
        )


def build_snapshot(
    *,
    time_s: float,
    node_of_gpu: npt.ArrayLike,
    gpu: npt.ArrayLike,
    uuid: npt.ArrayLike,
    model: npt.ArrayLike,
    job: npt.ArrayLike,
    values: Mapping[Metric, npt.ArrayLike],
    age_s: npt.ArrayLike,
    stale: npt.ArrayLike,
    budget_w: float | None = None,
    errors: tuple[str, ...] = (),
    labels: Mapping[str, npt.ArrayLike] | None = None,
) -> Snapshot:
    """Build a Snapshot from per-GPU node names; validity is derived from NaN (never from 0.0)."""
    node_of = np.asarray(node_of_gpu, dtype=np.str_)
    node_names, node_idx = np.unique(node_of, return_inverse=True)
    cols: dict[Metric, FloatArray] = {}
    masks: dict[Metric, BoolArray] = {}
    for metric, raw in values.items():
        col = np.asarray(raw, dtype=np.float64)
        cols[metric] = col
        masks[metric] = np.isfinite(col)
    return Snapshot(
        time_s=float(time_s),
        node_names=node_names,
        node=node_idx.astype(np.int64),
        gpu=np.asarray(gpu, dtype=np.int64),
        uuid=np.asarray(uuid, dtype=np.str_),
        model=np.asarray(model, dtype=np.str_),
        job=np.asarray(job, dtype=np.str_),
        values=cols,
        valid=masks,
        age_s=np.asarray(age_s, dtype=np.float64),
        stale=np.asarray(stale, dtype=bool),
        budget_w=budget_w,
        errors=errors,
        labels={k: np.asarray(v, dtype=np.str_) for k, v in (labels or {}).items()},
    )


# What a sensor can physically report, generously: a value outside is a broken exporter or parser
# (a negative draw, 1e9 W, a temperature of a star), treated as missing, never believed. Counters
# are bounded too: a field DCGM cannot read (not supported, such as the ECC counter of a GPU with
# ECC off; not found, a GPU that fell off the bus) is exported as one of DCGM's blank values,
# 2**63 - 16 and up for integers, 2**47 and up for floats (dcgm_structs.h: DCGM_INT64_BLANK,
# DCGM_FP64_BLANK), which no real count reaches: believed, 9.2e18 ECC errors would drain the GPU.
COUNT_MAX = 1e12
PLAUSIBLE: Mapping[Metric, tuple[float, float]] = {
    Metric.POWER_W: (0.0, 5000.0),
    Metric.POWER_LIMIT_W: (0.0, 5000.0),
    Metric.ENFORCED_LIMIT_W: (0.0, 5000.0),
    Metric.MIN_LIMIT_W: (0.0, 5000.0),
    Metric.MAX_LIMIT_W: (0.0, 5000.0),
    Metric.DEFAULT_LIMIT_W: (0.0, 5000.0),
    Metric.TEMP_C: (-40.0, 150.0),
    Metric.UTIL_PCT: (0.0, 100.0),
    Metric.MEM_UTIL_PCT: (0.0, 100.0),
    Metric.SM_CLOCK_MHZ: (0.0, 10_000.0),
    Metric.XID: (0.0, 65_535.0),
    Metric.ECC_DBE_TOTAL: (0.0, COUNT_MAX),
    Metric.REMAPPED_ROWS_UNCORRECTABLE: (0.0, COUNT_MAX),
    Metric.ROW_REMAP_FAILURE: (0.0, 1.0),  # a flag
    Metric.ENERGY_J: (0.0, 1e13),  # 2.8 GWh: centuries of one GPU's draw
    Metric.CLOCKS_EVENT_REASONS: (0.0, 2.0**32),  # NVML's reasons are the low bits
    Metric.APP_RATE_PER_S: (0.0, 1e9),  # a GPU serving a billion tokens a second is a bug
    Metric.TTFT_P90_S: (0.0, 86400.0),
    Metric.TPOT_P90_S: (0.0, 86400.0),
}


def screen_implausible(snapshot: Snapshot) -> Snapshot:
    """The snapshot with physically impossible values made missing (NaN, invalid), and an error
    per field saying how many; the same object when every value is plausible."""
    values: dict[Metric, FloatArray] = {}
    valid: dict[Metric, BoolArray] = {}
    errors: list[str] = []
    for metric, column in snapshot.values.items():
        bounds = PLAUSIBLE.get(metric)
        if bounds is None:
            continue
        ok = snapshot.valid[metric]
        with np.errstate(invalid="ignore"):
            bad = ok & ~((column >= bounds[0]) & (column <= bounds[1]))
        if not bad.any():
            continue
        values[metric] = np.where(bad, np.nan, column)
        valid[metric] = ok & ~bad
        errors.append(
            f"{int(bad.sum())} implausible {metric} samples (outside [{bounds[0]:g}, "
            f"{bounds[1]:g}]) treated as missing"
        )
    if not errors:
        return snapshot
    return replace(
        snapshot,
        values={**snapshot.values, **values},
        valid={**snapshot.valid, **valid},
        errors=(*snapshot.errors, *errors),
    )

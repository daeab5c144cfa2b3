"""The Situation: a Snapshot plus what the models say about it. Policies decide from this alone.

Per-GPU arrays are aligned with the Snapshot's rows; per-node arrays with `snapshot.node_names`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.core.gpu_models import BUILTIN_MODELS
from agent.core.snapshot import Snapshot
from agent.core.throughput import ThroughputView

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
StrArray = npt.NDArray[np.str_]

# The most any GPU model we know of may draw: an unseen GPU of unknown model counts at this.
LARGEST_BUILTIN_MAX_CAP_W = max(m.max_cap_w for m in BUILTIN_MODELS.values())


@dataclass(frozen=True, eq=False)
class CurveEstimates:
    """Per GPU: the power curve of the job it runs (see agent.core.curves for the family).

    `confidence` is 0..1 (0 = a prior, nothing learned); `source` says where it came from.
    Idle GPUs carry NaN natural draw.
    """

    natural_w: FloatArray
    a: FloatArray
    b: FloatArray
    cap_draw_frac: FloatArray
    confidence: FloatArray
    source: StrArray  # "prior" or "learned"
    natural_w_hi: FloatArray  # a high quantile of the natural draw, for budget safety
    natural_clock_mhz: FloatArray | None = None  # SM clock when uncapped (the throughput proxy)
    natural_known: BoolArray | None = None  # natural draw seen uncapped after start-up
    # The natural draw the curve's x = power / natural draw is measured against (an unbiased
    # level, where `natural_w` leans high on purpose for budgets); None: `natural_w`.
    curve_natural_w: FloatArray | None = None

    @staticmethod
    def constant(
        n: int,
        natural_w: FloatArray,
        a: float,
        b: float,
        cap_draw_frac: float,
        natural_w_hi: FloatArray | None = None,
    ) -> CurveEstimates:
        return CurveEstimates(
            natural_w=natural_w,
            a=np.full(n, a),
            b=np.full(n, b),
            cap_draw_frac=np.full(n, cap_draw_frac),
            confidence=np.zeros(n),
            source=np.full(n, "prior"),
            natural_w_hi=natural_w if natural_w_hi is None else natural_w_hi,
        )


@dataclass(frozen=True, eq=False)
class PowerForecast:
    """Fleet (and per-node) power at future horizons, with a prediction interval."""

    horizons_s: tuple[float, ...]
    fleet_w: FloatArray  # per horizon: point forecast
    fleet_lo_w: FloatArray  # per horizon: lower bound of the interval
    fleet_hi_w: FloatArray  # per horizon: upper bound
    node_w: FloatArray | None = None  # nodes x horizons
    node_hi_w: FloatArray | None = None
    method: str = "persistence"  # which model produced it ("persistence" or a learned one)
    coverage: float = 0.9  # nominal coverage of [lo, hi]
    node_lo_w: FloatArray | None = None  # nodes x horizons
    node_methods: tuple[str, ...] = ()  # per horizon: what produced node_w
    fleet_methods: tuple[str, ...] = ()  # per horizon: what produced fleet_w
    node_temp_c: FloatArray | None = None  # nodes x horizons: the node's hottest GPU
    node_temp_lo_c: FloatArray | None = None
    node_temp_hi_c: FloatArray | None = None

    def at(self, horizon_s: float) -> tuple[float, float, float]:
        """Point, low, high at the first horizon >= horizon_s (the last one if none)."""
        idx = int(np.searchsorted(np.asarray(self.horizons_s), horizon_s))
        idx = min(idx, len(self.horizons_s) - 1)
        return float(self.fleet_w[idx]), float(self.fleet_lo_w[idx]), float(self.fleet_hi_w[idx])


class HealthSeverity(IntEnum):
    """Ordered: a higher value needs a stronger response."""

    OK = 0
    WATCH = 1
    RESTART_JOB = 2  # the job that hit it should be requeued; the GPU stays in service
    DRAIN = 3  # take the node out of service


@dataclass(frozen=True, eq=False)
class HealthStatus:
    """Per GPU: a severity, the signal that set it, and NVIDIA's documented remediation."""

    severity: IntArray  # HealthSeverity values
    code: StrArray  # e.g. "xid:79", "ecc_dbe", "row_remap_failure", "" when OK
    remediation: StrArray  # e.g. "drain, requeue its jobs"
    since_s: FloatArray  # when the current condition started (NaN when OK)
    # Every condition held, comma-separated (e.g. "row_remap_failure,ecc_dbe,xid:48"); None when
    # the producer does not say.
    conditions: StrArray | None = None

    @staticmethod
    def healthy(n: int) -> HealthStatus:
        return HealthStatus(
            severity=np.zeros(n, dtype=np.int64),
            code=np.full(n, "", dtype=np.str_),
            remediation=np.full(n, "", dtype=np.str_),
            since_s=np.full(n, np.nan),
            conditions=np.full(n, "", dtype=np.str_),
        )


@dataclass(frozen=True, eq=False)
class AnomalyFlags:
    """Per GPU: an anomaly score and a flag; evidence only for flagged GPUs (row -> details)."""

    score: FloatArray
    flagged: BoolArray
    kind: StrArray  # e.g. "power", "temp", "straggler", "hot_vs_peers", "multivariate"
    evidence: Mapping[int, list[dict[str, Any]]] = field(default_factory=dict)
    persistent: BoolArray | None = None  # flagged for many consecutive cycles

    @staticmethod
    def none(n: int) -> AnomalyFlags:
        return AnomalyFlags(
            score=np.zeros(n),
            flagged=np.zeros(n, dtype=bool),
            kind=np.full(n, "", dtype=np.str_),
            persistent=np.zeros(n, dtype=bool),
        )


@dataclass(frozen=True, eq=False)
class NodeStates:
    """Per node (aligned with snapshot.node_names): what the placement actuator reports."""

    drained: BoolArray  # drained or draining, by anyone
    drained_by_us: BoolArray  # our reason prefix ("ooda:")
    reason: StrArray
    weight: IntArray
    features: tuple[frozenset[str], ...]
    opted_out: BoolArray  # the node carries the opt-out feature or label
    known: BoolArray  # the placement system knows this node
    # Per node: the partitions (Slurm) or pools it belongs to; None: the system does not say.
    partitions: tuple[frozenset[str], ...] | None = None
    # Per node: drained by us only in the record (advice, laid over the real state so advising
    # policies see it followed); None: nothing recorded. A live intent must not count on it.
    recorded_drain: BoolArray | None = None

    def live_drained_by_us(self, k: int) -> bool:
        """Node `k` is drained by us for real (not only in the record)."""
        return bool(self.drained_by_us[k]) and not self.recorded_only(k)

    def live_drained(self, k: int) -> bool:
        """Node `k` is drained for real (by anyone)."""
        return bool(self.drained[k]) and not self.recorded_only(k)

    def recorded_only(self, k: int) -> bool:
        return self.recorded_drain is not None and bool(self.recorded_drain[k])

    @staticmethod
    def unknown(n_nodes: int) -> NodeStates:
        return NodeStates(
            drained=np.zeros(n_nodes, dtype=bool),
            drained_by_us=np.zeros(n_nodes, dtype=bool),
            reason=np.full(n_nodes, "", dtype=np.str_),
            weight=np.ones(n_nodes, dtype=np.int64),
            features=tuple(frozenset() for _ in range(n_nodes)),
            opted_out=np.zeros(n_nodes, dtype=bool),
            known=np.zeros(n_nodes, dtype=bool),
        )


@dataclass(frozen=True, eq=False)
class Situation:
    """Everything a policy may know at one instant."""

    snapshot: Snapshot
    time_s: float
    budget_w: float | None  # the cluster budget now (None: unknown; nothing budget-related is done)
    fleet_power_w: float  # fresh GPUs' power plus node overhead
    overhead_w: float  # the non-GPU power the budget covers (configured per node)
    busy: BoolArray  # per GPU: running work
    curves: CurveEstimates
    priority: IntArray  # per GPU: the priority class of its job (higher = more important)
    cap_w: FloatArray  # per GPU: the current power limit (NaN if unknown)
    min_cap_w: FloatArray  # per GPU: the settable range (NaN if unknown: never capped)
    max_cap_w: FloatArray
    default_cap_w: FloatArray
    forecast: PowerForecast | None = None
    health: HealthStatus | None = None
    anomalies: AnomalyFlags | None = None
    nodes: NodeStates | None = None
    # Per group (rack, row): its own budget (W) and which GPUs belong to it.
    group_budgets: Mapping[str, tuple[float, BoolArray]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what orient wants the operator to know (e.g. stale GPUs)
    idle_s: FloatArray | None = None  # per GPU: seconds idle so far (0 when busy, NaN unknown)
    capped_by_us: BoolArray | None = None  # per GPU: the current cap is one the agent set
    interval_s: float = 15.0  # the control interval: decisions must hold until the next cycle
    # The most power new work can add before the next cycle, learned from history (None: not
    # known yet, assume the worst: every idle GPU jumps to its cap).
    arrival_reserve_w: float | None = None
    # Per GPU: the throughput in use for its job (its own, or the SM-clock proxy), and which.
    throughput: ThroughputView | None = None

    @property
    def headroom_w(self) -> float | None:
        if self.budget_w is None:
            return None
        return self.budget_w - self.fleet_power_w

    def stale_worst_w(self) -> tuple[FloatArray, bool]:
        """Per GPU, what it may draw while unseen (0 W where fresh), and whether any of that is a
        guess. A stale GPU counts at its maximum limit; where that is unknown (a model missing
        from the built-in table that reports no limits while stale) at the largest limit known,
        in the fleet or the table. An unknown model may draw more still: hence the flag, and a
        caller holds its caps rather than release them on a guess."""
        stale = ~self.snapshot.fresh
        known = np.isfinite(self.max_cap_w)
        largest = max(float(self.max_cap_w[known].max(initial=0.0)), LARGEST_BUILTIN_MAX_CAP_W)
        worst = np.where(stale, np.where(known, self.max_cap_w, largest), 0.0)
        return worst, bool((stale & ~known).any())

"""Orient: a Snapshot becomes a Situation (headroom, who is busy, each GPU's power curve).

Pure computation over numpy arrays; the state it keeps between cycles (learned draws) lives in
its trackers and is explicit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.core.gpu_models import BUILTIN_MODELS
from agent.core.situation import CurveEstimates, NodeStates, Situation
from agent.core.snapshot import Metric, Snapshot
from agent.orient.arrivals import ArrivalTracker
from agent.orient.groups import GroupSpec, group_masks, job_priorities
from agent.orient.idle import IdleTracker
from agent.orient.natural import NaturalDrawTracker

FloatArray = npt.NDArray[np.float64]


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
    n = snapshot.n_gpus
    table = {m.model_name: m for m in BUILTIN_MODELS.values()}
    model_min = np.full(n, np.nan)
    model_max = np.full(n, np.nan)
    model_def = np.full(n, np.nan)
    for name in np.unique(snapshot.model):
        spec = table.get(str(name))
        if spec is not None:
            rows = snapshot.model == name
            model_min[rows], model_max[rows], model_def[rows] = (
                spec.min_cap_w,
                spec.max_cap_w,
                spec.default_cap_w,
            )

    def pick(metric: Metric, fallback: FloatArray) -> FloatArray:
        values, ok = snapshot.column(metric)
        return np.where(ok, values, fallback)

    current = pick(Metric.POWER_LIMIT_W, pick(Metric.ENFORCED_LIMIT_W, np.full(n, np.nan)))
    return (
        current,
        pick(Metric.MIN_LIMIT_W, model_min),
        pick(Metric.MAX_LIMIT_W, model_max),
        pick(Metric.DEFAULT_LIMIT_W, model_def),
    )


class Orienter:
    def __init__(
        self,
        node_overhead_w: float = 0.0,
        prior: CurvePrior | None = None,
        natural: NaturalDrawTracker | None = None,
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
        self.prior = prior or CurvePrior()
        self.natural = natural or NaturalDrawTracker()
        self.idle = IdleTracker()
        self.arrivals = ArrivalTracker()

    def to_dict(self) -> dict[str, Any]:
        """The models' learned state, JSON-ready (the daemon persists it across restarts)."""
        return {
            "natural": self.natural.state.to_dict(),
            "idle": self.idle.state.to_dict(),
            "arrivals": self.arrivals.to_dict(),
        }

    def load_dict(self, data: Mapping[str, Any]) -> None:
        if "natural" in data:
            self.natural.state.load_dict(data["natural"])
        if "idle" in data:
            self.idle.state.load_dict(data["idle"])
        if "arrivals" in data:
            self.arrivals.load_dict(data["arrivals"])

    def orient(
        self,
        snapshot: Snapshot,
        budget_w: float | None,
        nodes: NodeStates | None = None,
        priority: npt.NDArray[np.int64] | None = None,
    ) -> Situation:
        n = snapshot.n_gpus
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
        curves = CurveEstimates(
            natural_w=natural,
            a=np.full(n, self.prior.a),
            b=np.full(n, self.prior.b),
            # Learned where seen capped, else the prior (noise is the budget's fleet margin).
            cap_draw_frac=np.where(
                np.isfinite(draw.cap_draw_frac),
                np.minimum(draw.cap_draw_frac, 1.0),
                self.prior.cap_draw_frac,
            ),
            confidence=np.zeros(n),
            source=np.full(n, "prior", dtype=np.str_),
            natural_w_hi=natural_hi,
        )
        power, power_ok = snapshot.column(Metric.POWER_W)
        fresh_power = power_ok & snapshot.fresh
        overhead = self.node_overhead_w * snapshot.n_nodes
        fleet = float(power[fresh_power].sum()) + overhead
        notes: list[str] = []
        n_stale = int(snapshot.stale.sum())
        if n_stale:
            notes.append(
                f"{n_stale} GPUs stale: no actions on them, their power is not in fleet_power_w"
            )
        if priority is None:
            priority = job_priorities(
                snapshot.job, self.job_priority, _priority_from_labels(snapshot)
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
            nodes=nodes,
            notes=tuple(notes),
            idle_s=self.idle.update(snapshot.uuid, draw.busy, snapshot.fresh, snapshot.time_s),
            arrival_reserve_w=self.arrivals.update(snapshot.uuid, draw.busy, snapshot.fresh, power),
            group_budgets=group_masks(
                snapshot, self.groups, self.group_label, self.label_budgets_w
            ),
        )


def _priority_from_labels(snapshot: Snapshot) -> npt.NDArray[np.int64]:
    """The `priority` label (an integer class) where telemetry carries one, else 0."""
    label = snapshot.labels.get("priority")
    if label is None:
        return np.zeros(snapshot.n_gpus, dtype=np.int64)
    digits = np.char.isdigit(label)
    out = np.zeros(snapshot.n_gpus, dtype=np.int64)
    out[digits] = label[digits].astype(np.int64)
    return out

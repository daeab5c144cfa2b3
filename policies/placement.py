"""placement: steer new work away from hot, unhealthy or power-constrained nodes, softly.

Each node gets a class: `avoid` (a GPU in a health condition or near its slowdown temperature),
`constrained` (its busy GPUs capped well below their natural draw), or `normal`. The scheduler
weight follows the class (higher = less preferred, as in Slurm), so new jobs land elsewhere while
running jobs are left alone; optionally a feature (e.g. `ooda_avoid`) marks the node for jobs that
ask for it. At most `max_changes_per_cycle` nodes change per cycle, the worst first, and a node's
weight returns to what it was before the agent changed it once its condition clears.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from agent.core.intents import Intent, SetNodeFeatures, SetNodeWeight
from agent.core.reads import Reads
from agent.core.situation import HealthSeverity, Situation
from agent.core.snapshot import Metric
from policies.base import BasePolicy, Decision, PolicyMemory, PolicySettings
from policies.common import slowdown_temp_c

NORMAL, CONSTRAINED, AVOID = 0, 1, 2
CLASS_NAMES = ("normal", "constrained", "avoid")


class PlacementSettings(PolicySettings):
    hot_margin_c: float = Field(
        6.0, ge=0.0, le=40.0, description="Avoid nodes with a GPU this close to slowdown (C)."
    )
    constrained_headroom_frac: float = Field(
        0.05,
        ge=0.0,
        le=0.5,
        description="Constrained: a node in a rack or row drawing within this share of its own "
        "budget.",
    )
    constrained_weight: int = Field(
        50, ge=1, le=65533, description="Weight of a power-constrained node."
    )
    avoid_weight: int = Field(1000, ge=1, le=65533, description="Weight of a node to avoid.")
    use_features: bool = Field(False, description="Also mark avoided nodes with a feature.")
    avoid_feature: str = Field(
        "ooda_avoid", min_length=1, description="The feature marking avoided nodes."
    )
    max_changes_per_cycle: int = Field(10, ge=1, description="Nodes changed per cycle, at most.")
    lease_s: float = Field(300.0, gt=0.0, description="How long these intents stay valid (s).")


class PlacementMemory(PolicyMemory):
    original_weight: dict[str, int] = Field(default_factory=dict)  # node -> weight before us
    marked: list[str] = Field(default_factory=list)  # nodes we gave the avoid feature


class Placement(BasePolicy[PlacementSettings, PlacementMemory]):
    name: ClassVar[str] = "placement"
    # How hot and how loaded each node is.
    reads: ClassVar[Reads] = Reads.every_cycle(Metric.TEMP_C, Metric.POWER_W)
    safety: ClassVar[bool] = False
    description: ClassVar[str] = (
        "Steer new work away from hot, unhealthy or power-constrained nodes."
    )
    Settings = PlacementSettings
    Memory = PlacementMemory

    def node_class(self, situation: Situation) -> np.ndarray:
        s = self.settings
        snap = situation.snapshot
        temp, temp_ok = snap.column(Metric.TEMP_C)
        hot = temp_ok & snap.fresh & (temp >= slowdown_temp_c(situation) - s.hot_margin_c)
        unhealthy = (
            situation.health.severity >= HealthSeverity.WATCH
            if situation.health is not None
            else np.zeros(snap.n_gpus, dtype=bool)
        )
        # Power-constrained: the node's rack or row is at its own budget. A fleet-wide budget
        # constrains every node alike, and steering between equals only fragments the cluster,
        # so only some nodes being constrained counts.
        cls = np.full(snap.n_nodes, NORMAL, dtype=np.int64)
        power = np.nan_to_num(snap.column(Metric.POWER_W)[0], nan=0.0)
        constrained = np.zeros(snap.n_nodes, dtype=bool)
        for _name, (budget_w, members) in situation.group_budgets.items():
            if power[members].sum() >= (1.0 - s.constrained_headroom_frac) * budget_w:
                constrained[np.unique(snap.node[members])] = True
        if not constrained.all():
            cls[constrained] = CONSTRAINED
        cls[np.bincount(snap.node[hot | unhealthy], minlength=snap.n_nodes) > 0] = AVOID
        return cls

    def decide(
        self, situation: Situation, memory: PolicyMemory, now_s: float
    ) -> Decision[PolicyMemory]:
        assert isinstance(memory, PlacementMemory)
        s = self.settings
        snap = situation.snapshot
        nodes = situation.nodes
        if snap.n_nodes == 0 or nodes is None:
            return Decision([], memory)
        cls = self.node_class(situation)
        original = dict(memory.original_weight)
        marked = set(memory.marked)
        wanted: list[tuple[int, int, str, int]] = []  # (priority, node index, name, weight)
        for k in np.flatnonzero(nodes.known & ~nodes.drained & ~nodes.opted_out).tolist():
            name = str(snap.node_names[k])
            current = int(nodes.weight[k])
            base = original.get(name, current)
            target = {
                NORMAL: base,
                CONSTRAINED: max(base, s.constrained_weight),
                AVOID: max(base, s.avoid_weight),
            }[int(cls[k])]
            if target != current:
                wanted.append((-int(cls[k]), int(k), name, target))
        wanted.sort()
        intents: list[Intent] = []
        for _prio, k, name, target in wanted[: s.max_changes_per_cycle]:  # worst first
            if name not in original:
                original[name] = int(nodes.weight[k])
            intents.append(
                SetNodeWeight(
                    policy=self.name,
                    reason=f"node is {CLASS_NAMES[int(cls[k])]}: steer new work "
                    + ("elsewhere" if cls[k] != NORMAL else "back"),
                    evidence={
                        "class": CLASS_NAMES[int(cls[k])],
                        "weight_before": int(nodes.weight[k]),
                    },
                    expires_s=now_s + s.lease_s,
                    node=name,
                    weight=target,
                )
            )
            if target == original[name] and cls[k] == NORMAL:
                del original[name]
        if s.use_features:
            for k in np.flatnonzero(nodes.known & ~nodes.opted_out).tolist():
                name = str(snap.node_names[k])
                has = s.avoid_feature in nodes.features[k]
                if cls[k] == AVOID and not has:
                    intents.append(
                        SetNodeFeatures(
                            policy=self.name,
                            reason="node to avoid",
                            expires_s=now_s + s.lease_s,
                            node=name,
                            add=frozenset({s.avoid_feature}),
                        )
                    )
                    marked.add(name)
                elif cls[k] != AVOID and has and name in marked:
                    intents.append(
                        SetNodeFeatures(
                            policy=self.name,
                            reason="condition cleared",
                            expires_s=now_s + s.lease_s,
                            node=name,
                            remove=frozenset({s.avoid_feature}),
                        )
                    )
                    marked.discard(name)
        return Decision(intents, PlacementMemory(original_weight=original, marked=sorted(marked)))

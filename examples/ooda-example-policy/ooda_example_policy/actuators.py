"""An example third-party actuator kind for ooda: a placement system that only logs. Every drain,
resume, weight, feature change and requeue the agent decides is appended as one JSON line to a
file; nothing on a cluster changes. It shows what an actuator plug-in needs: an `ActuatorKind`
with a name, its role, its config section (a pydantic model: `[actuators.log_placement]`) and a
builder, named by an entry point in the group `ooda.actuators`.

    [actuators]
    placement = "log_placement"

    [actuators.log_placement]
    path = "/var/log/ooda/placement.jsonl"
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from agent.adapters import ActuatorKind, BuildContext
from agent.core.situation import NodeStates


class LogPlacementSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Path = Field(..., description="The JSON-lines file each placement action is appended to.")
    reason_prefix: str = Field(
        "ooda:", min_length=1, description="Drains whose reason starts so are the agent's."
    )


class LogPlacement:
    """A PlacementActuator that writes what it is asked and changes nothing. The nodes it was
    asked to drain show as drained by the agent (until resumed), so the policies see their
    decisions followed, as on a real scheduler."""

    def __init__(self, settings: LogPlacementSettings, cluster: str) -> None:
        self.settings = settings
        self.cluster = cluster
        self.drained: dict[str, str] = {}
        self._lock = threading.Lock()

    def _log(self, action: str, node: str, **detail: Any) -> None:
        line = {"time": time.time(), "cluster": self.cluster, "action": action, "node": node}
        with self._lock, self.settings.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps({**line, **detail}) + "\n")

    def node_states(self, node_names: Sequence[str]) -> NodeStates:
        n = len(node_names)
        drained = np.array([name in self.drained for name in node_names], dtype=bool)
        return NodeStates(
            drained=drained,
            drained_by_us=drained.copy(),
            reason=np.array([self.drained.get(name, "") for name in node_names], dtype=np.str_),
            weight=np.ones(n, dtype=np.int64),
            features=(frozenset(),) * n,
            opted_out=np.zeros(n, dtype=bool),
            known=np.ones(n, dtype=bool),
        )

    def drain(self, node: str, reason: str) -> None:
        self._log("drain", node, reason=reason)
        if reason.startswith(self.settings.reason_prefix):
            self.drained[node] = reason

    def resume(self, node: str) -> None:
        self._log("resume", node)
        self.drained.pop(node, None)

    def set_weight(self, node: str, weight: int) -> None:
        self._log("weight", node, weight=weight)

    def set_features(self, node: str, add: frozenset[str], remove: frozenset[str]) -> None:
        self._log("features", node, add=sorted(add), remove=sorted(remove))

    def requeue(self, job: str) -> None:
        self._log("requeue", "", job=job)


def _build(settings: LogPlacementSettings, ctx: BuildContext) -> LogPlacement:
    settings.path.parent.mkdir(parents=True, exist_ok=True)
    return LogPlacement(settings, ctx.cluster)


LOG_PLACEMENT = ActuatorKind(
    name="log_placement",
    role="placement",
    description="A placement system that only logs each action as a JSON line (an example).",
    build=_build,
    Settings=LogPlacementSettings,
    needs_section=True,  # where to write
)

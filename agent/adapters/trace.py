"""A recorded trace as the agent's world (source kind `trace`, its section `[source.trace]`;
placement kind `trace`): `ooda run` or `ooda once` over last week's recording, in dry-run, to see
what the agent would have advised cycle by cycle, with its audit log and its metrics. The trace's
time follows the agent's clock from its first step (`speed` trace seconds a second). A trace
records no scheduler: its placement shows every node in service and changes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from agent.adapters.table import ActuatorKind, BuildContext, SourceKind
from agent.core.clock import Clock, FollowingClock, SystemClock
from agent.core.errors import ActuatorError, ConfigError, TraceError
from agent.core.protocols import TelemetrySource
from agent.core.settings import STRICT_SECTION, file_field
from agent.core.situation import NodeStates
from agent.observe.trace import TraceReader


class TraceSourceConfig(BaseModel):
    model_config = STRICT_SECTION

    path: Path = Field(
        ...,
        strict=False,
        description="The trace file (`ooda record`).",
        json_schema_extra=file_field("file"),
    )
    speed: float = Field(
        1.0, gt=0, le=1e6, description="Trace seconds per second of the agent's clock."
    )


def _build(section: TraceSourceConfig, _ctx: BuildContext) -> TraceReader:
    try:
        reader = TraceReader(section.path)
    except TraceError as exc:
        raise ConfigError(f"source.trace.path: {exc}") from None
    if reader.meta.steps == 0:
        raise ConfigError(f"source.trace.path: trace {section.path} holds no steps")
    return reader


def _clock(source: TelemetrySource, ctx: BuildContext, section: Any) -> Clock:
    assert isinstance(source, TraceReader)
    speed = section.speed if isinstance(section, TraceSourceConfig) else 1.0
    return FollowingClock(ctx.wall or SystemClock(), float(source.meta.time_s[0]), speed)


def _recorded_budget(section: Any, _config: Any) -> bool | None:
    """Whether the trace recorded a budget (None: it cannot be read, which its own check says)."""
    try:
        budgets = TraceReader(section.path).meta.budget_w
    except TraceError:
        return None
    return bool(np.isfinite(budgets).any())


def _where(section: Any, _nodes: Sequence[str]) -> str:
    return f"trace {section.path}"


class TracePlacement:
    """The placement system of a recorded trace: every node in service, nothing to change."""

    def node_states(self, node_names: Sequence[str]) -> NodeStates:
        n = len(node_names)
        return NodeStates(
            drained=np.zeros(n, dtype=bool),
            drained_by_us=np.zeros(n, dtype=bool),
            reason=np.full(n, "", dtype=np.str_),
            weight=np.ones(n, dtype=np.int64),
            features=(frozenset(),) * n,
            opted_out=np.zeros(n, dtype=bool),
            known=np.ones(n, dtype=bool),
        )

    def _refuse(self, what: str) -> None:
        raise ActuatorError(f"{what}: a recorded trace cannot be changed (run it in dry-run)")

    def drain(self, node: str, reason: str) -> None:
        self._refuse(f"drain {node}")

    def resume(self, node: str) -> None:
        self._refuse(f"resume {node}")

    def set_weight(self, node: str, weight: int) -> None:
        self._refuse(f"weight of {node}")

    def set_features(self, node: str, add: frozenset[str], remove: frozenset[str]) -> None:
        self._refuse(f"features of {node}")

    def requeue(self, job: str) -> None:
        self._refuse(f"requeue {job}")


TRACE_SOURCE = SourceKind(
    name="trace",
    description="A recorded trace, its time following the agent's clock ([source.trace]).",
    build=_build,
    Settings=TraceSourceConfig,
    labels=None,  # whatever labels it recorded
    called="a trace",
    clock=_clock,
    own_budget=_recorded_budget,
    describe=_where,
)
TRACE_PLACEMENT = ActuatorKind(
    name="trace",
    role="placement",
    description="A recorded trace's nodes, every one in service; advice only.",
    build=lambda _section, _ctx: TracePlacement(),
)

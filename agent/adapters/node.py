"""Caps through the privileged node daemons (actuator kind `node` for caps, its section
`[actuators.node]`: where the daemons are and how to authenticate). The nodes also know each GPU's
cap range and limits, so a source whose exporters lack them (dcgm-exporter's default) gets them
from here."""

from __future__ import annotations

from typing import Any

from agent.act.node_client import NodeCapActuator, NodeClientSettings
from agent.adapters.table import ActuatorKind, BuildContext
from agent.core.protocols import TelemetrySource
from agent.observe.limits import LimitsFilledSource


def _build(section: NodeClientSettings, ctx: BuildContext) -> NodeCapActuator:
    caps = NodeCapActuator(section, clock=ctx.clock)
    ctx.closers.append(caps.close)
    return caps


def _limits(
    source: TelemetrySource, caps: Any, _section: NodeClientSettings, ctx: BuildContext
) -> TelemetrySource:
    """Limits the exporter lacks come from the nodes."""
    if ctx.source_kind is not None and ctx.source_kind.fills_limits:
        return LimitsFilledSource(source, caps)
    return source


NODE_CAPS = ActuatorKind(
    name="node",
    role="caps",
    description="Caps through the node daemons (leases; [actuators.node] says where they are).",
    build=_build,
    Settings=NodeClientSettings,
    needs_section=True,
    wrap_source=_limits,
)

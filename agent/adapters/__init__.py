"""The adapter table: every kind of telemetry source and actuator the agent can be configured
with, each with its builder and the config section it owns.

A source kind (`[source] kind = "NAME"`) owns the section `[source.NAME]`; an actuator kind
(`[actuators] caps = "NAME"` or `placement = "NAME"`) owns `[actuators.NAME]`. Configuration
validation (agent.config) and the assembly (agent.assembly) read this same table: a kind is
valid when it is here, its section is validated by its own pydantic model, and it is built by its
own builder. Built-in kinds are listed explicitly (`builtin_adapters`); third parties add theirs
through the entry-point groups `ooda.sources` and `ooda.actuators`, each entry point naming a
`SourceKind` or an `ActuatorKind` (see examples/ooda-example-policy), as they add policies
through `ooda.policies`.

Builders receive their own section (validated) and a `BuildContext`: the cluster's name, the
clock, what the loop reads (for a source to leave the rest out), the actuators built so far, the
in-process twin when a kind needs it, and where to register what closes the adapter.
"""

from __future__ import annotations

from agent.adapters.node import NODE_CAPS
from agent.adapters.notify import NOTIFY
from agent.adapters.nvml import NVML_SOURCE
from agent.adapters.prometheus import PROMETHEUS_SOURCE
from agent.adapters.remote_write import REMOTE_WRITE_SOURCE
from agent.adapters.slurm import SLURM_PLACEMENT
from agent.adapters.table import (
    ACTUATORS_GROUP,
    NONE,
    SOURCES_GROUP,
    ActuatorKind,
    Adapters,
    BuildContext,
    DuplicateAdapterError,
    Role,
    SourceKind,
)
from agent.adapters.trace import TRACE_PLACEMENT, TRACE_SOURCE
from agent.adapters.twin import TWIN_CAPS, TWIN_PLACEMENT, TWIN_SOURCE

__all__ = [
    "ACTUATORS_GROUP",
    "NONE",
    "SOURCES_GROUP",
    "ActuatorKind",
    "Adapters",
    "BuildContext",
    "DuplicateAdapterError",
    "Role",
    "SourceKind",
    "builtin_adapters",
    "default_adapters",
]


def builtin_adapters() -> Adapters:
    """A fresh table of the built-in kinds (explicitly listed)."""
    table = Adapters()
    sources = (TWIN_SOURCE, PROMETHEUS_SOURCE, NVML_SOURCE, REMOTE_WRITE_SOURCE, TRACE_SOURCE)
    for source in sources:
        table.add_source(source)
    for actuator in (
        TWIN_CAPS,
        NODE_CAPS,
        TWIN_PLACEMENT,
        SLURM_PLACEMENT,
        TRACE_PLACEMENT,
        NOTIFY,
    ):
        table.add_actuator(actuator)
    return table


def default_adapters() -> Adapters:
    """The built-in kinds and every installed plug-in's."""
    table = builtin_adapters()
    table.load_entry_points()
    return table

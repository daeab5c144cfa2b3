"""This node's GPUs through NVML as a source kind (`[source] kind = "nvml"`, its section
`[source.nvml]`): for one GPU node, no Prometheus needed."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from agent.adapters.table import BuildContext, SourceKind
from agent.core.errors import ConfigError, GpuError
from agent.core.settings import STRICT_SECTION
from agent.node.nvml import NvmlBackend
from agent.observe.nvml import NvmlSource
from agent.sim.twin import PRIORITY_LABEL


class _Section(BaseModel):
    model_config = STRICT_SECTION


class NvmlSourceConfig(_Section):
    node: str | None = Field(
        None,
        min_length=1,
        description="This node's name, as Slurm and the node daemons know it (default: the host "
        "name up to its first dot).",
    )


def _build(section: NvmlSourceConfig, ctx: BuildContext) -> NvmlSource:
    """This node's GPUs through NVML; what closes it goes into the context's closers."""
    try:
        backend = NvmlBackend()
    except GpuError as exc:
        # systemd sets INVOCATION_ID for its services: the agent's unit hides the devices.
        hint = (
            " (the agent's systemd unit hides the NVIDIA devices: add its drop-in "
            "ooda-agent.service.d/nvml.conf)"
            if os.environ.get("INVOCATION_ID")
            else ""
        )
        raise ConfigError(f"source.kind = 'nvml': {exc}{hint}") from exc
    ctx.closers.append(backend.close)
    return NvmlSource(backend, section.node or socket.gethostname().split(".")[0])


def _where(_section: Any, nodes: Sequence[str]) -> str:
    return f"nvml on {', '.join(map(str, nodes)) or '?'}"


NVML_SOURCE = SourceKind(
    name="nvml",
    description="This node's GPUs read directly through NVML ([source.nvml]; one GPU node).",
    build=_build,
    Settings=NvmlSourceConfig,
    # NVML's GPUs carry no labels; Slurm's job priority is the one they get, as the twin's do.
    labels=(PRIORITY_LABEL,),
    whose="NVML's",
    called="an NVML",
    describe=_where,
)

"""Samples pushed by a Prometheus, vmagent or OpenTelemetry collector (Prometheus remote write)
as a source kind: `[source] kind = "remote_write"`, its section `[source.remote_write]`
(agent/observe/remote_write/settings.py). No Prometheus to query: the agent keeps the newest
sample of every series itself, so a PromQL budget cannot be evaluated with it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.adapters.table import BuildContext, SourceKind
from agent.node.auth import TokenStore
from agent.observe.remote_write import RemoteWriteSource
from agent.observe.remote_write.settings import RemoteWriteConfig


def _build(section: RemoteWriteConfig, ctx: BuildContext) -> RemoteWriteSource:
    """The remote-write receiver, listening; what stops it goes into the context's closers."""
    tokens = TokenStore(section.token_file) if section.token_file is not None else None
    source = RemoteWriteSource(
        section,
        extra_labels=(ctx.group_label,) if ctx.group_label else (),
        tokens=tokens,
    )
    ctx.closers.append(source.close)
    return source


def _where(section: Any, _nodes: Sequence[str]) -> str:
    return f"remote write on {section.listen}"


REMOTE_WRITE_SOURCE = SourceKind(
    name="remote_write",
    description="Samples pushed by a Prometheus, vmagent or OpenTelemetry collector "
    "([source.remote_write]).",
    build=_build,
    Settings=RemoteWriteConfig,
    labels=None,  # its GPUs carry their series' labels
    called="a remote-write",
    fills_limits=True,  # exporters send no power limits by default: the nodes know them
    describe=_where,
    no_budget_query="PromQL needs a Prometheus to evaluate it, and a remote_write source has "
    "none; give cluster.budget_w",
)

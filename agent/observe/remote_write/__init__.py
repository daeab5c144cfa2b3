"""Streaming telemetry: the fleet from Prometheus remote write (protobuf and snappy), as
Prometheus, vmagent and the OpenTelemetry collector send it. `[source] kind = "remote_write"`."""

from agent.observe.remote_write.settings import RemoteWriteConfig
from agent.observe.remote_write.source import RemoteWriteSource

__all__ = ["RemoteWriteConfig", "RemoteWriteSource"]

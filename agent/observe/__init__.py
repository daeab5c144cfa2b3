"""Telemetry sources (Prometheus, NVML, trace files) -> Snapshot."""

"""Telemetry joined with the scheduler's jobs: a TelemetrySource decorator.

The inner source says what each GPU draws; the placement system's job table (the JobInventory
protocol) says which job holds each GPU and how important that job is. Joined here, every GPU of a
known job carries that job's priority class as the `priority` label (power_budget weighs by it),
and a GPU whose telemetry names no job (an exporter without the `hpc_job` label) gets the job the
scheduler placed there. When the job table cannot be read the Snapshot is passed on unchanged,
with the reason in its errors.
"""

from __future__ import annotations

from dataclasses import replace

from agent.core.errors import OodaError
from agent.core.jobs import label_snapshot
from agent.core.protocols import JobInventory, TelemetrySource
from agent.core.snapshot import Snapshot


class JobLabelledSource:
    def __init__(
        self, source: TelemetrySource, inventory: JobInventory, default_priority: int = 0
    ) -> None:
        self.source = source
        self.inventory = inventory
        self.default_priority = default_priority

    def observe(self, now_s: float) -> Snapshot:
        snapshot = self.source.observe(now_s)
        if snapshot.n_gpus == 0:
            return snapshot
        try:
            table = self.inventory.jobs()
        except OodaError as exc:
            return replace(snapshot, errors=(*snapshot.errors, f"job table unavailable: {exc}"))
        return label_snapshot(snapshot, table, self.default_priority)

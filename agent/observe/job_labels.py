"""Telemetry joined with the scheduler's jobs: a TelemetrySource decorator.

The inner source says what each GPU draws; the placement system's job table (the JobInventory
protocol) says which job holds each GPU and how important that job is. Joined here, every GPU of a
known job carries that job's priority class as the `priority` label (power_budget weighs by it),
and a GPU whose telemetry names no job (an exporter without the `hpc_job` label) gets the job the
scheduler placed there. Where the scheduler names accounts, each GPU carries its job's as the
`account` label, and, where asked, the snapshot carries the accounts' shares (Slurm's fairshare):
power_budget weighs accounts by them. When the job table cannot be read the Snapshot is passed on
unchanged, with the reason in its errors.
"""

from __future__ import annotations

from dataclasses import replace

from agent.core.errors import OodaError
from agent.core.jobs import label_snapshot
from agent.core.protocols import AccountShares, JobInventory, TelemetrySource
from agent.core.snapshot import Snapshot


class JobLabelledSource:
    def __init__(
        self,
        source: TelemetrySource,
        inventory: JobInventory,
        default_priority: int = 0,
        shares: AccountShares | None = None,
    ) -> None:
        """`shares`: where the accounts' shares come from (Slurm's fairshare), for power_budget;
        None: the snapshot carries none."""
        self.source = source
        self.inventory = inventory
        self.default_priority = default_priority
        self.shares = shares

    def observe(self, now_s: float) -> Snapshot:
        snapshot = self.source.observe(now_s)
        if snapshot.n_gpus == 0:
            return snapshot
        try:
            table = self.inventory.jobs()
        except OodaError as exc:
            return replace(snapshot, errors=(*snapshot.errors, f"job table unavailable: {exc}"))
        labelled = label_snapshot(snapshot, table, self.default_priority)
        if self.shares is None:
            return labelled
        try:
            shares = dict(self.shares.account_shares())
        except OodaError as exc:
            return replace(
                labelled, errors=(*labelled.errors, f"account shares unavailable: {exc}")
            )
        return replace(labelled, account_shares=shares)

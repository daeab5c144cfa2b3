"""The twin's jobs following a real scheduler's (Slurm now): the twin stands in for the GPUs of a
real cluster whose jobs are real.

Each `sync()` reads the scheduler's job table (the JobInventory protocol: for Slurm, squeue's
gres detail says which GPUs of which node each running job holds) and makes the twin agree: a
running job holds exactly those twin GPUs, under its real job id (so the twin's exporter labels
them with it, `hpc_job`), with its priority class; a job that stops running (requeued, cancelled,
finished) frees them. The twin never places, finishes or requeues these jobs itself, so it should
run with no jobs of its own (occupancy 0, no initial jobs); any of its own jobs found on a GPU the
scheduler hands out are put back in its queue.

It only needs the protocol, not Slurm: agent/sim stays free of agent/act.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from agent.core.errors import OodaError
from agent.core.jobs import NO_GPU, JobState, JobTable
from agent.core.protocols import JobInventory, TelemetrySource
from agent.core.snapshot import Snapshot
from agent.sim.twin import Twin


@dataclass
class MirrorReport:
    started: list[str] = field(default_factory=list)  # jobs now holding twin GPUs
    stopped: list[str] = field(default_factory=list)  # jobs that gave their GPUs back
    unplaced: dict[str, str] = field(default_factory=dict)  # running jobs not mirrored, and why


class JobMirror:
    def __init__(self, twin: Twin, inventory: JobInventory) -> None:
        self.twin = twin
        self.inventory = inventory
        self._rows: dict[str, int] = {}  # scheduler job id -> twin job row
        self._held: dict[str, tuple[int, ...]] = {}  # job id -> twin GPU rows it holds now

    def held(self) -> dict[str, tuple[int, ...]]:
        """Job id -> the twin GPU rows it holds (a copy)."""
        return dict(self._held)

    def sync(self, now_s: float | None = None) -> MirrorReport:
        """Make the twin's jobs match the scheduler's now. Raises what the inventory raises
        (the twin then keeps the jobs it had)."""
        now = self.twin.t_s if now_s is None else now_s
        table = self.inventory.jobs()
        report = MirrorReport()
        wanted = self._wanted(table, report)
        states = dict(zip(table.job_id.tolist(), table.state.tolist(), strict=True))
        self._release_changed(wanted, states, report)
        priority = dict(zip(table.job_id.tolist(), table.priority.tolist(), strict=True))
        self._start_wanted(wanted, priority, now, report)
        for job in [j for j in self._rows if j not in states and j not in self._held]:
            self.twin.release_job(self._rows.pop(job), finished=True)  # the scheduler forgot it
        return report

    def _wanted(self, table: JobTable, report: MirrorReport) -> dict[str, list[int]]:
        """Running job id -> the twin GPU rows it holds; jobs that cannot be mirrored go to
        `report.unplaced` with the reason."""
        gpu_rows = self.twin.rows_for(list(table.alloc_node), list(table.alloc_gpu))
        wanted: dict[str, list[int]] = {}
        for k in np.flatnonzero(table.running()):
            job = str(table.job_id[k])
            with_gpu = (table.alloc_job == k) & (table.alloc_gpu != NO_GPU)
            if not with_gpu.any():
                continue  # holds no GPU: nothing to mirror
            rows = gpu_rows[with_gpu]
            if not job.isdecimal():
                report.unplaced[job] = "job id is not an integer"
            elif (rows < 0).any():
                nodes, gpus = table.alloc_node[with_gpu], table.alloc_gpu[with_gpu]
                missing = sorted(
                    {f"{n}/gpu{g}" for n, g, r in zip(nodes, gpus, rows, strict=True) if r < 0}
                )
                report.unplaced[job] = f"the twin has no {', '.join(missing)}"
            else:
                wanted[job] = sorted(int(r) for r in rows)
        return wanted

    def _release_changed(
        self, wanted: dict[str, list[int]], states: dict[str, str], report: MirrorReport
    ) -> None:
        """Give back the GPUs of jobs that ended or moved (finished only if the scheduler says)."""
        for job, held in list(self._held.items()):
            if tuple(wanted.get(job, ())) == held:
                continue
            gone = states.get(job, str(JobState.FINISHED)) == str(JobState.FINISHED)
            self.twin.release_job(self._rows[job], finished=gone and job not in wanted)
            del self._held[job]
            report.stopped.append(job)

    def _start_wanted(
        self,
        wanted: dict[str, list[int]],
        priority: dict[str, int],
        now_s: float,
        report: MirrorReport,
    ) -> None:
        """Place the jobs not held yet on their GPUs (the twin's own jobs there are requeued)."""
        twin = self.twin
        for job, rows in wanted.items():
            row = self._rows.get(job)
            if row is not None:
                twin.jobs.priority[row] = int(priority[job])
            if job in self._held:
                continue
            gpus = np.asarray(rows, dtype=np.int64)
            for other in np.unique(twin.job_row[gpus]):
                if other >= 0 and not twin.jobs.external[other]:  # the twin's own job is in the way
                    twin.requeue_job(int(twin.jobs.job_id[other]))
            if row is None:
                row = twin.add_external_job(int(job), int(priority[job]), now_s)
                self._rows[job] = row
            twin.assign(row, gpus, now_s)
            self._held[job] = tuple(rows)
            report.started.append(job)


class MirroredTwinSource:
    """A TelemetrySource that syncs the mirror before the twin is observed, so every cycle sees
    the twin's GPUs held by the scheduler's current jobs. A failed sync keeps the twin's jobs as
    they were and says so in the Snapshot's errors."""

    def __init__(self, source: TelemetrySource, mirror: JobMirror) -> None:
        self.source = source
        self.mirror = mirror
        self.last: MirrorReport | None = None

    def observe(self, now_s: float) -> Snapshot:
        error = ""
        try:
            self.last = self.mirror.sync()
        except OodaError as exc:
            error = f"job mirror: {exc}"
        snapshot = self.source.observe(now_s)
        if error:
            snapshot = replace(snapshot, errors=(*snapshot.errors, error))
        return snapshot

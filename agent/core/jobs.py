"""The scheduler's jobs, columnar: which jobs exist, in what state, how important, and which GPUs
of which nodes each running job holds.

A placement system (Slurm now; Kubernetes pods later) fills a `JobTable`; the agent joins it with
telemetry (a GPU's job, a job's priority class) and the twin can mirror it. Scheduler-neutral on
purpose: a job is anything that holds GPUs on nodes and can be requeued.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from agent.core.snapshot import Snapshot

IntArray = npt.NDArray[np.int64]
StrArray = npt.NDArray[np.str_]
BoolArray = npt.NDArray[np.bool_]

NO_GPU = -1  # an allocation row for a node a job holds without any GPU on it
ACCOUNT_LABEL = "account"  # the per-GPU label naming the account of the GPU's job


@dataclass(frozen=True, slots=True)
class JobRecord:
    """Who ran a job, as the scheduler's accounting says: one per job (not per GPU), read for a
    job once, when the meter first books it. Empty strings are unknown; times in the clock's
    seconds (None: not started, or not ended)."""

    job: str
    user: str = ""
    account: str = ""
    partition: str = ""
    qos: str = ""
    state: str = ""
    start_s: float | None = None
    end_s: float | None = None
    source: str = ""  # where it was read: squeue (running), sacct (ended), twin, ...


class JobState(StrEnum):
    PENDING = "pending"  # waiting to run (also: requeued)
    RUNNING = "running"
    COMPLETING = "completing"  # ending; its resources are being released
    SUSPENDED = "suspended"
    FINISHED = "finished"  # completed, failed, cancelled... (kept for a while by the scheduler)


@dataclass(frozen=True, eq=False)
class JobTable:
    """Per job: id, state, priority class, restarts. Allocations as flat rows, one per GPU held
    (or one per node held without GPUs, `alloc_gpu == NO_GPU`): the job's position, the node, the
    GPU index on that node. Only running jobs have allocation rows."""

    job_id: StrArray
    state: StrArray  # JobState values
    priority: IntArray  # priority class (higher = more important)
    restarts: IntArray  # times the job was requeued
    alloc_job: IntArray  # per allocation row: index into the job arrays
    alloc_node: StrArray
    alloc_gpu: IntArray
    # Per job: the account it runs under ("" unknown); None: the scheduler does not say.
    account: StrArray | None = None

    def __post_init__(self) -> None:
        n = self.job_id.shape[0]
        for name in ("state", "priority", "restarts"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"JobTable.{name} must have one entry per job ({n})")
        if self.account is not None and self.account.shape != (n,):
            raise ValueError(f"JobTable.account must have one entry per job ({n})")
        m = self.alloc_job.shape[0]
        if not self.alloc_node.shape == self.alloc_gpu.shape == (m,):
            raise ValueError("JobTable allocation arrays must have equal length")
        if m and (self.alloc_job.min() < 0 or self.alloc_job.max() >= n):
            raise ValueError("JobTable.alloc_job points outside the job arrays")

    def __len__(self) -> int:
        return int(self.job_id.shape[0])

    @staticmethod
    def empty() -> JobTable:
        return JobTable(
            job_id=np.zeros(0, dtype=np.str_),
            state=np.zeros(0, dtype=np.str_),
            priority=np.zeros(0, dtype=np.int64),
            restarts=np.zeros(0, dtype=np.int64),
            alloc_job=np.zeros(0, dtype=np.int64),
            alloc_node=np.zeros(0, dtype=np.str_),
            alloc_gpu=np.zeros(0, dtype=np.int64),
        )

    @staticmethod
    def build(
        jobs: Sequence[tuple[str, JobState, int, int]],
        allocations: Sequence[tuple[int, str, int]],
        accounts: Sequence[str] | None = None,
    ) -> JobTable:
        """From rows: jobs as (id, state, priority, restarts); allocations as (job position,
        node, gpu index or NO_GPU); `accounts`, one per job, where the scheduler says."""
        return JobTable(
            job_id=np.array([j[0] for j in jobs], dtype=np.str_).reshape(-1),
            state=np.array([str(j[1]) for j in jobs], dtype=np.str_).reshape(-1),
            priority=np.array([j[2] for j in jobs], dtype=np.int64).reshape(-1),
            restarts=np.array([j[3] for j in jobs], dtype=np.int64).reshape(-1),
            alloc_job=np.array([a[0] for a in allocations], dtype=np.int64).reshape(-1),
            alloc_node=np.array([a[1] for a in allocations], dtype=np.str_).reshape(-1),
            alloc_gpu=np.array([a[2] for a in allocations], dtype=np.int64).reshape(-1),
            account=None if accounts is None else np.array(accounts, dtype=np.str_).reshape(-1),
        )

    def running(self) -> BoolArray:
        return np.asarray(self.state == str(JobState.RUNNING), dtype=bool)

    def index(self, job_id: str) -> int:
        """Position of a job (-1 if unknown)."""
        hits = np.flatnonzero(self.job_id == job_id)
        return int(hits[0]) if hits.size else -1

    def gpus_of(self, job_id: str) -> list[tuple[str, int]]:
        """(node, gpu index) pairs a job holds (GPU NO_GPU: a node held without GPUs)."""
        k = self.index(job_id)
        rows = np.flatnonzero(self.alloc_job == k) if k >= 0 else np.zeros(0, dtype=np.int64)
        return [(str(self.alloc_node[r]), int(self.alloc_gpu[r])) for r in rows]

    def nodes_of(self, job_id: str) -> list[str]:
        return sorted({node for node, _ in self.gpus_of(job_id)})

    def priority_of(self, job_ids: StrArray, default: int = 0) -> IntArray:
        """Per entry of `job_ids` (e.g. a Snapshot's job column): the job's priority class,
        `default` where the job is unknown or the entry is empty. Vectorized (sorted lookup)."""
        out = np.full(job_ids.shape[0], default, dtype=np.int64)
        if not len(self) or not job_ids.size:
            return out
        order = np.argsort(self.job_id, kind="stable")
        keys = self.job_id[order]
        pos = np.clip(np.searchsorted(keys, job_ids), 0, keys.shape[0] - 1)
        hit = keys[pos] == job_ids
        out[hit] = self.priority[order[pos[hit]]]
        return out

    def account_of(self, job_ids: StrArray) -> StrArray:
        """Per entry of `job_ids`: the job's account ("" where the job or its account is
        unknown). Vectorized (sorted lookup)."""
        out = np.full(job_ids.shape[0], "", dtype=object)
        if self.account is None or not len(self) or not job_ids.size:
            return out.astype(np.str_)
        order = np.argsort(self.job_id, kind="stable")
        keys = self.job_id[order]
        pos = np.clip(np.searchsorted(keys, job_ids), 0, keys.shape[0] - 1)
        hit = keys[pos] == job_ids
        out[hit] = self.account[order[pos[hit]]]
        return out.astype(np.str_)

    def job_at(self, node: StrArray, gpu: IntArray) -> StrArray:
        """Per (node, gpu) pair: the running job holding that GPU ("" when none)."""
        names, index = np.unique(node.astype(np.str_), return_inverse=True)
        return self.job_at_rows(names, index.astype(np.int64), gpu)

    def job_at_rows(self, node_names: StrArray, node: IntArray, gpu: IntArray) -> StrArray:
        """As `job_at`, for GPUs given the way a Snapshot holds them (an index into unique
        `node_names` per GPU): integer keys, no per-GPU strings (fast at 100,000 GPUs)."""
        owner = np.full(node.shape[0], -1, dtype=np.int64)  # job position per GPU, -1: none
        has_gpu = self.alloc_gpu != NO_GPU
        if has_gpu.any() and node.size and node_names.size:
            order = np.argsort(node_names)
            sorted_names = node_names[order]
            alloc_node = self.alloc_node[has_gpu]
            at = np.clip(np.searchsorted(sorted_names, alloc_node), 0, sorted_names.shape[0] - 1)
            seen = sorted_names[at] == alloc_node  # allocations on nodes the query knows
            width = int(max(self.alloc_gpu.max(), gpu.max(initial=0))) + 1
            keys = order[at[seen]] * width + self.alloc_gpu[has_gpu][seen]
            jobs = self.alloc_job[has_gpu][seen]
            if keys.size:
                by_key = np.argsort(keys, kind="stable")
                keys = keys[by_key]
                query = node * width + gpu
                pos = np.clip(np.searchsorted(keys, query), 0, keys.shape[0] - 1)
                hit = keys[pos] == query
                owner[hit] = jobs[by_key[pos[hit]]]
        if not len(self):
            return np.full(node.shape[0], "", dtype=np.str_)
        return np.where(owner >= 0, self.job_id[np.maximum(owner, 0)], "").astype(np.str_)


def label_snapshot(snapshot: Snapshot, table: JobTable, default_priority: int = 0) -> Snapshot:
    """The Snapshot with the scheduler's view joined in: a GPU whose telemetry names no job gets
    the job the scheduler placed there, and every GPU of a job the scheduler knows gets that job's
    priority class as the `priority` label (the orienter reads it; others keep theirs, or get
    `default_priority`). Telemetry's own job labels win where present."""
    placed = table.job_at_rows(snapshot.node_names, snapshot.node, snapshot.gpu)
    job = np.where(snapshot.job == "", placed, snapshot.job).astype(np.str_)
    sentinel = np.iinfo(np.int64).min  # tells "unknown job" apart from any real class
    found = table.priority_of(job, sentinel)
    known = found != sentinel
    priority = np.where(known, found, default_priority).astype(np.str_)
    before = snapshot.labels.get("priority")
    if before is not None:  # keep what telemetry said about jobs the scheduler does not know
        priority = np.where(known, priority, before).astype(np.str_)
    labels = {**snapshot.labels, "priority": priority}
    if table.account is not None:  # power shares weigh accounts (power_budget)
        labels[ACCOUNT_LABEL] = table.account_of(job)
    return replace(snapshot, job=job, labels=labels)

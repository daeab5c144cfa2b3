"""Who runs the twin's jobs: users and accounts, as a scheduler's accounting would say.

The twin's jobs have no owners of their own; each is given an account (by the accounts' weights)
and a user from a hash of its id, so the same twin always has the same owners without drawing
from the twin's random stream (its runs stay as they were). Implements the JobAccounting protocol
(agent.core.protocols) for the meter.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from agent.core.jobs import ACCOUNT_LABEL, JobRecord
from agent.core.protocols import TelemetrySource
from agent.core.snapshot import Snapshot
from agent.sim.twin import JOB_DONE, JOB_PENDING, JOB_RUNNING, Twin

DEFAULT_ACCOUNTS = (("team-a", 0.5), ("team-b", 0.3), ("team-c", 0.2))
USERS_PER_ACCOUNT = 3
_STATES = {JOB_PENDING: "pending", JOB_RUNNING: "running", JOB_DONE: "completed"}


def _fraction(job: str) -> float:
    """A job id -> a number in [0, 1), the same every time."""
    digest = hashlib.sha1(f"ooda-twin-account-{job}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def account_of(job: str, accounts: Sequence[tuple[str, float]] = DEFAULT_ACCOUNTS) -> str:
    total = sum(w for _, w in accounts)
    x = _fraction(job) * total
    for name, weight in accounts:
        if x < weight:
            return name
        x -= weight
    return accounts[-1][0]


class TwinAccounts:
    def __init__(
        self, twin: Twin, accounts: Sequence[tuple[str, float]] = DEFAULT_ACCOUNTS
    ) -> None:
        if not accounts or any(w <= 0 for _, w in accounts):
            raise ValueError("accounts need positive weights")
        self.twin = twin
        self.accounts = tuple(accounts)

    def job_records(self, job_ids: Sequence[str]) -> Mapping[str, JobRecord]:
        jobs = self.twin.jobs
        ids = jobs.job_id[: jobs.n]
        row_of = {int(j): k for k, j in enumerate(ids.tolist())}
        out: dict[str, JobRecord] = {}
        for job in job_ids:
            if not job.isdecimal() or int(job) not in row_of:
                continue
            row = row_of[int(job)]
            account = account_of(job, self.accounts)
            user = f"{account}-u{int(_fraction(job + 'u') * USERS_PER_ACCOUNT)}"
            start = float(jobs.start_s[row])
            out[job] = JobRecord(
                job=job,
                user=user,
                account=account,
                qos=f"p{int(jobs.priority[row])}",
                state=_STATES.get(int(jobs.state[row]), "completed"),
                start_s=start if math.isfinite(start) else None,  # NaN: not started
                source="twin",
            )
        return out


class JobEnergyTruth:
    """The twin's true energy per job (J): each physics step's energy, summed per job that held
    the GPU during the step ("" idle). For checking the meter against; steps the twin itself."""

    def __init__(self, twin: Twin) -> None:
        self.twin = twin
        self.joules: dict[str, float] = {}
        self._jobs = twin.job_labels()

    def _held(self, twin: Twin) -> None:
        self._jobs = twin.job_labels()  # after scheduling, before physics: who draws this step

    def run_until(self, t_end_s: float) -> None:
        twin = self.twin
        while twin.t_s < t_end_s - 1e-9:
            before = twin.energy_j.copy()
            twin.step(min(twin.spec.step_s, t_end_s - twin.t_s), control=self._held)
            spent = twin.energy_j - before
            names, inverse = np.unique(self._jobs, return_inverse=True)
            sums = np.bincount(inverse, weights=spent, minlength=names.size)
            for name, joules in zip(names.tolist(), sums.tolist(), strict=True):
                self.joules[name] = self.joules.get(name, 0.0) + joules


class TwinAccountLabels:
    """A TelemetrySource decorator: each GPU of the twin labelled with its job's account (the
    `account` label; "" idle), as the Slurm-labelled source does for a real cluster, so
    power_budget's account shares apply to the twin too. Accounts are remembered per job (a
    bounded map), so a cycle costs one `np.unique` over the GPUs' jobs."""

    MAX_REMEMBERED = 100_000

    def __init__(
        self, source: TelemetrySource, accounts: Sequence[tuple[str, float]] = DEFAULT_ACCOUNTS
    ) -> None:
        self.source = source
        self.accounts = tuple(accounts)
        self._of: dict[str, str] = {"": ""}

    @property
    def twin(self) -> Twin | None:
        """The twin the wrapped source observes, as on every twin edge (None if it has none)."""
        return getattr(self.source, "twin", None)

    def observe(self, now_s: float) -> Snapshot:
        snapshot = self.source.observe(now_s)
        if snapshot.n_gpus == 0:
            return snapshot
        jobs, inverse = np.unique(snapshot.job, return_inverse=True)
        if len(self._of) > self.MAX_REMEMBERED:
            self._of = {"": ""}
        names = []
        for job in jobs.tolist():
            if job not in self._of:
                self._of[job] = account_of(job, self.accounts)
            names.append(self._of[job])
        labels = np.asarray(names, dtype=np.str_)[inverse.reshape(-1)]
        return replace(snapshot, labels={**snapshot.labels, ACCOUNT_LABEL: labels})

"""The meter: once per cycle, the interval since the last reading is booked into the ledger.

`Meter.book(snapshot, nodes)` is the narrow hook the daemon calls after each cycle (and
`ooda meter backfill` for each step of a recorded range). What it does:
- a reading at or before the ledger's cursor is already booked (a restart that went back, a
  replay): it is only remembered as the start of the next interval;
- the next interval starts from the previous reading if it is the one at the cursor, else from
  the cursor's own reading (a restart: nothing missed is lost), else it is not booked (the first
  reading, or a gap longer than `max_gap_s`: left for backfill);
- jobs booked for the first time are attributed through the JobAccounting protocol (Slurm's
  squeue while they run, sacct once they ended); jobs it did not know are asked about again
  later, a bounded number of times;
- one transaction books the interval, its jobs and moves the cursor.

Errors (a full disk, a locked file, accounting down) never stop the agent: `book` returns them
and the caller reports them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import structlog

from agent.core.errors import OodaError
from agent.core.jobs import JobRecord
from agent.core.protocols import JobAccounting
from agent.core.situation import NodeStates
from agent.core.snapshot import Snapshot
from agent.meter.booking import (
    Booking,
    EnergySource,
    Reading,
    book_interval,
    carry,
    node_partitions,
    reading_of,
)
from agent.meter.ledger import Ledger, Prices
from agent.meter.pricing import Constant, Signal

log = structlog.get_logger("ooda.meter")

ASK_AGAIN_S = 300.0  # a job accounting did not know is asked about again after this long
MAX_ASKS = 12  # ... at most this many times (an hour at the default spacing)
MAX_ASK_BATCH = 500  # jobs per accounting call
PRUNE_EVERY_S = 3600.0
MAX_REMEMBERED = 200_000  # jobs whose attribution the meter keeps in memory


@dataclass
class MeterResult:
    """What one call did: booked or not and why, the interval, and its problems."""

    booked: bool = False
    reason: str = ""
    t0_s: float | None = None
    t1_s: float | None = None
    gpu_j: float = 0.0
    overhead_j: float = 0.0
    rows: int = 0
    unmetered_gpus: int = 0
    errors: list[str] = field(default_factory=list)
    duration_s: float = 0.0


class Meter:
    def __init__(
        self,
        ledger: Ledger,
        *,
        source: EnergySource = EnergySource.AUTO,
        node_overhead_w: float = 0.0,
        max_gap_s: float = 300.0,
        accounting: JobAccounting | None = None,
        price: Signal | None = None,
        carbon: Signal | None = None,
        retention_s: float | None = None,
        origin: str = "live",
        on_booked: Callable[[Booking, Prices, Mapping[str, str]], None] | None = None,
        batch: int = 1,
    ) -> None:
        """`batch` > 1 (a backfill): intervals are booked that many at a time, summed per
        bucket first (`flush`, `close`); a live meter books each at once (crash safety)."""
        self.ledger = ledger
        self.source = source
        self.node_overhead_w = node_overhead_w
        self.max_gap_s = max_gap_s
        self.accounting = accounting
        self.price = price or Constant(None)
        self.carbon = carbon or Constant(None)
        self.retention_s = retention_s
        self.origin = origin
        self.on_booked = on_booked
        self._prev: Reading | None = None
        self._replayed = False  # the last reading was one the ledger had booked already
        self.batch = batch
        self._pending: list[tuple[Booking, Prices]] = []
        self._pending_jobs: list[JobRecord] = []
        self.booked = self.skipped = 0  # a batching meter's intervals, as flushed
        self.booked_j = 0.0
        self._known: dict[str, str] = {}  # job -> account, once attributed
        self._times: dict[str, tuple[float, float]] = {}  # job -> (start, end), NaN unknown
        # Jobs attributed or asked about (those unknown are asked again from the ledger).
        self._seen: set[str] = set()
        self._ended: set[str] = set()  # jobs whose end was asked about
        self._pruned_s = -math.inf
        # The idle level last seen, for intervals with no idle GPU (kept in the ledger).
        self._idle_w = ledger.idle_level_w() if origin == "live" else math.nan

    def close(self) -> None:
        self.flush()
        self.ledger.close()

    def reading(self, snapshot: Snapshot, nodes: NodeStates | None) -> Reading:
        return reading_of(snapshot, node_partitions(nodes, snapshot.n_nodes), self.node_overhead_w)

    def book(self, snapshot: Snapshot, nodes: NodeStates | None = None) -> MeterResult:
        """Book the interval that ends at this snapshot (see the module's docstring)."""
        t0 = time.perf_counter()
        result = MeterResult(t1_s=snapshot.time_s)
        try:
            self._book(self.reading(snapshot, nodes), result)
        except Exception as exc:  # the ledger or accounting failing must not stop the agent
            result.errors.append(f"meter: {type(exc).__name__}: {exc}")
            log.error("meter_failed", error=str(exc), error_type=type(exc).__name__)
        result.duration_s = time.perf_counter() - t0
        return result

    def _start(self, reading: Reading, cursor_s: float | None) -> tuple[Reading | None, str]:
        """The reading the interval to `reading` starts from, or None and why."""
        if cursor_s is None and self.origin == "live":
            return None, "first reading"
        prev = self._prev
        # After a restart that read again what was booked, the ledger's cursor holds the exact
        # reading the next interval starts from (with what it carried over gaps).
        stale = prev is None or prev.time_s != cursor_s or self._replayed
        if self.origin == "live" and stale:
            prev = self.ledger.cursor_reading()
        if prev is None:
            return None, "first reading"
        gap = reading.time_s - prev.time_s
        if gap > self.max_gap_s:
            return None, f"gap of {gap:.0f} s (more than max_gap_s {self.max_gap_s:g} s)"
        return prev, ""

    def _book(self, reading: Reading, result: MeterResult) -> None:
        live = self.origin == "live"
        cursor_s = self.ledger.cursor_time() if live else None
        if cursor_s is not None and reading.time_s <= cursor_s:
            self._prev, self._replayed = reading, True
            result.reason = "already booked"
            return
        prev, why = self._start(reading, cursor_s)
        self._replayed = False
        if prev is None:
            if live:
                self.ledger.move_cursor(reading)
            self._prev = reading
            result.reason = why
            return
        # Jobs are attributed before booking: their start and end times place switches.
        records, errors = self._attribute(reading, reading.time_s)
        result.errors.extend(errors)
        result.errors.extend(self._learn_ends(prev, reading))
        booking = book_interval(prev, reading, self.source, self._job_times, self._idle_w)
        if math.isfinite(booking.idle_w):
            self._idle_w = booking.idle_w
        mid = np.array([(booking.t0_s + booking.t1_s) / 2.0])
        prices = Prices(float(self.price.at(mid)[0]), float(self.carbon.at(mid)[0]))
        # The next interval starts here, or, for a GPU not read now, at its last good reading.
        self._prev = carry(prev, reading, self.max_gap_s)
        if self.batch > 1:  # a backfill: booked when the batch is full (see `flush`)
            self._queue(booking, prices, records, result)
            return
        done = self.ledger.book(
            booking, prices, origin=self.origin, cursor=self._prev if live else None, jobs=records
        )
        result.t0_s = booking.t0_s
        result.booked, result.reason, result.rows = done.booked, done.reason, done.rows
        result.unmetered_gpus = booking.unmetered_gpus
        if done.booked:
            result.gpu_j = float(booking.gpu_j.sum())
            result.overhead_j = float(booking.overhead_j.sum())
            if self.on_booked is not None:
                self.on_booked(booking, prices, self._known)
        self._retain(reading.time_s)

    def _queue(
        self, booking: Booking, prices: Prices, records: list[JobRecord], result: MeterResult
    ) -> None:
        """A backfill's interval, booked with the rest of its batch (a bucket at most)."""
        bucket_s = self.ledger.bucket_s
        if self._pending and (
            len(self._pending) >= self.batch
            or math.ceil(booking.t1_s / bucket_s) != math.ceil(self._pending[0][0].t1_s / bucket_s)
        ):
            self.flush()
        self._pending.append((booking, prices))
        self._pending_jobs.extend(records)
        result.t0_s, result.reason = booking.t0_s, "queued"
        result.gpu_j = float(booking.gpu_j.sum())
        result.overhead_j = float(booking.overhead_j.sum())
        result.unmetered_gpus = booking.unmetered_gpus

    def flush(self) -> None:
        """Book what a backfill has queued (`booked` and `skipped` count the intervals)."""
        if not self._pending:
            return
        done = self.ledger.book_many(self._pending, origin=self.origin, jobs=self._pending_jobs)
        for (booking, _), booked in zip(self._pending, done, strict=True):
            self.booked += booked
            self.skipped += not booked
            self.booked_j += booking.total_j if booked else 0.0
        self._pending, self._pending_jobs = [], []

    def _job_times(self, job: str) -> tuple[float, float]:
        return self._times.get(job, (math.nan, math.nan))

    def _attribute(self, reading: Reading, now_s: float) -> tuple[list[JobRecord], list[str]]:
        """Records of the jobs seen here for the first time, and of earlier ones whose
        accounting may have arrived; problems reading them."""
        if self.accounting is None:
            return [], []
        new = [j for j in reading.job_names.tolist() if j and j not in self._seen]
        if new:
            if len(self._seen) > MAX_REMEMBERED:  # bounded: the ledger remembers for it
                self._seen.clear()
                self._known.clear()
                self._times.clear()
                self._ended.clear()
            self._seen.update(new)
            already = self.ledger.attributed(new)
            self._known.update(already)
            new = [j for j in new if j not in already]
        retry = self.ledger.unattributed(now_s - ASK_AGAIN_S, MAX_ASKS, MAX_ASK_BATCH)
        ask = list(dict.fromkeys([*new, *retry]))[:MAX_ASK_BATCH]
        if not ask:
            return [], []
        try:
            found = dict(self.accounting.job_records(ask))
        except OodaError as exc:
            return [], [f"meter: job accounting unavailable: {exc}"]
        for record in found.values():
            self._times[record.job] = _times_of(record)
        records = [found[j] for j in ask if j in found and found[j].account]
        for record in records:
            self._known[record.job] = record.account
        unknown = [j for j in ask if j not in self._known]
        if unknown:
            self.ledger.note_asked(unknown, now_s)
        return records, []

    def _learn_ends(self, prev: Reading, reading: Reading) -> list[str]:
        """Jobs that left since the last reading: when they ended, where accounting says (Slurm
        keeps ended jobs in squeue for MinJobAge, then sacct has them). Asked once per job."""
        if self.accounting is None:
            return []
        gone = np.setdiff1d(prev.job_names, reading.job_names).tolist()
        left = [j for j in gone if j and j not in self._ended][:MAX_ASK_BATCH]
        if not left:
            return []
        self._ended.update(left)
        try:
            found = self.accounting.job_records(left)
        except OodaError as exc:
            return [f"meter: job accounting unavailable: {exc}"]
        for record in found.values():
            self._times[record.job] = _times_of(record)
        return []

    def _retain(self, now_s: float) -> None:
        if self.retention_s is None or now_s - self._pruned_s < PRUNE_EVERY_S:
            return
        self._pruned_s = now_s
        deleted = self.ledger.prune(now_s - self.retention_s)
        if deleted:
            log.info("meter_pruned", rows=deleted, before_s=now_s - self.retention_s)


def _times_of(record: JobRecord) -> tuple[float, float]:
    """A job's (start, end) for placing switches; an end only once the job has ended (a running
    job's end is Slurm's estimate, its time limit)."""
    start = math.nan if record.start_s is None else float(record.start_s)
    ended = record.state not in ("", "running", "pending", "suspended")
    end = float(record.end_s) if ended and record.end_s is not None else math.nan
    return start, end

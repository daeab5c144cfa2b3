"""The energy ledger: an embedded SQLite database (stdlib sqlite3, WAL mode).

Tables:
- `usage`: per time bucket (an hour by default) and (job, partition), energy in joules (GPU,
  node overhead, and how much of it came from energy counters or integrated power), GPU-seconds,
  cost, CO2, and the energy whose price or carbon was not known. Job "" is a partition's idle GPUs.
- `jobs`: per job, who ran it (user, account, partition, QoS) and where that was read.
- `spans`: the time ranges booked, by origin (live, backfill): an interval that overlaps any of
  them is never booked again, so restarts, replays and backfills book each interval once.
- `cursor`: the live meter's last reading (its time and, compressed, the per-GPU values the next
  interval starts from), so a restart books the interval it missed from where it stopped.

Each booking is one transaction: the usage rows, the span and the cursor move together or not at
all. A SIGKILL loses at most the interval in flight and never books one twice; in WAL mode a
process crash loses no committed transaction (`synchronous = NORMAL`: a power loss may lose the
last few, never corrupt the file).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import sqlite3
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.core.jobs import JobRecord
from agent.meter.booking import Booking, Reading, StrArray

SCHEMA_VERSION = 1
J_PER_KWH = 3.6e6

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS usage (
    bucket_s INTEGER NOT NULL,
    job TEXT NOT NULL,
    partition TEXT NOT NULL,
    gpu_j REAL NOT NULL DEFAULT 0,
    overhead_j REAL NOT NULL DEFAULT 0,
    counter_j REAL NOT NULL DEFAULT 0,
    power_j REAL NOT NULL DEFAULT 0,
    gpu_s REAL NOT NULL DEFAULT 0,
    cost REAL NOT NULL DEFAULT 0,
    unpriced_j REAL NOT NULL DEFAULT 0,
    co2_g REAL NOT NULL DEFAULT 0,
    uncarbon_j REAL NOT NULL DEFAULT 0,
    first_s REAL NOT NULL,
    last_s REAL NOT NULL,
    PRIMARY KEY (bucket_s, job, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS jobs (
    job TEXT PRIMARY KEY,
    user TEXT NOT NULL DEFAULT '',
    account TEXT NOT NULL DEFAULT '',
    partition TEXT NOT NULL DEFAULT '',
    qos TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT '',
    start_s REAL,
    end_s REAL,
    source TEXT NOT NULL DEFAULT '',
    asked_s REAL,
    asks INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS spans (
    t0_s REAL NOT NULL,
    t1_s REAL NOT NULL,
    origin TEXT NOT NULL,
    intervals INTEGER NOT NULL DEFAULT 0,
    metered_gpu_s REAL NOT NULL DEFAULT 0,
    unmetered_gpu_s REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (t0_s, origin)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS spans_end ON spans (t1_s);
CREATE TABLE IF NOT EXISTS cursor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    time_s REAL NOT NULL,
    state BLOB,
    fleet TEXT
);
CREATE TABLE IF NOT EXISTS fleets (digest TEXT PRIMARY KEY, uuids BLOB NOT NULL);
"""

UPSERT_USAGE = """
INSERT INTO usage (bucket_s, job, partition, gpu_j, overhead_j, counter_j, power_j, gpu_s,
                   cost, unpriced_j, co2_g, uncarbon_j, first_s, last_s)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (bucket_s, job, partition) DO UPDATE SET
    gpu_j = gpu_j + excluded.gpu_j,
    overhead_j = overhead_j + excluded.overhead_j,
    counter_j = counter_j + excluded.counter_j,
    power_j = power_j + excluded.power_j,
    gpu_s = gpu_s + excluded.gpu_s,
    cost = cost + excluded.cost,
    unpriced_j = unpriced_j + excluded.unpriced_j,
    co2_g = co2_g + excluded.co2_g,
    uncarbon_j = uncarbon_j + excluded.uncarbon_j,
    first_s = min(first_s, excluded.first_s),
    last_s = max(last_s, excluded.last_s)
"""

# Columns of an export (and of `Ledger.rows`), in order.
EXPORT_COLUMNS = (
    "bucket_s", "job", "user", "account", "partition", "qos", "gpu_j", "overhead_j",
    "counter_j", "power_j", "gpu_s", "cost", "unpriced_j", "co2_g", "uncarbon_j",
    "first_s", "last_s",
)  # fmt: skip


class LedgerError(Exception):
    """The ledger cannot be used (unreadable, another format, another timeline)."""


@dataclass(frozen=True)
class Prices:
    """The price (per kWh) and carbon intensity (g/kWh) of one interval; NaN: not known."""

    price_per_kwh: float = math.nan
    g_per_kwh: float = math.nan


@dataclass(frozen=True)
class BookResult:
    booked: bool
    reason: str = ""  # why not
    rows: int = 0


def fleet_digest(uuid: StrArray) -> str:
    return hashlib.sha1(np.ascontiguousarray(uuid).tobytes()).hexdigest()


def pack_reading(reading: Reading) -> bytes:
    """What the next interval needs of a reading, as npz bytes (about 2 MB at 100,000 GPUs;
    the UUIDs are kept apart, once per fleet: `fleet_digest`). Exactly what was read: the
    interval after a restart is booked as it would have been without one."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        time_s=np.array([reading.time_s]),
        energy_j=reading.energy_j,
        power_w=reading.power_w,
        job_names=np.char.encode(reading.job_names, "utf-8"),
        job_code=reading.job_code.astype(np.int32),
        read_s=reading.times(),
    )
    return buffer.getvalue()


def pack_uuids(uuid: StrArray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.char.encode(uuid, "utf-8"), allow_pickle=False)
    return zlib.compress(buffer.getvalue(), 1)


def unpack_reading(blob: bytes, uuids: bytes) -> Reading:
    uuid = np.char.decode(np.load(io.BytesIO(zlib.decompress(uuids))), "utf-8").astype(np.str_)
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        n = uuid.shape[0]
        if data["energy_j"].shape != (n,):
            raise LedgerError("the cursor's reading does not match its fleet")
        return Reading(
            time_s=float(data["time_s"][0]),
            uuid=uuid,
            energy_j=data["energy_j"].astype(np.float64),
            power_w=data["power_w"].astype(np.float64),
            job_names=np.char.decode(data["job_names"], "utf-8").astype(np.str_),
            job_code=data["job_code"].astype(np.int64),
            # Only the next interval's end says where its GPUs are: these are not used.
            partition_names=np.array([""], dtype=np.str_),
            partition_code=np.zeros(n, dtype=np.int64),
            overhead_w=np.zeros(n),
            read_s=data["read_s"].astype(np.float64),
        )


class Ledger:
    """One ledger file. `timeline` names the clock its times are on ("unix", or a twin's run):
    a ledger of another timeline is refused (LedgerError), its times would mean nothing here."""

    def __init__(
        self, path: Path, *, timeline: str = "unix", bucket_s: int = 3600, read_only: bool = False
    ) -> None:
        self.path = path
        self.bucket_s = int(bucket_s)
        self.timeline = timeline
        try:
            if read_only:
                if not path.exists():
                    raise LedgerError(f"ledger {path}: no such file")
                self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                # One thread at a time (the daemon's cycle lock), not always the one that opened it.
                self.db = sqlite3.connect(
                    path, isolation_level=None, timeout=30.0, check_same_thread=False
                )
                self.db.execute("PRAGMA journal_mode = WAL")
                self.db.execute("PRAGMA synchronous = NORMAL")
                self.db.executescript(SCHEMA)
            self._check_meta(read_only)
            row = self.db.execute("SELECT fleet FROM cursor WHERE id = 1").fetchone()
            self._fleet: str | None = None if row is None else row[0]
            self._fleet_uuid: StrArray | None = None
            self._fleet_digest = ""
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"ledger {path}: not a usable SQLite database ({exc})") from None

    def _check_meta(self, read_only: bool) -> None:
        meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        if not meta:
            if read_only:
                raise LedgerError(f"ledger {self.path}: empty (nothing booked yet)")
            with self.transaction():
                self.db.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [
                        ("format", "ooda-ledger"),
                        ("version", str(SCHEMA_VERSION)),
                        ("timeline", self.timeline),
                    ],
                )
            return
        if meta.get("format") != "ooda-ledger":
            raise LedgerError(f"ledger {self.path}: not an ooda ledger")
        if int(meta.get("version", "0")) > SCHEMA_VERSION:
            raise LedgerError(
                f"ledger {self.path}: version {meta.get('version')} is newer than this agent's "
                f"{SCHEMA_VERSION}"
            )
        if read_only:
            self.timeline = meta.get("timeline", "unix")
        elif meta.get("timeline") != self.timeline:
            raise LedgerError(
                f"ledger {self.path}: its times are on timeline {meta.get('timeline')!r}, this "
                f"run is on {self.timeline!r}"
            )

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- the live cursor ------------------------------------------------------------------------

    def cursor_time(self) -> float | None:
        row = self.db.execute("SELECT time_s FROM cursor WHERE id = 1").fetchone()
        return None if row is None else float(row[0])

    def cursor_reading(self) -> Reading | None:
        row = self.db.execute(
            "SELECT c.state, f.uuids FROM cursor c JOIN fleets f ON f.digest = c.fleet "
            "WHERE c.id = 1"
        ).fetchone()
        if row is None or row[0] is None:
            return None
        return unpack_reading(bytes(row[0]), bytes(row[1]))

    def _set_cursor(self, reading: Reading) -> None:
        if reading.uuid is not self._fleet_uuid:  # a fleet seen before comes as the same array
            self._fleet_uuid, self._fleet_digest = reading.uuid, fleet_digest(reading.uuid)
        digest = self._fleet_digest
        if digest != self._fleet:
            self.db.execute("DELETE FROM fleets")  # only the cursor's fleet is kept
            self.db.execute(
                "INSERT INTO fleets (digest, uuids) VALUES (?, ?)",
                (digest, pack_uuids(reading.uuid)),
            )
            self._fleet = digest
        self.db.execute(
            "INSERT INTO cursor (id, time_s, state, fleet) VALUES (1, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET time_s = excluded.time_s, state = excluded.state, "
            "fleet = excluded.fleet",
            (reading.time_s, pack_reading(reading), digest),
        )

    def move_cursor(self, reading: Reading) -> None:
        """The live meter moved on without booking (the first reading, or after a gap)."""
        with self.transaction():
            self._set_cursor(reading)

    # -- booking --------------------------------------------------------------------------------

    def covered(self, t0_s: float, t1_s: float) -> bool:
        """Does any booked span overlap (t0_s, t1_s]?"""
        row = self.db.execute(
            "SELECT 1 FROM spans WHERE t1_s > ? AND t0_s < ? LIMIT 1", (t0_s, t1_s)
        ).fetchone()
        return row is not None

    def _rows(self, booking: Booking, prices: Prices) -> list[tuple[Any, ...]]:
        bucket = int(math.ceil(booking.t1_s / self.bucket_s) - 1) * self.bucket_s
        total = booking.gpu_j + booking.overhead_j
        priced = math.isfinite(prices.price_per_kwh)
        carbon = math.isfinite(prices.g_per_kwh)
        cost = total / J_PER_KWH * prices.price_per_kwh if priced else np.zeros(len(booking))
        co2 = total / J_PER_KWH * prices.g_per_kwh if carbon else np.zeros(len(booking))
        unpriced = np.zeros(len(booking)) if priced else total
        uncarbon = np.zeros(len(booking)) if carbon else total
        columns = (
            booking.job.tolist(),
            booking.partition.tolist(),
            booking.gpu_j.tolist(),
            booking.overhead_j.tolist(),
            booking.counter_j.tolist(),
            booking.power_j.tolist(),
            booking.gpu_s.tolist(),
            np.asarray(cost).tolist(),
            np.asarray(unpriced).tolist(),
            np.asarray(co2).tolist(),
            np.asarray(uncarbon).tolist(),
        )
        return [(bucket, *row, booking.t0_s, booking.t1_s) for row in zip(*columns, strict=True)]

    def book(
        self,
        booking: Booking,
        prices: Prices,
        *,
        origin: str = "live",
        cursor: Reading | None = None,
        jobs: Iterable[JobRecord] = (),
    ) -> BookResult:
        """Book the interval unless a span already covers any of it; with `cursor`, the live
        cursor moves to it in the same transaction (booked or not)."""
        with self.transaction():
            if self.covered(booking.t0_s, booking.t1_s):
                if cursor is not None:
                    self._set_cursor(cursor)
                return BookResult(False, "already booked")
            rows = self._rows(booking, prices)
            self.db.executemany(UPSERT_USAGE, rows)
            self._extend_span(booking, origin)
            self._upsert_jobs(jobs)
            if cursor is not None:
                self._set_cursor(cursor)
                if math.isfinite(booking.idle_w):  # the live meter's memory, kept with it
                    self.db.execute(
                        "INSERT INTO meta (key, value) VALUES ('idle_w', ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (repr(booking.idle_w),),
                    )
        return BookResult(True, rows=len(rows))

    def idle_level_w(self) -> float:
        """The idle level the live meter saw last (NaN: none yet)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'idle_w'").fetchone()
        return math.nan if row is None else float(row[0])

    def book_many(
        self,
        items: Sequence[tuple[Booking, Prices]],
        *,
        origin: str,
        jobs: Iterable[JobRecord] = (),
    ) -> list[bool]:
        """Book many intervals in one transaction (a backfill), their rows summed per bucket
        and key first; per interval, whether it was booked (an interval a span covers is
        skipped, as in `book`). No cursor moves."""
        booked: list[bool] = []
        summed: dict[tuple[Any, ...], list[Any]] = {}
        with self.transaction():
            for booking, prices in items:
                if self.covered(booking.t0_s, booking.t1_s):
                    booked.append(False)
                    continue
                for row in self._rows(booking, prices):
                    _accumulate(summed, row)
                self._extend_span(booking, origin)
                booked.append(True)
            self.db.executemany(UPSERT_USAGE, [(*k, *v) for k, v in summed.items()])
            self._upsert_jobs(jobs)
        return booked

    def _extend_span(self, booking: Booking, origin: str) -> None:
        dt = booking.t1_s - booking.t0_s
        metered = float(booking.gpu_s.sum())
        unmetered = booking.unmetered_gpus * dt
        done = self.db.execute(
            "UPDATE spans SET t1_s = ?, intervals = intervals + 1, "
            "metered_gpu_s = metered_gpu_s + ?, unmetered_gpu_s = unmetered_gpu_s + ? "
            "WHERE t1_s = ? AND origin = ?",
            (booking.t1_s, metered, unmetered, booking.t0_s, origin),
        ).rowcount
        if not done:
            self.db.execute(
                "INSERT INTO spans (t0_s, t1_s, origin, intervals, metered_gpu_s, "
                "unmetered_gpu_s) VALUES (?, ?, ?, 1, ?, ?)",
                (booking.t0_s, booking.t1_s, origin, metered, unmetered),
            )

    # -- jobs -----------------------------------------------------------------------------------

    def _upsert_jobs(self, records: Iterable[JobRecord]) -> None:
        self.db.executemany(
            "INSERT INTO jobs (job, user, account, partition, qos, state, start_s, end_s, "
            "source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job) DO UPDATE SET "
            "user = excluded.user, account = excluded.account, partition = excluded.partition, "
            "qos = excluded.qos, state = excluded.state, "
            "start_s = coalesce(excluded.start_s, start_s), "
            "end_s = coalesce(excluded.end_s, end_s), source = excluded.source",
            [
                (
                    r.job,
                    r.user,
                    r.account,
                    r.partition,
                    r.qos,
                    r.state,
                    r.start_s,
                    r.end_s,
                    r.source,
                )
                for r in records
            ],
        )

    def save_jobs(self, records: Iterable[JobRecord]) -> None:
        with self.transaction():
            self._upsert_jobs(records)

    def attributed(self, jobs: Sequence[str]) -> dict[str, str]:
        """Of `jobs`, those whose account is known: job -> account."""
        out: dict[str, str] = {}
        for start in range(0, len(jobs), 500):
            chunk = list(jobs[start : start + 500])
            marks = ",".join("?" * len(chunk))
            out.update(
                (str(job), str(account))
                for job, account in self.db.execute(
                    f"SELECT job, account FROM jobs WHERE account != '' AND job IN ({marks})",
                    chunk,
                )
            )
        return out

    def note_asked(self, jobs: Sequence[str], now_s: float) -> None:
        """Accounting was asked about these jobs (and did not know them)."""
        with self.transaction():
            self.db.executemany(
                "INSERT INTO jobs (job, asked_s, asks) VALUES (?, ?, 1) ON CONFLICT (job) DO "
                "UPDATE SET asked_s = excluded.asked_s, asks = asks + 1",
                [(job, now_s) for job in jobs],
            )

    def unattributed(self, asked_before_s: float, max_asks: int, limit: int) -> list[str]:
        """Jobs accounting did not know when asked, not asked since `asked_before_s`, asked
        fewer than `max_asks` times: those whose accounting may have arrived (sacct)."""
        rows = self.db.execute(
            "SELECT job FROM jobs WHERE account = '' AND asked_s IS NOT NULL AND asked_s < ? "
            "AND asks < ? LIMIT ?",
            (asked_before_s, max_asks, limit),
        ).fetchall()
        return [str(r[0]) for r in rows]

    # -- reading --------------------------------------------------------------------------------

    def rows(self, since_s: float = -math.inf, until_s: float = math.inf) -> list[tuple[Any, ...]]:
        """Usage rows with their job's attribution, oldest first, in EXPORT_COLUMNS order."""
        return self.db.execute(
            "SELECT u.bucket_s, u.job, coalesce(j.user, ''), coalesce(j.account, ''), "
            "CASE WHEN coalesce(j.partition, '') != '' THEN j.partition ELSE u.partition END, "
            "coalesce(j.qos, ''), u.gpu_j, u.overhead_j, u.counter_j, u.power_j, u.gpu_s, "
            "u.cost, u.unpriced_j, u.co2_g, u.uncarbon_j, u.first_s, u.last_s "
            "FROM usage u LEFT JOIN jobs j ON j.job = u.job AND u.job != '' "
            "WHERE u.last_s > ? AND u.first_s < ? ORDER BY u.bucket_s, u.job, u.partition",
            (_finite(since_s, -1e300), _finite(until_s, 1e300)),
        ).fetchall()

    def spans(self) -> list[tuple[float, float, str, int, float, float]]:
        return [
            (float(a), float(b), str(c), int(d), float(e), float(f))
            for a, b, c, d, e, f in self.db.execute(
                "SELECT t0_s, t1_s, origin, intervals, metered_gpu_s, unmetered_gpu_s FROM spans "
                "ORDER BY t0_s"
            )
        ]

    def job_totals(self) -> dict[str, float]:
        """Per job: GPU energy booked (J). Job "" is every partition's idle GPUs."""
        return {
            str(job): float(total)
            for job, total in self.db.execute("SELECT job, sum(gpu_j) FROM usage GROUP BY job")
        }

    def account_totals(self) -> dict[str, tuple[float, float, float]]:
        """Per account ("" unknown, and idle under "(idle)"): (energy J, cost, CO2 g)."""
        return {
            str(account): (float(j), float(cost), float(co2))
            for account, j, cost, co2 in self.db.execute(
                "SELECT CASE WHEN u.job = '' THEN '(idle)' ELSE coalesce(j.account, '') END AS a, "
                "sum(u.gpu_j + u.overhead_j), sum(u.cost), sum(u.co2_g) FROM usage u "
                "LEFT JOIN jobs j ON j.job = u.job GROUP BY a"
            )
        }

    def bytes(self) -> int:
        size = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                size += Path(f"{self.path}{suffix}").stat().st_size
        return size

    # -- retention ------------------------------------------------------------------------------

    def prune(self, before_s: float) -> int:
        """Delete usage buckets that ended before `before_s`, spans that ended before it, and
        jobs no usage row names any more; the rows deleted."""
        with self.transaction():
            deleted = self.db.execute(
                "DELETE FROM usage WHERE bucket_s + ? <= ?", (self.bucket_s, before_s)
            ).rowcount
            self.db.execute("DELETE FROM spans WHERE t1_s <= ?", (before_s,))
            self.db.execute(
                "DELETE FROM jobs WHERE NOT EXISTS (SELECT 1 FROM usage u WHERE u.job = jobs.job)"
            )
        return int(deleted)


def _accumulate(summed: dict[tuple[Any, ...], list[Any]], row: tuple[Any, ...]) -> None:
    """Add a usage row (UPSERT_USAGE's order) into `summed`, keyed by (bucket, job, partition):
    the energies, seconds, cost and CO2 summed, the first and last times kept."""
    key, values = row[:3], row[3:]
    held = summed.get(key)
    if held is None:
        summed[key] = list(values)
        return
    for i in range(len(values) - 2):
        held[i] += values[i]
    held[-2] = min(held[-2], values[-2])
    held[-1] = max(held[-1], values[-1])


def _finite(value: float, fallback: float) -> float:
    return value if math.isfinite(value) else fallback

"""The audit trail: one structured JSON event per decision, refusal and action.

Events go through structlog to a JSON-lines sink: a durable file, or any text stream. The file:

- Every record is one `write()` of a whole line to a file opened O_APPEND, then fsynced before
  `write` returns, so a crash loses nothing that was reported done; inside `batch()` records are
  group-committed (one fsync for the batch, before the batch's actions run).
- Rotated by size, keeping `keep` older files (`audit.jsonl.1` newest ... `.keep` oldest): only
  between records (a record never straddles two files; one larger than `max_bytes` gets a file
  of its own), the old file fsynced before it is renamed, the directory fsynced after.
- Several writers (the daemon, `ooda rollback`, `ooda guard reset`) share it safely: each write
  and rotation holds an exclusive lock on `PATH.lock`, and a writer whose file was rotated away
  by another reopens the path first.
- A crash can at worst leave a torn last line (power lost mid-write); a writer that opens such a
  file starts on a fresh line, and the readers here skip (and count) lines that do not parse.

Readers: `audit_files` (oldest first), `read_records`, `tail`, `follow`, `explain`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog

from agent.core.files import fsync_dir
from agent.core.intents import (
    Action,
    Intent,
    ReleasePowerCap,
    SetPowerCap,
    jsonable,
    strict_json,
)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_KEEP = 10


class _DurableFile:
    """Appends whole lines to a file, durably, rotating by size (see the module docstring)."""

    def __init__(self, path: Path, max_bytes: int | None, keep: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o640)
        self._fd = -1
        self._ino = -1
        with self._locked():
            self._open()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        st = os.fstat(fd)
        if st.st_size:
            with open(self.path, "rb") as probe:  # a torn last line: start on a fresh one
                probe.seek(-1, os.SEEK_END)
                if probe.read(1) != b"\n":
                    os.write(fd, b"\n")
        self._fd, self._ino = fd, st.st_ino

    def _current(self) -> None:
        """Reopen when another writer rotated our file away (the path is a new file)."""
        try:
            ino = os.stat(self.path).st_ino
        except FileNotFoundError:
            ino = -1
        if ino != self._ino:
            os.fsync(self._fd)
            os.close(self._fd)
            self._open()

    def _rotate(self) -> None:
        os.fsync(self._fd)  # what the batch wrote so far is durable before the rename
        os.close(self._fd)
        base = str(self.path)
        if self.keep == 0:
            os.unlink(base)
        else:
            # Shift the rotated files up by one, newest last so none is overwritten; the one
            # past `keep` is dropped (only the files that exist are touched).
            prefix = self.path.name + "."
            present = sorted(
                (
                    int(entry.name[len(prefix) :])
                    for entry in os.scandir(self.path.parent)
                    if entry.name.startswith(prefix) and entry.name[len(prefix) :].isdecimal()
                ),
                reverse=True,
            )
            for k in present:
                if k >= self.keep:
                    os.unlink(f"{base}.{k}")
                else:
                    os.replace(f"{base}.{k}", f"{base}.{k + 1}")
            os.replace(base, f"{base}.1")
        fsync_dir(self.path.parent)
        self._open()

    def write(self, data: bytes, sync: bool) -> None:
        with self._locked():
            self._current()
            size = os.fstat(self._fd).st_size
            if self.max_bytes is not None and size and size + len(data) > self.max_bytes:
                self._rotate()
                size = 0
            view = memoryview(data)
            try:
                while view:  # one write() in practice; a short write is finished, never dropped
                    written = os.write(self._fd, view)
                    view = view[written:]
                if sync:
                    os.fsync(self._fd)
            except OSError:
                # A full disk takes part of a record: cut it off again, or the next record would
                # be glued to it and both lost. The caller learns the record was not written.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, size)
                raise

    def sync(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


class _JsonLineSink:
    """A structlog logger that appends rendered lines to a durable file or a text stream
    (fsync per record, or per batch)."""

    def __init__(self, file: _DurableFile | None, stream: IO[str] | None) -> None:
        self._file = file
        self._stream = stream
        self._batch_depth = 0
        self._dirty = False
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            if self._file is not None:
                self._file.write((message + "\n").encode("utf-8"), sync=not self._batch_depth)
                self._dirty = bool(self._batch_depth)
            elif self._stream is not None:
                self._stream.write(message + "\n")
                self._stream.flush()

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.sync()
                self._dirty = False
            elif self._stream is not None:
                self._stream.flush()

    def begin(self) -> None:
        with self._lock:
            self._batch_depth += 1

    def end(self) -> None:
        with self._lock:
            self._batch_depth -= 1
            if self._batch_depth == 0 and self._dirty and self._file is not None:
                self._file.sync()
                self._dirty = False

    log = info = warning = error = msg


def _render(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> str:
    """One audit record as one line of strict JSON."""
    return strict_json(event)


class AuditLog:
    """Audit events as JSON lines. `path` gives a durable, rotated file; `stream` any text
    stream (neither: events are counted and dropped)."""

    def __init__(
        self,
        path: Path | None = None,
        stream: IO[str] | None = None,
        *,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        keep: int = DEFAULT_KEEP,
    ) -> None:
        self.path = path
        self._file = _DurableFile(path, max_bytes, keep) if path is not None else None
        self._sink = _JsonLineSink(self._file, stream if path is None else None)
        # Its own wrapper: the audit trail never depends on the log level.
        self._log = structlog.wrap_logger(
            self._sink,
            wrapper_class=structlog.BoundLogger,
            processors=[
                structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
                _render,
            ],
        )
        self.counts: dict[str, int] = {}

    @contextmanager
    def batch(self) -> Iterator[None]:
        self._sink.begin()
        try:
            yield
        finally:
            self._sink.end()

    def event(self, event: str, **fields: Any) -> None:
        self.counts[event] = self.counts.get(event, 0) + 1
        self._log.info(event, **fields)

    def decision(self, decision_id: str, intent: Intent, dry_run: bool, time_s: float) -> None:
        """One decision, written before anything comes of it: for a cap, enough (GPUs, UUIDs,
        watts) for `ooda rollback` to find it even if its action record is never written."""
        targets = intent.targets.names() if hasattr(intent, "targets") else intent.target_name()
        after: Any = (
            jsonable(getattr(intent, "watts", None))
            if hasattr(intent, "watts")
            else intent.fields()
        )
        extra: dict[str, Any] = {}
        if isinstance(intent, SetPowerCap | ReleasePowerCap):
            extra["uuid"] = intent.targets.uuid.tolist()
        self.event(
            "decision",
            decision_id=decision_id,
            policy=intent.policy,
            kind=str(intent.kind),
            target=targets,
            reason=intent.reason,
            after=after,
            dry_run=dry_run,
            evidence=intent.evidence,
            expires_s=intent.expires_s,
            time_s=time_s,
            **extra,
        )

    def refusal(
        self, decision_id: str, intent: Intent, reason: str, dry_run: bool, time_s: float
    ) -> None:
        targets = intent.targets.names() if hasattr(intent, "targets") else intent.target_name()
        self.event(
            "refusal",
            decision_id=decision_id,
            policy=intent.policy,
            kind=str(intent.kind),
            target=targets,
            reason=reason,
            dry_run=dry_run,
            time_s=time_s,
        )

    def action(self, action: Action) -> None:
        record = action.to_record()
        if isinstance(action.intent, SetPowerCap | ReleasePowerCap):
            # UUIDs too: what a rollback releases must still be found after a reboot renumbers.
            record["uuid"] = action.intent.targets.uuid.tolist()
        self.event("action", **record)

    def flush(self) -> None:
        """Flush (and fsync, for a file) what was written, even inside an unfinished batch: a
        daemon that must leave in the middle of a cycle keeps every record it wrote."""
        self._sink.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# -- reading --------------------------------------------------------------------------------------


def audit_files(path: Path) -> list[Path]:
    """The audit log and its rotated files, oldest first (missing ones left out)."""
    rotated: list[tuple[int, Path]] = []
    for candidate in path.parent.glob(f"{path.name}.*"):
        suffix = candidate.name[len(path.name) + 1 :]
        if suffix.isdecimal():
            rotated.append((int(suffix), candidate))
    out = [p for _, p in sorted(rotated, reverse=True)]
    if path.exists():
        out.append(path)
    return out


@dataclass
class ReadStats:
    files: list[Path] = field(default_factory=list)
    records: int = 0
    skipped: int = 0  # lines that did not parse (a torn line left by a crash)
    # (inode, offset) just past the last whole line read of the newest file: where `follow`
    # goes on from, so nothing appended between a tail and its follow is missed.
    end: tuple[int, int] | None = None


def _parse(line: bytes, stats: ReadStats) -> dict[str, Any] | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except ValueError:
        stats.skipped += 1
        return None
    if not isinstance(record, dict):
        stats.skipped += 1
        return None
    stats.records += 1
    return record


def read_records(path: Path, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
    """Every record, oldest first, across the rotated files; lines that do not parse are
    skipped and counted in `stats`."""
    stats = stats if stats is not None else ReadStats()
    stats.files = audit_files(path)
    for file in stats.files:
        yield from file_records(file, stats, newest=file == path)


def file_records(file: Path, stats: ReadStats, newest: bool = False) -> Iterator[dict[str, Any]]:
    """The records of one of the log's files, oldest first (none if it was rotated away
    meanwhile: its records moved on); `newest`: note in `stats.end` where its last whole line
    ends."""
    try:
        handle = file.open("rb")
    except FileNotFoundError:
        return
    with handle:
        offset = 0
        for line in handle:
            if line.endswith(b"\n"):
                offset += len(line)
            record = _parse(line, stats)
            if record is not None:
                yield record
        if newest:
            stats.end = (os.fstat(handle.fileno()).st_ino, offset)


def tail(path: Path, n: int, stats: ReadStats | None = None) -> list[dict[str, Any]]:
    """The last `n` records, oldest first."""
    return list(deque(read_records(path, stats), maxlen=n)) if n > 0 else []


def follow(
    path: Path,
    emit: Callable[[dict[str, Any]], None],
    *,
    sleep: Callable[[float], None] = time.sleep,
    poll_s: float = 0.5,
    stop: Callable[[], bool] = lambda: False,
    stats: ReadStats | None = None,
    start: tuple[int, int] | None = None,
) -> None:
    """Emit records appended to `path` until `stop()`, across rotations: from now on, or from
    `start` ((inode, offset), e.g. `ReadStats.end` of a tail, even if that file has been
    rotated since). A line still being written (no newline yet) waits for its end."""
    follower = _Follower(path, emit, stats if stats is not None else ReadStats())
    try:
        follower.open_start(start)
        while not stop():
            if not follower.step():
                sleep(poll_s)
    finally:
        follower.close()


class _Follower:
    """The file `follow` reads now, where in it, and the line not yet ended."""

    def __init__(
        self, path: Path, emit: Callable[[dict[str, Any]], None], stats: ReadStats
    ) -> None:
        self.path, self.emit, self.stats = path, emit, stats
        self.handle: IO[bytes] | None = None
        self.ino = -1
        self.partial = b""

    def open_start(self, start: tuple[int, int] | None) -> None:
        if start is None:
            self.open_file(self.path, None)
            return
        # The file we stopped reading in: the current one, or a rotated one by now.
        for file in reversed(audit_files(self.path)):
            try:
                if file.stat().st_ino == start[0]:
                    self.open_file(file, start[1])
                    return
            except FileNotFoundError:
                continue
        self.open_file(self.path, 0)  # rotated out of sight: everything current is new

    def step(self) -> bool:
        """Read what is new, or move on to a new file; False when there was nothing to do."""
        if self.drain():
            return True
        try:
            now_ino = self.path.stat().st_ino
        except FileNotFoundError:
            now_ino = -1
        if self.handle is None:
            return now_ino != -1 and self.open_file(self.path, 0)
        if now_ino not in (self.ino, -1):
            # Rotated. Writers only write to the live path (they check under the lock), so one
            # more read of our file gets the last of it; then the next file, from its start.
            self.drain()
            self.open_file(self._newer_than_current(), 0)
            return True
        return False

    def open_file(self, file: Path, offset: int | None) -> bool:
        try:
            new = file.open("rb")
        except FileNotFoundError:
            return False
        self.close()
        self.handle, self.ino, self.partial = new, os.fstat(new.fileno()).st_ino, b""
        if offset is None:
            new.seek(0, os.SEEK_END)
        else:
            new.seek(offset)
        return True

    def drain(self) -> bool:
        chunk = self.handle.read() if self.handle is not None else b""
        if not chunk:
            return False
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            record = _parse(line, self.stats)
            if record is not None:
                self.emit(record)
        return True

    def _newer_than_current(self) -> Path:
        """The file written after the one we read: the next rotated one, or the live file."""
        files = audit_files(self.path)
        for k, file in enumerate(files[:-1]):
            try:
                if file.stat().st_ino == self.ino:
                    return files[k + 1]
            except FileNotFoundError:
                continue
        return self.path

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


@dataclass
class Explanation:
    action: dict[str, Any]
    decision: dict[str, Any] | None
    refusals: list[dict[str, Any]]
    siblings: list[dict[str, Any]]  # the decision's other actions


class UnknownActionError(LookupError):
    pass


def explain(path: Path, action_id: str) -> Explanation:
    """The action `action_id` with its decision, the decision's refusals and other actions.
    A decision id is accepted too (its first action, or the decision alone)."""
    action: dict[str, Any] | None = None
    by_decision: dict[str, list[dict[str, Any]]] = {}
    decisions: dict[str, dict[str, Any]] = {}
    stats = ReadStats()
    for record in read_records(path, stats):
        kind = record.get("event")
        did = str(record.get("decision_id", ""))
        if kind == "action":
            by_decision.setdefault(did, []).append(record)
            if record.get("action_id") == action_id:
                action = record
        elif kind == "decision":
            decisions.setdefault(did, record)
        elif kind == "refusal":
            by_decision.setdefault(did, []).append(record)
    if action is None and action_id in decisions:
        actions = [r for r in by_decision.get(action_id, []) if r.get("event") == "action"]
        action = actions[0] if actions else {"event": "decision only", **decisions[action_id]}
    if action is None:
        files = len(stats.files)
        raise UnknownActionError(
            f"no action or decision with id {action_id!r} in {path}"
            + (f" and its {files - 1} rotated file(s)" if files > 1 else "")
            + ("" if files else " (no audit log there)")
        )
    did = str(action.get("decision_id", ""))
    related = by_decision.get(did, [])
    return Explanation(
        action=action,
        decision=decisions.get(did),
        refusals=[r for r in related if r.get("event") == "refusal"],
        siblings=[
            r
            for r in related
            if r.get("event") == "action" and r.get("action_id") != action.get("action_id")
        ],
    )

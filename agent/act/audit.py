"""The audit trail: one structured JSON event per decision, refusal and action.

Events go through structlog to a JSON-lines sink. The file sink is durable: every record is
flushed and fsynced before `write` returns, so a crash loses nothing that was reported done; inside
`batch()` records are group-committed (one fsync for the batch, before the batch's actions run).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import structlog

from agent.core.intents import Action, Intent, jsonable


class _JsonLineSink:
    """A structlog logger that appends rendered lines to a file (fsync per record or batch)."""

    def __init__(self, stream: IO[str], durable: bool) -> None:
        self._stream = stream
        self._durable = durable
        self._batch_depth = 0
        self._dirty = False
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            self._stream.write(message + "\n")
            if self._batch_depth:
                self._dirty = True
            else:
                self._sync()

    def _sync(self) -> None:
        self._stream.flush()
        if self._durable:
            os.fsync(self._stream.fileno())
        self._dirty = False

    def flush(self) -> None:
        with self._lock:
            self._sync()

    def begin(self) -> None:
        with self._lock:
            self._batch_depth += 1

    def end(self) -> None:
        with self._lock:
            self._batch_depth -= 1
            if self._batch_depth == 0 and self._dirty:
                self._sync()

    log = info = warning = error = msg


def _default(value: Any) -> Any:
    """numpy values to JSON; anything else unknown as its string."""
    converted = jsonable(value)
    return str(value) if converted is value else converted


class AuditLog:
    """Audit events as JSON lines. `path` gives a durable file; `stream` any text stream."""

    def __init__(self, path: Path | None = None, stream: IO[str] | None = None) -> None:
        self.path = path
        self._own: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._own = path.open("a", encoding="utf-8")
            target: IO[str] = self._own
            durable = True
        else:
            target = stream if stream is not None else open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
            durable = False
        self._sink = _JsonLineSink(target, durable)
        # Its own wrapper: the audit trail never depends on the log level.
        self._log = structlog.wrap_logger(
            self._sink,
            wrapper_class=structlog.BoundLogger,
            processors=[
                structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
                structlog.processors.JSONRenderer(default=_default),
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
        targets = intent.targets.names() if hasattr(intent, "targets") else intent.target_name()
        after: Any = (
            jsonable(getattr(intent, "watts", None))
            if hasattr(intent, "watts")
            else intent.fields()
        )
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
        self.event("action", **action.to_record())

    def flush(self) -> None:
        """Flush (and fsync, for a file) what was written, even inside an unfinished batch: a
        daemon that must leave in the middle of a cycle keeps every record it wrote."""
        self._sink.flush()

    def close(self) -> None:
        if self._own is not None:
            self._own.close()
            self._own = None

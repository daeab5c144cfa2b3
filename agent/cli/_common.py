"""Shared CLI plumbing: logging, output, and turning bad input into a one-line error (exit 2)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from agent.core.errors import BadInputError
from agent.core.intents import strict_json


def setup_logging(level: str | None = None, json_logs: bool | None = None) -> None:
    """structlog to stderr; JSON when not on a terminal (or asked), readable on one."""
    name = (level or os.environ.get("OODA_LOG_LEVEL") or "warning").upper()
    numeric = getattr(logging, name, None)
    if not isinstance(numeric, int):
        raise BadInputError(f"--log-level: unknown level {level!r} (debug, info, warning, error)")
    as_json = (not sys.stderr.isatty()) if json_logs is None else json_logs
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    # A person's log has no Python reprs (`errors=None`, `['a', 'b']`); a program's JSON keeps
    # its lists and nulls.
    readable: list[Any] = [] if as_json else [_readable]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *readable,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # Resolved per logger: tests and daemons may swap sys.stderr after setup.
        logger_factory=lambda *_args: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )


# Log keys a program reads and a person need not (a Python class name: `error` says what failed).
FOR_PROGRAMS = frozenset({"error_type"})


def _readable(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Values as a person reads them: a list as `a,b`, a mapping as `k:v,k:v`, None left out."""
    return {
        key: _said(value)
        for key, value in event.items()
        if value is not None and key not in FOR_PROGRAMS
    }


def _said(value: Any) -> Any:
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items()) or "none"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "none"
    return value


def emit_json(obj: Any) -> None:
    """One JSON object on the last line of stdout: strict JSON, NaN and infinities as null."""
    sys.stdout.write(strict_json(obj) + "\n")


WIDTH = 100  # what a person's terminal shows of a line: tables and text fit it


def show_progress(json_out: bool, forced: bool | None = None) -> bool:
    """A progress bar on stderr only for a person at a terminal: never with --json, never when
    stdout or stderr is not a terminal (a pipe, a log, a program), unless `forced`."""
    if forced is not None:
        return forced
    return not json_out and sys.stdout.isatty() and sys.stderr.isatty()


class Bar:
    """What a long command tells of its progress: `bar(n)` advances it by n units (batched:
    a redraw is not free, and a day is thousands of steps), `bar.stage(label)` names the part
    running now. A Bar that is not shown does nothing."""

    def __init__(self, progress: Any = None, task: Any = None, batch: float = 0.0) -> None:
        self._progress = progress
        self._task = task
        self._pending = 0.0
        self._batch = batch  # units gathered before a redraw

    def __call__(self, n: float) -> None:
        if self._progress is None:
            return
        self._pending += n
        if self._pending >= self._batch:
            self._progress.advance(self._task, self._pending)
            self._pending = 0.0

    def share(self, whole: float = 1.0) -> Callable[[float], None]:
        """A callback for a part worth `whole` units that is told the share of it done so far
        (0 to 1): it advances the bar by what is new."""
        done = [0.0]

        def told(share: float) -> None:
            self(share * whole - done[0])
            done[0] = share * whole

        return told

    def stage(self, label: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=label)

    def flush(self) -> None:
        if self._progress is not None and self._pending:
            self._progress.advance(self._task, self._pending)
            self._pending = 0.0


@contextmanager
def progress_bar(show: bool, total: float, label: str) -> Iterator[Bar]:
    """A rich progress bar on stderr, gone when done (`show` False: a Bar that does nothing)."""
    if not show:
        yield Bar()
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        # At most about 200 redraws.
        bar = Bar(progress, progress.add_task(label, total=total), batch=total / 200.0)
        yield bar
        bar.flush()


def wrapped(text: str, indent: str = "") -> str:
    """`text` wrapped at WIDTH columns (or the terminal's, if narrower), later lines indented."""
    import shutil
    import textwrap

    width = min(WIDTH, shutil.get_terminal_size((WIDTH, 24)).columns)
    return textwrap.fill(
        text, width=max(width, 40), subsequent_indent=indent, break_on_hyphens=False
    )


def plain(mapping: Any) -> str:
    """A mapping as a person reads it (never a Python repr): `kind` first, then `key value`
    pairs; a small nested mapping inline, a large one counted (`--json` has it whole)."""
    items = dict(mapping)
    parts = [str(items.pop("kind"))] if "kind" in items else []
    for key, value in items.items():
        if value is None or value in ({}, []):
            continue
        if isinstance(value, dict) and len(value) > 4:
            parts.append(f"{key}: {len(value)} set (--json lists them)")
        elif isinstance(value, dict):
            parts.append(f"{key} " + ", ".join(f"{k} {v}" for k, v in value.items()))
        elif isinstance(value, list | tuple):
            parts.append(f"{key} " + ", ".join(str(v) for v in value))
        else:
            parts.append(f"{key} {value}")
    return "; ".join(parts) or "none"


def duration_s(text: str, option: str) -> float:
    from agent.sim.faults import parse_seconds

    try:
        value = parse_seconds(text)
    except ValueError as exc:
        raise BadInputError(f"{option}: {exc}") from None
    if value <= 0:
        raise BadInputError(f"{option}: must be positive (got {text!r})")
    return value

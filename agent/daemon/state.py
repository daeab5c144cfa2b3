"""State that survives restarts, written atomically.

One JSON file per cluster (`<state_dir>/<cluster>.state.json`), schema-versioned: the guard's
memory (ownership of caps, cooldowns, and whatever else it keeps), every policy's memory, the
orienter's learned state, the cap actuator's leases and the daemon's recommendations. Written to a
temporary file, fsynced, renamed over the old one, and the directory fsynced: a crash leaves the
old file or the new one, never half of one.

A file that cannot be read (corrupt, truncated, another format, a newer version, nested deeper
than MAX_DEPTH levels: a real one is 8 deep, and a deeper one would exhaust the stack of whatever
walks it next) is reported, moved aside for a person to look at (`*.unreadable-<unix time>`),
and the daemon starts fresh: refusing to start would leave the cluster with no agent at all
(caps fall back when their leases run out, nothing keeps the budget), while a fresh start is the
documented cold start, with the guard's bounds in force. A part that cannot be loaded (e.g. a
policy whose memory changed shape) starts fresh alone; the others are kept.

When the daemon hosts the twin, the twin is the cluster and survives a restart too
(`<cluster>.twin.pickle`): a real cluster keeps its caps and drains while the agent restarts.
That file is a pickle, trusted because only the daemon writes its state directory (mode 0700).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.core.files import write_atomically

FORMAT = "ooda-daemon-state"
VERSION = 1
MAX_DEPTH = 64


def too_deep(document: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether a parsed JSON document nests deeper than `limit` (iteratively: no recursion)."""
    stack: list[tuple[int, Any]] = [(0, document)]
    while stack:
        depth, value = stack.pop()
        if depth > limit:
            return True
        if isinstance(value, dict):
            stack.extend((depth + 1, v) for v in value.values())
        elif isinstance(value, list):
            stack.extend((depth + 1, v) for v in value)
    return False


def safe_name(cluster: str) -> str:
    """A cluster name as a file name (anything but letters, digits, '.', '_', '-' becomes '_')."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", cluster).strip(".")
    return name or "default"


def ensure_dir(path: Path) -> None:
    """The state directory, private to the agent's user."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


@dataclass
class Loaded:
    """What `StateFile.load` found: the parts (empty on a first start), or why it could not."""

    parts: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # the file exists but could not be used
    moved_to: Path | None = None
    found: bool = False


class StateFile:
    def __init__(self, state_dir: Path, cluster: str) -> None:
        self.cluster = cluster
        self.path = state_dir / f"{safe_name(cluster)}.state.json"

    def save(self, parts: Mapping[str, Any], meta: Mapping[str, Any]) -> int:
        """Write every part atomically; returns the bytes written."""
        document = {
            "format": FORMAT,
            "version": VERSION,
            "cluster": self.cluster,
            "saved_at_unix": time.time(),
            **meta,
            "parts": dict(parts),
        }
        # Python's JSON dialect: NaN and +-Infinity (unknown values, "never changed") round-trip.
        data = json.dumps(document, separators=(",", ":"), allow_nan=True).encode()
        write_atomically(self.path, data)
        return len(data)

    def load(self) -> Loaded:
        # A writer killed between its write and its rename leaves a temporary file: never read,
        # so only litter.
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return Loaded()
        except OSError as exc:
            return self._unusable(f"cannot read: {exc.strerror or exc}")
        try:
            document = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return self._unusable(f"not valid JSON ({exc})")
        except RecursionError:
            return self._unusable(f"nested deeper than JSON can be read (at most {MAX_DEPTH})")
        if too_deep(document):
            return self._unusable(f"nested deeper than {MAX_DEPTH} levels")
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            return self._unusable(f"not an ooda state file (no format {FORMAT!r})")
        version = document.get("version")
        if not isinstance(version, int) or version > VERSION:
            return self._unusable(
                f"state version {version!r} is not one this agent reads (it reads <= {VERSION})"
            )
        if document.get("cluster") != self.cluster:
            return self._unusable(
                f"written for cluster {document.get('cluster')!r}, not {self.cluster!r}"
            )
        parts = document.get("parts")
        if not isinstance(parts, dict):
            return self._unusable("'parts' is missing or not an object")
        meta = {k: v for k, v in document.items() if k != "parts"}
        return Loaded(parts=parts, meta=meta, found=True)

    def _unusable(self, why: str) -> Loaded:
        problem = f"state file {self.path}: {why}"
        moved = self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}")
        try:
            os.replace(self.path, moved)
        except OSError:
            return Loaded(problem=problem, found=True)
        return Loaded(problem=problem, moved_to=moved, found=True)


class TwinStore:
    """The hosted twin (and its scheduler's drain reasons) across restarts, for the same twin
    configuration only (`key`)."""

    def __init__(self, state_dir: Path, cluster: str) -> None:
        self.path = state_dir / f"{safe_name(cluster)}.twin.pickle"

    def save(self, key: str, timeline: str, twin: Any, extra: Mapping[str, Any]) -> None:
        blob = pickle.dumps(
            {"version": VERSION, "key": key, "timeline": timeline, "twin": twin, **extra},
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        write_atomically(self.path, blob)

    def load(self, key: str) -> tuple[dict[str, Any] | None, str | None]:
        """(the saved dict, None) or (None, why not); (None, None) when there is none."""
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            return None, f"{self.path}: cannot read: {exc.strerror or exc}"
        try:
            saved = pickle.loads(blob)  # trusted: written only by this daemon, dir 0700
        except Exception as exc:
            return None, f"{self.path}: unreadable ({type(exc).__name__}: {exc})"
        if not isinstance(saved, dict) or saved.get("version") != VERSION:
            return None, f"{self.path}: not a twin state this agent reads"
        if saved.get("key") != key:
            return None, f"{self.path}: the [twin] configuration changed: a new twin starts"
        return saved, None

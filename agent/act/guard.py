"""The guard: every intent passes it before any actuator sees it. It is two parts:

- the gate (agent.act.gate): every refusal rule (bounds, dead band, cooldowns, rate limits, the
  drain circuit breaker, ownership, scope and opt-out, stale telemetry);
- the ledger (agent.act.ledger): what the agent owns and did (caps it set and must renew,
  release or settle, node actions, the breaker's state), saved with the daemon's state.

Here: their settings (`[guard]`), and the reset request a person leaves for the breaker.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from agent.core.settings import STRICT_SETTINGS

RESET_FILE = "guard-reset.request"
GUARD_POLICY = "guard"  # the policy name on the gate's own intents (its breaker alarm)


class GuardSettings(BaseModel):
    model_config = STRICT_SETTINGS

    cap_cooldown_s: float = Field(
        60.0, ge=0.0, description="Least time between two raises of one GPU's cap (s)."
    )
    cap_dead_band_w: float = Field(
        10.0, ge=0.0, description="Cap changes smaller than this are skipped (W)."
    )
    node_cooldown_s: float = Field(
        300.0, ge=0.0, description="Least time between two actions on one node (s)."
    )
    drain_rate_max: int = Field(
        3,
        ge=0,
        le=10_000,
        description="Rate limit: most drains within drain_rate_window_s (count); the drains "
        "beyond are refused until the window has room.",
    )
    drain_rate_window_s: float = Field(
        600.0, gt=0.0, description="The window of the drain rate limit (s)."
    )
    breaker_max_nodes: int = Field(
        5,
        ge=0,
        le=100_000,
        description="Circuit breaker: most distinct nodes drained by us within breaker_window_s "
        "(nodes); the drain beyond trips the breaker.",
    )
    breaker_max_pct: float = Field(
        10.0,
        ge=0.0,
        le=100.0,
        description="Circuit breaker: most nodes drained by us within breaker_window_s as a "
        "share of the cluster's nodes (%, rounded down, never below breaker_min_nodes); the "
        "lower of this and breaker_max_nodes holds.",
    )
    breaker_min_nodes: int = Field(
        1,
        ge=0,
        le=100_000,
        description="The percentage limit never goes below this many nodes (nodes), so one "
        "failing node of a small cluster can be drained.",
    )
    breaker_window_s: float = Field(
        3600.0, gt=0.0, description="The window the circuit breaker counts drains in (s)."
    )
    breaker_notify: bool = Field(
        True, description="While the breaker is open, send a critical Notify every cycle."
    )
    steer_rate_max: int = Field(
        20,
        ge=0,
        le=100_000,
        description="Rate limit: most node weight and feature changes within "
        "steer_rate_window_s (count).",
    )
    steer_rate_window_s: float = Field(
        600.0, gt=0.0, description="The window of the weight/feature rate limit (s)."
    )


def request_reset(state_dir: Path, by: str | None = None, note: str = "") -> dict[str, Any]:
    """Leave a reset request for the guard (`ooda guard reset`): written whole (a temporary
    file, fsynced, renamed into place, the directory fsynced), so a guard never reads half of
    one. The running daemon consumes it at its next cycle; with no daemon running it waits for
    the next start (after the persisted state is loaded). Returns the request."""
    state_dir.mkdir(parents=True, exist_ok=True)
    request = {
        "id": secrets.token_hex(8),
        "by": by or _who(),
        "note": note,
        "requested_at": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    fd, tmp = tempfile.mkstemp(prefix=".guard-reset-", dir=state_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(request, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, state_dir / RESET_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return request


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"

"""Connection limits for the node daemon: a deadline for each request's head, and a bound on
connections per peer and in all, so that clients that open connections and never finish a
request (half-open, "slowloris") cannot hold the daemon away from the agent.

- A request's head (request line and headers) must be complete within `header_timeout_s` of the
  connection opening, or of the request's first byte on a kept-alive connection; otherwise the
  connection is closed. A connection idle between requests is closed after `idle_timeout_s`.
- A connection is *held* once it has sent something: at most `max_connections` held in all
  and `max_per_peer` per peer (the client's IP address over TCP, its user id over the Unix
  socket). A connection whose first bytes would go over a bound sheds the oldest held
  connection that is waiting (of that peer, for the peer's bound): one part-way through a
  request head, else one idle between requests; with nothing to shed it gets a 503 and is
  closed at once.
- Connections that have sent nothing yet are bounded apart, `max_connections` of them: a new
  one over that sheds the oldest silent one. A client's bytes follow its connection at once
  (and count as soon as the kernel has them, FIONREAD, before the event loop reads them), and
  the daemon accepts at most ACCEPT_BATCH connections (agent/node/server.py) before it reads
  from those it has: the oldest silent connection is never one whose request is on its way.
  At most 2 x `max_connections` connections, and as many file descriptors.
- A connection whose request is being answered is never shed.

A legitimate client sends its whole head at once, so it is part-way for no time at all; a
half-open connection is part-way until its deadline, and is the first to go when room is needed,
even when it comes from the same peer as the agent.

The limits act on uvicorn's h11 protocol (`GuardedH11Protocol`), one instance per connection;
all run on the daemon's event loop, so the bookkeeping needs no lock.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
import termios
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import structlog
from uvicorn.protocols.http.h11_impl import H11Protocol

log = structlog.get_logger("ooda.node.connections")

# How much of a new connection's waiting bytes is looked at for a whole request head (the
# agent's heads are a few hundred bytes; uvicorn's own bound on a head is 16 KiB).
MAX_PEEK_BYTES = 4096
# File descriptors the daemon needs besides its connections (NVML's device files, the listening
# socket, the token and lease files, logs, the worker threads' event fds).
FD_RESERVE = 128

_REFUSAL_BODY = b'{"error": "too many connections: try again later"}'
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: application/json\r\n"
    b"connection: close\r\n"
    b"content-length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n\r\n" + _REFUSAL_BODY
)


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections the daemon holds, and how long a request head may take."""

    max_connections: int = 512
    max_per_peer: int = 64
    header_timeout_s: float = 5.0
    idle_timeout_s: float = 30.0

    def problem(self) -> str | None:
        """What is wrong with these limits (naming the option), or None."""
        if self.max_connections < 1:
            return f"--max-connections: must be at least 1 (got {self.max_connections})"
        if not 1 <= self.max_per_peer <= self.max_connections:
            return (
                f"--max-connections-per-peer: must be from 1 to --max-connections "
                f"({self.max_connections}) (got {self.max_per_peer})"
            )
        for name, value in (
            ("--header-timeout-s", self.header_timeout_s),
            ("--idle-timeout-s", self.idle_timeout_s),
        ):
            if not 0 < value <= 3600:
                return f"{name}: must be in (0, 3600] seconds (got {value})"
        return None


class ShedEvents:
    """Hooks for the daemon's metrics (no-ops by default)."""

    def connection_shed(self, reason: str) -> None:
        """reason: evicted, refused, header_timeout."""


def peer_of(transport: asyncio.BaseTransport) -> str:
    """Who is at the other end: `ip:ADDRESS` over TCP, `uid:N` over a Unix socket."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return "uid:?"
        _pid, uid, _gid = struct.unpack("3i", creds)
        return f"uid:{uid}"
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple | list) and peer:
        return f"ip:{peer[0]}"
    return "unknown"


class _Wait(Enum):
    SILENT = "silent"  # nothing received yet
    PARTIAL = "partial"  # part of a request head
    IDLE = "idle"  # between requests
    BUSY = "busy"  # a request being answered


class ConnectionGuard:
    """The daemon's connections, by peer and by what each is waiting for."""

    def __init__(self, limits: ConnectionLimits, events: ShedEvents | None = None) -> None:
        self.limits = limits
        self.events = events or ShedEvents()
        self._peer: dict[GuardedH11Protocol, str] = {}
        self._held: dict[str, int] = {}  # per peer: connections that have sent something
        # Connections by what they wait for, each oldest first (the order they are shed in).
        self._queues: dict[_Wait, OrderedDict[GuardedH11Protocol, None]] = {
            wait: OrderedDict() for wait in _Wait
        }

    @property
    def open(self) -> int:
        return len(self._peer)

    def _state(self, conn: GuardedH11Protocol) -> _Wait | None:
        for wait, queue in self._queues.items():
            if conn in queue:
                return wait
        return None

    def _move(self, conn: GuardedH11Protocol, wait: _Wait) -> None:
        for queue in self._queues.values():
            queue.pop(conn, None)
        self._queues[wait][conn] = None

    def admit(self, conn: GuardedH11Protocol, peer: str) -> None:
        """Count a new connection as silent; at the silent bound the oldest silent one goes
        (the newest are the clients whose first bytes are on their way)."""
        silent = self._queues[_Wait.SILENT]
        if len(silent) >= self.limits.max_connections:
            self._evict(next(iter(silent)))
        self._peer[conn] = peer
        silent[conn] = None

    def _victim(self, peer: str | None) -> GuardedH11Protocol | None:
        """The oldest connection part-way through a head, else the oldest idle one."""
        for wait in (_Wait.PARTIAL, _Wait.IDLE):
            for conn in self._queues[wait]:
                if peer is None or self._peer[conn] == peer:
                    return conn
        return None

    def _evict(self, victim: GuardedH11Protocol) -> None:
        self.forget(victim)
        victim.close_now()
        self.events.connection_shed("evicted")

    def _room(self, peer: str | None) -> bool:
        victim = self._victim(peer)
        if victim is None:
            return False
        self._evict(victim)
        return True

    def speaks(self, conn: GuardedH11Protocol, head_complete: bool = False) -> bool:
        """A connection's first bytes are in (`head_complete`: a whole request head): it is
        held from now, within the bounds on held connections (in all, and per peer). False:
        over a bound with nothing to shed (the caller refuses it)."""
        if self._state(conn) is not _Wait.SILENT:
            return True
        held = len(self._peer) - len(self._queues[_Wait.SILENT])
        if held >= self.limits.max_connections and not self._room(None):
            return False
        peer = self._peer[conn]
        if self._held.get(peer, 0) >= self.limits.max_per_peer and not self._room(peer):
            return False
        self._held[peer] = self._held.get(peer, 0) + 1
        self._move(conn, _Wait.BUSY if head_complete else _Wait.PARTIAL)
        return True

    def progress(self, conn: GuardedH11Protocol, head_complete: bool) -> None:
        """Bytes of a request arrived (`head_complete`: its whole head)."""
        state = self._state(conn)
        if state is None:
            return
        if head_complete:
            self._move(conn, _Wait.BUSY)
        elif state is not _Wait.PARTIAL:
            self._move(conn, _Wait.PARTIAL)

    def idle(self, conn: GuardedH11Protocol) -> None:
        """A response went out; the connection waits for the next request."""
        if conn in self._peer:
            self._move(conn, _Wait.IDLE)

    def busy(self, conn: GuardedH11Protocol) -> None:
        if conn in self._peer:
            self._move(conn, _Wait.BUSY)

    def forget(self, conn: GuardedH11Protocol) -> None:
        peer = self._peer.pop(conn, None)
        if peer is None:
            return
        state = self._state(conn)
        for queue in self._queues.values():
            queue.pop(conn, None)
        if state is not _Wait.SILENT:
            left = self._held[peer] - 1
            if left:
                self._held[peer] = left
            else:
                del self._held[peer]


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol under a ConnectionGuard (set on a subclass: `guarded_protocol`)."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._admitted = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.guard.admit(self, peer_of(transport))
        self._admitted = True
        self._arm()
        # A client that has sent its bytes already (as any client does with its connection)
        # is not silent, even before the event loop reads them; and one whose whole request
        # head is waiting is as good as answered (never shed while its bytes are read).
        waiting = _waiting(transport)
        if waiting is not _Waiting.NOTHING and not self.guard.speaks(
            self, head_complete=waiting is _Waiting.HEAD
        ):
            self._refuse()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(
            self.guard.limits.header_timeout_s, self._head_too_slow
        )

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_too_slow(self) -> None:
        self._deadline = None
        if not self._busy() and not self.transport.is_closing():
            self.guard.events.connection_shed("header_timeout")
            self.guard.forget(self)
            self.close_now()

    def _busy(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def close_now(self) -> None:
        self._disarm()
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._admitted and not self.guard.speaks(self):
            self._refuse()
            return
        if self._admitted and self._deadline is None and not self._busy():
            self._arm()  # a kept-alive connection's next request: its head has the same deadline
        super().data_received(data)
        if self._admitted and not self.transport.is_closing():
            busy = self._busy()
            self.guard.progress(self, head_complete=busy)
            if busy:
                self._disarm()

    def _refuse(self) -> None:
        self.guard.events.connection_shed("refused")
        self._admitted = False
        self.guard.forget(self)
        self._disarm()
        self.transport.write(_REFUSAL)
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._admitted:
            return
        if self._busy():  # a pipelined request already started
            self.guard.busy(self)
        else:
            self.guard.idle(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.guard.forget(self)
        super().connection_lost(exc)


class _Waiting(Enum):
    NOTHING = "nothing"
    BYTES = "bytes"  # some bytes (part of a head, or TLS records)
    HEAD = "head"  # a whole request head (plain HTTP)


def _waiting(transport: asyncio.BaseTransport) -> _Waiting:
    """What the connection's socket holds unread: FIONREAD (no read, no copy), then for plain
    HTTP a peek at the bytes for the blank line that ends a request head."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return _Waiting.NOTHING
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        if struct.unpack("i", raw)[0] <= 0:
            return _Waiting.NOTHING
        if transport.get_extra_info("sslcontext") is not None:
            return _Waiting.BYTES
        with socket.socket(fileno=os.dup(sock.fileno())) as peek:
            head = peek.recv(MAX_PEEK_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return _Waiting.NOTHING
    return _Waiting.HEAD if b"\r\n\r\n" in head else _Waiting.BYTES


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn instantiates per connection, bound to `guard`."""
    return type("NodeH11Protocol", (GuardedH11Protocol,), {"guard": guard})

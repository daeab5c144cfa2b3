"""The coordination store: keys with leases, put-if-absent, prefix reads and watches.

`EtcdStore` talks to etcd (Debian's etcd-server, 3.4) through etcd3gw, OpenStack's maintained
client for etcd's v3 JSON gateway (HTTP, no protobuf or gRPC in this process): etcd3 0.12 on
PyPI (2020) no longer imports with current protobuf. etcd3gw's own watch helper runs its stream
on a thread pool whose errors are dropped (a watch broken by an etcd restart would end
silently), so watches run on a loop of ours over the same HTTP session, reconnecting with a
backoff and calling back on every event and every reconnect (the caller re-reads).

`MemoryStore` is the same contract in memory on an injected clock (unit tests, the bench), with
an outage switch.

Every call either succeeds or raises StoreUnavailableError (etcd cannot be reached, timed out, or
answered with an error) or LeaseLostError (the lease expired or was revoked).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import math
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import etcd3gw
import requests
from etcd3gw import exceptions as etcd_errors
from etcd3gw.client import Etcd3Client

from agent.core.clock import Clock

WATCH_BACKOFF_S = (0.2, 0.5, 1.0, 2.0)  # between reconnects of a broken watch
MAX_VALUE_BYTES = 1 << 20  # a value read back larger than this is refused


class StoreError(Exception):
    """The store could not do what was asked."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached (or answered with an error): the caller degrades."""


class LeaseLostError(StoreError):
    """A lease expired or was revoked: whatever it held is gone."""


class Store(Protocol):
    def lease(self, ttl_s: int) -> int: ...

    def refresh(self, lease_id: int) -> float: ...

    def revoke(self, lease_id: int) -> None: ...

    def put(self, key: str, value: str, lease_id: int | None = None) -> None: ...

    def create(self, key: str, value: str, lease_id: int | None = None) -> bool: ...

    def get(self, key: str) -> str | None: ...

    def get_prefix(self, prefix: str) -> dict[str, str]: ...

    def delete(self, key: str) -> None: ...

    def watch_prefix(self, prefix: str, on_change: Callable[[], None]) -> Callable[[], None]: ...

    def close(self) -> None: ...


def _prefix_end(prefix: str) -> str:
    """The end of the key range holding every key under `prefix` (its last byte + 1)."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode() if raw else "\0"


@dataclass(frozen=True)
class EtcdEndpoint:
    host: str
    port: int
    protocol: str

    @staticmethod
    def parse(url: str) -> EtcdEndpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
            raise ValueError(f"not an etcd client URL such as http://127.0.0.1:2379: {url!r}")
        return EtcdEndpoint(parts.hostname, parts.port, parts.scheme)


class EtcdStore:
    """etcd through etcd3gw, trying each endpoint in turn until one answers."""

    def __init__(
        self,
        endpoints: list[str],
        timeout_s: float = 2.0,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("etcd: at least one endpoint")
        self._clients = []
        for url in endpoints:
            ep = EtcdEndpoint.parse(url)
            self._clients.append(
                etcd3gw.client(
                    host=ep.host,
                    port=ep.port,
                    protocol=ep.protocol,
                    ca_cert=ca_file,
                    cert_cert=cert_file,
                    cert_key=key_file,
                    timeout=timeout_s,
                    api_path="/v3/",  # etcd >= 3.4 (Debian's is 3.4): no discovery round trip
                )
            )
        self.timeout_s = timeout_s
        self._current = 0
        self._lock = threading.Lock()
        self._watches: list[_Watch] = []

    def _call(self, what: Callable[[Etcd3Client], Any]) -> Any:
        """Run `what` on the endpoint that answered last, then on the others in turn."""
        errors = []
        n = len(self._clients)
        with self._lock:
            start = self._current
        for i in range(n):
            index = (start + i) % n
            client = self._clients[index]
            try:
                result = what(client)
            except (etcd_errors.Etcd3Exception, requests.RequestException, ValueError) as exc:
                errors.append(f"{client.base_url}: {_reason(exc)}")
                continue
            with self._lock:
                self._current = index
            return result
        raise StoreUnavailableError("etcd unreachable (" + "; ".join(errors) + ")")

    def lease(self, ttl_s: int) -> int:
        lease = self._call(lambda c: c.lease(ttl=int(ttl_s)))
        return int(lease.id)

    def refresh(self, lease_id: int) -> float:
        def keepalive(c: Etcd3Client) -> int:
            return etcd3gw.Lease(lease_id, c).refresh()

        ttl = self._call(keepalive)
        if ttl <= 0:
            raise LeaseLostError(f"etcd lease {lease_id:x} expired")
        return float(ttl)

    def revoke(self, lease_id: int) -> None:
        with contextlib.suppress(StoreError):
            self._call(lambda c: etcd3gw.Lease(lease_id, c).revoke())

    def put(self, key: str, value: str, lease_id: int | None = None) -> None:
        payload: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease_id is not None:
            payload["lease"] = lease_id
        try:
            self._call(lambda c: c.post(c.get_url("/kv/put"), json=payload))
        except StoreUnavailableError as exc:
            if "requested lease not found" in str(exc):
                raise LeaseLostError(f"etcd lease {lease_id:x} not found") from None
            raise

    def create(self, key: str, value: str, lease_id: int | None = None) -> bool:
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease_id is not None:
            put["lease"] = lease_id
        txn = {
            "compare": [
                {"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": 0}
            ],
            "success": [{"request_put": put}],
            "failure": [],
        }
        try:
            result = self._call(lambda c: c.transaction(txn))
        except StoreUnavailableError as exc:
            if "requested lease not found" in str(exc):
                raise LeaseLostError(f"etcd lease {lease_id:x} not found") from None
            raise
        return bool(result.get("succeeded", False))

    def get(self, key: str) -> str | None:
        values = self._call(lambda c: c.get(key))
        return _text(values[0]) if values else None

    def get_prefix(self, prefix: str) -> dict[str, str]:
        rows = self._call(lambda c: c.get(prefix, metadata=True, range_end=_prefix_end(prefix)))
        return {_text(meta["key"]): _text(value) for value, meta in rows}

    def delete(self, key: str) -> None:
        self._call(lambda c: c.delete(key))

    def watch_prefix(self, prefix: str, on_change: Callable[[], None]) -> Callable[[], None]:
        watch = _Watch(self, prefix, on_change)
        self._watches.append(watch)
        watch.start()
        return watch.stop

    def close(self) -> None:
        for watch in self._watches:
            watch.stop()
        self._watches.clear()
        for client in self._clients:
            client.session.close()

    def clients(self) -> list[Etcd3Client]:
        with self._lock:
            first = self._current
        return self._clients[first:] + self._clients[:first]


class _Watch:
    """A watch on a prefix over the gateway's streaming /v3/watch: `on_change()` after each
    event, and after each (re)connect (what changed while it was down is read back by the
    caller). Runs on its own daemon thread until stopped."""

    def __init__(self, store: EtcdStore, prefix: str, on_change: Callable[[], None]) -> None:
        self.store = store
        self.prefix = prefix
        self.on_change = on_change
        self._stop = threading.Event()
        self._response: requests.Response | None = None
        self._thread = threading.Thread(target=self._run, name=f"etcd-watch {prefix}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        response = self._response
        if response is not None:
            _interrupt(response)

    def _run(self) -> None:
        backoff = itertools.chain(WATCH_BACKOFF_S, itertools.repeat(WATCH_BACKOFF_S[-1]))
        while not self._stop.is_set():
            for client in self.store.clients():
                if self._stop.is_set():
                    return
                if self._stream(client):
                    backoff = itertools.chain(
                        WATCH_BACKOFF_S, itertools.repeat(WATCH_BACKOFF_S[-1])
                    )
            self._stop.wait(next(backoff))

    def _stream(self, client: Etcd3Client) -> bool:
        """One watch stream until it breaks; True if it was established."""
        request = {
            "create_request": {
                "key": _b64(self.prefix),
                "range_end": _b64(_prefix_end(self.prefix)),
            }
        }
        try:
            response = client.session.post(
                client.get_url("/watch"),
                json=request,
                stream=True,
                timeout=(self.store.timeout_s, None),
            )
        except requests.RequestException:
            return False
        self._response = response
        established = False
        try:
            if response.status_code != 200:
                return False
            for line in response.iter_lines():
                if self._stop.is_set():
                    return established
                if not line.strip():
                    continue
                result = json.loads(line).get("result", {})
                if result.get("created"):
                    established = True
                self._notify()  # an event, or the (re)connect: the caller re-reads
        except (requests.RequestException, ValueError, AttributeError):
            pass
        finally:
            with contextlib.suppress(Exception):
                response.close()
            self._response = None
        return established

    def _notify(self) -> None:
        with contextlib.suppress(Exception):  # a callback's failure must not end the watch
            self.on_change()


def _interrupt(response: requests.Response) -> None:
    """Wake the thread blocked reading a watch stream: shut its socket down, and the thread
    sees the stream end and closes the response itself. (Closing the response from here would
    wait on the reader's buffer lock, held until etcd sends something: a reload or a stop hung
    for as long as the watched keys stayed unchanged.)"""
    connection = getattr(response.raw, "connection", None)  # kept open: a streamed response
    sock = getattr(connection, "sock", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    else:  # no socket to shut (already released): closing cannot block on a reader
        with contextlib.suppress(Exception):
            response.close()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _text(value: bytes | str) -> str:
    raw = value if isinstance(value, bytes) else value.encode()
    if len(raw) > MAX_VALUE_BYTES:
        raise StoreUnavailableError(f"a value of {len(raw)} bytes (more than {MAX_VALUE_BYTES})")
    return raw.decode("utf-8", errors="replace")


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, etcd_errors.ConnectionFailedError | requests.ConnectionError):
        return "connection refused or lost"
    if isinstance(exc, etcd_errors.ConnectionTimeoutError | requests.Timeout):
        return "timed out"
    return text[:200] or type(exc).__name__


class MemoryStore:
    """The store's contract in one process, on an injected clock: leases expire when the clock
    passes them (checked at every call and at `tick()`). `available = False` makes every call
    raise StoreUnavailableError (an outage); `tick()` also runs the watches' callbacks."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.available = True
        self._data: dict[str, tuple[str, int | None]] = {}
        self._leases: dict[int, tuple[float, float]] = {}  # id -> (ttl, expires)
        self._ids = itertools.count(0x1000)
        self._watches: dict[int, tuple[str, Callable[[], None]]] = {}
        self._watch_ids = itertools.count(1)
        self._changed: set[int] = set()
        self._lock = threading.RLock()

    def _check(self) -> None:
        if not self.available:
            raise StoreUnavailableError("etcd unreachable (the store is switched off)")
        self._expire()

    def _expire(self) -> None:
        now = self.clock.now()
        gone = [lid for lid, (_ttl, expires) in self._leases.items() if expires <= now]
        for lid in gone:
            del self._leases[lid]
            for key in [k for k, (_v, owner) in self._data.items() if owner == lid]:
                self._changed_key(key)
                del self._data[key]

    def _changed_key(self, key: str) -> None:
        for wid, (prefix, _cb) in self._watches.items():
            if key.startswith(prefix):
                self._changed.add(wid)

    def tick(self) -> None:
        """Expire leases and run the callbacks of the watches whose keys changed."""
        with self._lock:
            if self.available:
                self._expire()
            due = [self._watches[w][1] for w in sorted(self._changed) if w in self._watches]
            self._changed.clear()
        for callback in due:
            callback()

    def lease(self, ttl_s: int) -> int:
        with self._lock:
            self._check()
            lid = next(self._ids)
            self._leases[lid] = (float(ttl_s), self.clock.now() + ttl_s)
            return lid

    def refresh(self, lease_id: int) -> float:
        with self._lock:
            self._check()
            if lease_id not in self._leases:
                raise LeaseLostError(f"lease {lease_id:x} expired")
            ttl, _ = self._leases[lease_id]
            self._leases[lease_id] = (ttl, self.clock.now() + ttl)
            return ttl

    def revoke(self, lease_id: int) -> None:
        with self._lock:
            if not self.available:
                return
            self._leases[lease_id] = (0.0, -math.inf)
            self._expire()

    def _owner(self, lease_id: int | None) -> int | None:
        if lease_id is not None and lease_id not in self._leases:
            raise LeaseLostError(f"lease {lease_id:x} not found")
        return lease_id

    def put(self, key: str, value: str, lease_id: int | None = None) -> None:
        with self._lock:
            self._check()
            self._data[key] = (value, self._owner(lease_id))
            self._changed_key(key)

    def create(self, key: str, value: str, lease_id: int | None = None) -> bool:
        with self._lock:
            self._check()
            if key in self._data:
                return False
            self._data[key] = (value, self._owner(lease_id))
            self._changed_key(key)
            return True

    def get(self, key: str) -> str | None:
        with self._lock:
            self._check()
            found = self._data.get(key)
            return None if found is None else found[0]

    def get_prefix(self, prefix: str) -> dict[str, str]:
        with self._lock:
            self._check()
            return {k: v for k, (v, _o) in sorted(self._data.items()) if k.startswith(prefix)}

    def delete(self, key: str) -> None:
        with self._lock:
            self._check()
            if self._data.pop(key, None) is not None:
                self._changed_key(key)

    def watch_prefix(self, prefix: str, on_change: Callable[[], None]) -> Callable[[], None]:
        with self._lock:
            wid = next(self._watch_ids)
            self._watches[wid] = (prefix, on_change)

        def cancel() -> None:
            with self._lock:
                self._watches.pop(wid, None)

        return cancel

    def close(self) -> None:
        with self._lock:
            self._watches.clear()

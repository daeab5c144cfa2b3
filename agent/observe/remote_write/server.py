"""The receiver: an HTTP(S) endpoint taking Prometheus remote write at POST /api/v1/write, and its
own metrics at GET /metrics.

Plain `http.server` threads, one per sender connection (senders keep their connections open;
at most MAX_CONNECTIONS at once, more are closed); TLS is negotiated in that thread, so a slow
client cannot hold the others up. Bodies are decoded one at a time. Every refusal is a
4xx with a one-line reason the sender logs (remote write does not retry a 4xx: a body refused
once would be refused again), except an unusable token file (503: fail closed, retried):

    401/403  no bearer token / not an accepted one (when a token file is configured)
    411/413  no Content-Length / a body over max_body_bytes (not read), or one that would
             uncompress past max_decoded_bytes (not uncompressed)
    415      not snappy-compressed protobuf, or remote write 2.0
    400      not a snappy block, not a WriteRequest, or new series past max_series (the
             known series of that body are kept)
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agent.core.errors import BadInputError
from agent.observe.remote_write import wire
from agent.observe.remote_write.settings import WRITE_PATH, RemoteWriteConfig, parse_listen
from agent.observe.remote_write.store import IngestResult, SeriesStore

log = structlog.get_logger("ooda.remote_write")

TLS_HANDSHAKE_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 120.0  # a sender's idle connection is closed after this
# Connections served at once (a thread each); more are closed at once. Prometheus opens one
# per shard (its max_shards: 200 by default, far fewer at a steady rate).
MAX_CONNECTIONS = 64


class TokenCheck(Protocol):
    """Judges an Authorization header: "ok", "missing", "invalid" or "unavailable" (the token
    file cannot be used). The node daemon's TokenStore is one."""

    def check(self, authorization: str | None) -> str: ...


class ReceiverMetrics:
    """The receiver's own counters, in a registry of their own (served at /metrics)."""

    def __init__(self, store: SeriesStore) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "ooda_remote_write_requests", "Write requests answered, by HTTP status.", ["code"],
            registry=r,
        )  # fmt: skip
        self.samples = Counter(
            "ooda_remote_write_samples", "Samples kept (staleness markers included).", registry=r
        )
        self.markers = Counter(
            "ooda_remote_write_stale_markers", "Staleness markers received.", registry=r
        )
        self.bytes = Counter(
            "ooda_remote_write_bytes", "Body bytes received and uncompressed.", ["stage"],
            registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "ooda_remote_write_rejected", "Requests refused, by reason.", ["reason"], registry=r
        )
        self.new_series = Counter(
            "ooda_remote_write_new_series", "Series seen for the first time.", registry=r
        )
        self.refused_series = Counter(
            "ooda_remote_write_refused_series",
            "New series refused because the receiver holds max_series.",
            registry=r,
        )
        self.slow_series = Counter(
            "ooda_remote_write_slow_series",
            "Series decoded in full (new ones, and any not in the usual one-sample shape).",
            registry=r,
        )
        self.ingest_cpu = Counter(
            "ooda_remote_write_ingest_cpu_seconds",
            "CPU time spent uncompressing, decoding and storing bodies.",
            registry=r,
        )
        series = Gauge("ooda_remote_write_series", "Series held (all, read or not).", registry=r)
        series.set_function(lambda: store.series)

    def ingested(self, result: IngestResult, cpu_s: float) -> None:
        self.samples.inc(result.samples)
        self.markers.inc(result.markers)
        self.new_series.inc(result.new_series)
        self.refused_series.inc(result.refused_series)
        self.slow_series.inc(result.slow_series)
        self.ingest_cpu.inc(cpu_s)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    allow_reuse_port = True  # a reload binds the new receiver before the old one closes
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], receiver: RemoteWriteReceiver) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.receiver = receiver
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.receiver.metrics.rejected.labels("connections").inc()
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        context = self.receiver.tls
        if context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(TLS_HANDSHAKE_TIMEOUT_S)
        try:
            secured = context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            self.receiver.metrics.rejected.labels("tls").inc()
            return
        try:
            super().finish_request(secured, client_address)
        finally:
            secured.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: senders reuse their connections
    server_version = "ooda-remote-write"
    sys_version = ""
    timeout = IDLE_TIMEOUT_S
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # every scrape's writes would drown the journal; the counters say it all

    def do_POST(self) -> None:
        receiver = self.server.receiver
        if self.path.split("?", 1)[0] != WRITE_PATH:
            self._refuse(404, "not_found", f"remote write goes to POST {WRITE_PATH}")
            return
        if not self._authorized():
            return
        length = self._length()
        if length is None:
            return
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            receiver.metrics.rejected.labels("truncated").inc()
            return
        status, reason, problem = receiver.write(body)
        if status == 204:
            self._answer(204, b"")
        else:
            self._refuse(status, reason, problem)

    def do_GET(self) -> None:
        receiver = self.server.receiver
        if self.path.split("?", 1)[0] != "/metrics":
            self._refuse(404, "not_found", f"remote write goes to POST {WRITE_PATH}")
            return
        if receiver.tokens is not None and not self._authorized():
            return
        self._answer(200, generate_latest(receiver.metrics.registry), CONTENT_TYPE_LATEST)

    def _authorized(self) -> bool:
        tokens = self.server.receiver.tokens
        if tokens is None:
            return True
        verdict = str(tokens.check(self.headers.get("Authorization")))
        if verdict == "ok":
            return True
        self._discard_body()
        if verdict == "missing":
            self._refuse(401, "auth", "a bearer token is required (Authorization: Bearer TOKEN)")
        elif verdict == "invalid":
            self._refuse(403, "auth", "the bearer token is not accepted")
        else:
            self._refuse(503, "auth", "the receiver's token file is unusable: nobody is let in")
        return False

    def _length(self) -> int | None:
        """The body's declared length, or None after refusing the request."""
        config = self.server.receiver.config
        problem = _unsupported(
            self.headers.get("Content-Type"), self.headers.get("Content-Encoding")
        )
        if problem is not None:
            self._discard_body()
            self._refuse(415, "unsupported", problem)
            return None
        declared = self.headers.get("Content-Length")
        if declared is None or not declared.strip().isdecimal():
            self.close_connection = True
            self._refuse(411, "no_length", "a Content-Length is required")
            return None
        length = int(declared)
        if length > config.max_body_bytes:
            self.close_connection = True  # the body is not read: the connection cannot go on
            self._refuse(
                413,
                "too_large",
                f"body of {length} bytes, over the limit of {config.max_body_bytes} "
                "(max_body_bytes; send smaller batches: queue_config.max_samples_per_send)",
            )
            return None
        return length

    def _discard_body(self) -> None:
        declared = self.headers.get("Content-Length", "")
        limit = self.server.receiver.config.max_body_bytes
        if declared.strip().isdecimal() and int(declared) <= limit:
            self.rfile.read(int(declared))
        else:
            self.close_connection = True

    def _refuse(self, status: int, reason: str, problem: str) -> None:
        self.server.receiver.metrics.rejected.labels(reason).inc()
        self._answer(status, f"{problem}\n".encode(), "text/plain; charset=utf-8")

    def _answer(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.server.receiver.metrics.requests.labels(str(status)).inc()
        self.send_response(status)
        if body:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(body)


def _unsupported(content_type: str | None, encoding: str | None) -> str | None:
    """Why a body of this type and encoding is not remote write 1.0 (None: it is)."""
    media, _, params = (content_type or "").partition(";")
    if media.strip().lower() != "application/x-protobuf":
        return f"Content-Type {content_type!r}: want application/x-protobuf (remote write 1.0)"
    proto = {
        k.strip().lower(): v.strip()
        for k, _, v in (p.partition("=") for p in params.split(";") if p.strip())
    }.get("proto", "prometheus.WriteRequest")
    if proto != "prometheus.WriteRequest":
        return (
            f"Content-Type proto={proto}: only remote write 1.0 (prometheus.WriteRequest) is "
            "received; set the sender's protobuf_message to prometheus.WriteRequest"
        )
    if (encoding or "").strip().lower() != "snappy":
        return f"Content-Encoding {encoding!r}: want snappy"
    return None


class RemoteWriteReceiver:
    """Takes remote write into `store`, in background threads, until `stop()`."""

    def __init__(
        self,
        config: RemoteWriteConfig,
        store: SeriesStore,
        tokens: TokenCheck | None = None,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        if config.token_file is not None and tokens is None:
            raise BadInputError(f"token_file {config.token_file}: no token check was given")
        self.config = config
        self.store = store
        self.tokens = tokens
        self.metrics = ReceiverMetrics(store)
        self.tls = _tls_context(config.tls_cert, config.tls_key)
        self._cpu_clock = cpu_clock
        # One body decoded at a time: the work holds the GIL, and threads taking turns at it
        # mid-body cost more than waiting (and one body's buffers in memory, not one per sender).
        self._decoding = threading.Lock()
        self._buffer = bytearray()  # the uncompressed body, reused (under `_decoding`)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.address = ""

    def start(self) -> str:
        """Listen and serve in a background thread; the URL senders write to."""
        host, port = parse_listen(self.config.listen)
        try:
            self._server = _Server((host, port), self)
        except OSError as exc:
            raise BadInputError(
                f"source.remote_write.listen {self.config.listen}: cannot listen "
                f"({exc.strerror or exc})"
            ) from None
        bound_host, bound_port = str(self._server.server_address[0]), self._server.server_port
        scheme = "https" if self.tls is not None else "http"
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.address = f"{scheme}://{shown}:{bound_port}{WRITE_PATH}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="ooda-remote-write",
            daemon=True,
        )
        self._thread.start()
        log.info("remote_write_listening", url=self.address)
        return self.address

    def write(self, body: bytes) -> tuple[int, str, str]:
        """One body into the store: (HTTP status, reason, problem); 204 when kept."""
        metrics = self.metrics
        metrics.bytes.labels("received").inc(len(body))
        with self._decoding:
            return self._write(body)

    def _write(self, body: bytes) -> tuple[int, str, str]:
        metrics = self.metrics
        cpu0 = self._cpu_clock()
        try:
            raw = wire.decompress(body, self.config.max_decoded_bytes, self._buffer)
            metrics.bytes.labels("decoded").inc(len(raw))
            series = wire.split(raw)
            result = self.store.ingest(series, raw)
        except wire.BodyError as exc:
            reason = "too_large" if exc.status == 413 else "bad_body"
            return exc.status, reason, str(exc)
        finally:
            metrics.ingest_cpu.inc(max(self._cpu_clock() - cpu0, 0.0))
        metrics.ingested(result, 0.0)
        if result.refused_series:
            return (
                400,
                "series_limit",
                f"{result.refused_series} new series refused: the receiver holds max_series = "
                f"{self.config.max_series} (the known series of this body were kept)",
            )
        return 204, "", ""

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None


def _tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if cert is None or key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise BadInputError(
            f"source.remote_write.tls_cert/tls_key {cert}, {key}: cannot load ({exc})"
        ) from None
    return context

"""Running the node daemon: where it listens, TLS, the lease check, and what it leaves on exit.

`NodeDaemon(backend, settings)` builds one daemon over any GpuBackend (NVML, the twin, a fake).
Run it in the foreground (`run()`, signals stop it), in a background thread (`start()`/`stop()`,
what tests and `ooda sim serve` use), or as a coroutine (`await serve()`, to host many on one
event loop). The server is uvicorn over sockets this module binds itself, so a Unix socket gets
its permissions before it accepts anything and a TCP port 0 is known before serving; its h11
protocol runs under the daemon's connection limits (agent/node/connections.py), and a TLS
handshake must finish within the header timeout too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import uvicorn

from agent.core.clock import Clock, MonotonicClock
from agent.core.errors import BadInputError
from agent.core.protocols import GpuBackend
from agent.core.urls import is_loopback
from agent.node.api import NodeMetrics, build_app
from agent.node.auth import TokenStore
from agent.node.connections import (
    FD_RESERVE,
    ConnectionGuard,
    ConnectionLimits,
    guarded_protocol,
)
from agent.node.lease_file import LeaseFile
from agent.node.leases import DEFAULT_ADOPT_LEASE_S, LeaseManager, OnExit, OnStart

log = structlog.get_logger("ooda.node")

DEFAULT_SOCKET = Path("/run/ooda/node.sock")
MAX_HEAD_BYTES = 16 * 1024  # a request line and headers (h11 refuses more with a 400)
ACCEPT_BATCH = 64
# Connections the kernel queues until the daemon accepts them: a flood of new connections fills
# a short queue, and then a client's connect fails at once (EAGAIN) instead of waiting its turn.
LISTEN_BACKLOG = 1024


@dataclass(frozen=True)
class NodeSettings:
    """How one daemon serves. Exactly one of `socket_path` and `listen` ("ADDR:PORT")."""

    token_file: Path
    socket_path: Path | None = None
    listen: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    insecure: bool = False
    socket_mode: int = 0o660
    fallback_cap_w: float | None = None
    max_lease_s: float = 3600.0
    check_interval_s: float = 1.0
    on_exit: OnExit = OnExit.FALLBACK
    on_start: OnStart = OnStart.KEEP
    public_metrics: bool = False
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    lease_file: Path | None = None
    adopt_lease_s: float = DEFAULT_ADOPT_LEASE_S

    def validate(self) -> None:
        """BadInputError naming the option when the combination is wrong or unsafe."""
        self._check_transport()
        self._check_numbers()
        if self.lease_file is not None and not self.lease_file.parent.is_dir():
            raise BadInputError(
                f"--lease-file {self.lease_file}: directory {self.lease_file.parent} does not exist"
            )

    def _check_transport(self) -> None:
        if (self.socket_path is None) == (self.listen is None):
            raise BadInputError("give --socket PATH or --listen ADDR:PORT (exactly one)")
        tls = (
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--tls-client-ca", self.tls_client_ca),
        )
        tls_given = [name for name, value in tls if value is not None]
        if self.socket_path is not None and tls_given:
            raise BadInputError(f"{tls_given[0]}: TLS applies to --listen, not to a Unix socket")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise BadInputError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise BadInputError("--tls-client-ca needs --tls-cert and --tls-key")
        for name, path in tls:
            if path is not None and not path.is_file():
                raise BadInputError(f"{name} {path}: no such file")
        if self.listen is not None:
            host, _port = parse_listen(self.listen)
            if self.tls_cert is None and not is_loopback(host) and not self.insecure:
                raise BadInputError(
                    f"--listen {self.listen}: plain HTTP on a non-loopback address would send "
                    "tokens in clear; give --tls-cert/--tls-key (or --insecure to insist)"
                )

    def _check_numbers(self) -> None:
        if self.fallback_cap_w is not None and not self.fallback_cap_w > 0:
            raise BadInputError(f"--fallback-cap-w: must be positive (got {self.fallback_cap_w})")
        for name, value in (
            ("--max-lease-s", self.max_lease_s),
            ("--check-interval-s", self.check_interval_s),
        ):
            if not value > 0:
                raise BadInputError(f"{name}: must be positive (got {value})")
        if not 0 < self.adopt_lease_s <= self.max_lease_s:
            raise BadInputError(
                f"--adopt-lease-s: must be in (0, --max-lease-s] (got {self.adopt_lease_s})"
            )
        problem = self.limits.problem()
        if problem is not None:
            raise BadInputError(problem)


def ensure_fd_limit(limits: ConnectionLimits) -> int:
    """Raise this process's soft limit on open files to what `limits` need (held and silent
    connections, 2 x max_connections, plus FD_RESERVE), within the hard limit; BadInputError
    when the hard limit is too low. Returns the soft limit now. For the daemon's own process
    (`ooda node serve`), not for hosts of many daemons."""
    needed = 2 * limits.max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise BadInputError(
                f"--max-connections {limits.max_connections}: needs {needed} open files, the "
                f"limit is {hard} (raise LimitNOFILE, or lower --max-connections)"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        soft = needed
    return int(soft)


def parse_listen(text: str) -> tuple[str, int]:
    """`127.0.0.1:9440`, `[::1]:9440`, `node1:9440` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdecimal() or not 0 <= int(port) <= 65535:
        raise BadInputError(f"--listen {text!r}: expected ADDR:PORT, e.g. 127.0.0.1:9440")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _bind_unix(path: Path, mode: int) -> socket.socket:
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise BadInputError(f"--socket {path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # a stale socket from a daemon that died
        else:
            raise BadInputError(f"--socket {path}: another daemon is listening there")
        finally:
            probe.close()
    if not path.parent.is_dir():
        raise BadInputError(f"--socket {path}: directory {path.parent} does not exist")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Permissions before listen(): nobody can connect in between.
        os.chmod(path, mode)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise BadInputError(f"--socket {path}: cannot listen ({exc.strerror or exc})") from None
    sock.setblocking(False)
    return sock


def _bind_tcp(listen: str) -> socket.socket:
    host, port = parse_listen(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise BadInputError(f"--listen {listen}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise BadInputError(f"--listen {listen}: cannot listen ({exc.strerror or exc})") from None
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling (it re-raises the signal after serving, which
    would kill the process before the daemon leaves the GPUs as `on_exit` says), serving the
    daemon's own sockets with a bound on TLS handshakes."""

    def __init__(self, config: uvicorn.Config, handshake_timeout_s: float) -> None:
        super().__init__(config)
        self.handshake_timeout_s = handshake_timeout_s

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's own startup for given sockets, plus ssl_handshake_timeout (its default is
        # 60 s: a client that opens a TLS connection and stalls would hold it that long).
        await self.lifespan.startup()
        config = self.config
        loop = asyncio.get_running_loop()

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=_loop,
            )

        self.servers = []
        for sock in sockets or []:
            handshake = self.handshake_timeout_s if config.ssl is not None else None
            server = await loop.create_server(
                create_protocol,
                sock=sock,
                ssl=config.ssl,
                backlog=config.backlog,  # asyncio accepts this many at a time (ACCEPT_BATCH)...
                ssl_handshake_timeout=handshake,
            )
            sock.listen(LISTEN_BACKLOG)  # ...and it is the kernel's queue too: a longer one
            self.servers.append(server)
        self.started = True


class NodeDaemon:
    """One node daemon over `backend`. `lock` serializes every backend call (share it with
    whatever else writes the same GPUs, e.g. a twin stepping in another thread)."""

    def __init__(
        self,
        backend: GpuBackend,
        settings: NodeSettings,
        *,
        clock: Clock | None = None,
        lock: threading.RLock | None = None,
    ) -> None:
        settings.validate()
        self.settings = settings
        self.tokens = TokenStore(settings.token_file)
        self.metrics = NodeMetrics(lambda: self.manager, lambda: self.connections.open)
        self.connections = ConnectionGuard(settings.limits, self.metrics)
        self.manager = LeaseManager(
            backend,
            # Leases are durations: immune to wall-clock steps, and CLOCK_MONOTONIC is the
            # same for the next daemon of this boot (the lease table's times).
            clock or MonotonicClock(),
            fallback_cap_w=settings.fallback_cap_w,
            max_lease_s=settings.max_lease_s,
            lock=lock,
            events=self.metrics,
            lease_file=LeaseFile(settings.lease_file) if settings.lease_file else None,
            adopt_lease_s=settings.adopt_lease_s,
        )
        self.app = build_app(
            self.manager,
            self.tokens,
            self.metrics,
            public_metrics=settings.public_metrics,
            body_timeout_s=settings.limits.header_timeout_s,
        )
        self._server: uvicorn.Server | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self.address = ""

    def _uvicorn_config(self) -> uvicorn.Config:
        s = self.settings
        tls: dict[str, object] = {}
        if s.tls_cert is not None:
            tls = {
                "ssl_certfile": str(s.tls_cert),
                "ssl_keyfile": str(s.tls_key),
                "ssl_version": ssl.PROTOCOL_TLS_SERVER,
            }
            if s.tls_client_ca is not None:
                tls |= {"ssl_ca_certs": str(s.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        config = uvicorn.Config(
            self.app,
            http=guarded_protocol(self.connections),
            loop="asyncio",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=2,
            timeout_keep_alive=max(1, round(s.limits.idle_timeout_s)),
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
            # asyncio accepts up to this many connections in one go before it reads from any:
            # a small batch lets connections speak (and be told apart) between batches.
            backlog=ACCEPT_BATCH,
            **tls,  # type: ignore[arg-type]
        )
        try:
            config.load()
        except (OSError, ssl.SSLError) as exc:
            raise BadInputError(
                f"--tls-cert/--tls-key/--tls-client-ca: cannot load ({exc})"
            ) from None
        return config

    def bind(self) -> str:
        """Bind the listening socket (idempotent); returns the address clients use."""
        if self._sock is None:
            s = self.settings
            if s.socket_path is not None:
                self._sock = _bind_unix(s.socket_path, s.socket_mode)
                self.address = f"unix://{s.socket_path}"
            else:
                assert s.listen is not None
                self._sock = _bind_tcp(s.listen)
                host, port = self._sock.getsockname()[:2]
                scheme = "https" if s.tls_cert is not None else "http"
                shown = f"[{host}]" if ":" in host else host
                self.address = f"{scheme}://{shown}:{port}"
        return self.address

    async def _check_leases(self) -> None:
        while True:
            await asyncio.sleep(self.settings.check_interval_s)
            try:
                await asyncio.to_thread(self.manager.enforce)
            except Exception:  # the check must outlive one bad pass
                log.exception("lease_check_failed")

    async def serve(self) -> None:
        """Serve until stopped (signals in the main thread, or `stop()`), then leave the GPUs
        as `on_exit` says."""
        config = self._uvicorn_config()
        self.bind()
        assert self._sock is not None
        await asyncio.to_thread(self.manager.on_start, self.settings.on_start)
        server = _Server(config, self.settings.limits.header_timeout_s)
        self._server = server
        checker = asyncio.create_task(self._check_leases())
        serving = asyncio.create_task(server.serve(sockets=[self._sock]))
        try:
            while not server.started and not serving.done():
                await asyncio.sleep(0.01)
            if server.started:
                log.info("node_daemon_listening", address=self.address, gpus=self.manager.indices)
                self._ready.set()
            await serving
        finally:
            checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checker
            self._close_socket()
            await asyncio.to_thread(self.manager.on_exit, self.settings.on_exit)
            log.info("node_daemon_stopped", on_exit=str(self.settings.on_exit))

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        path = self.settings.socket_path
        if path is not None:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()

    def request_stop(self) -> None:
        """Stop serving (thread-safe); `serve()` then applies `on_exit` and returns."""
        if self._server is not None:
            self._server.should_exit = True

    def run(self) -> None:
        """Foreground: until SIGINT or SIGTERM, then the GPUs are left as `on_exit` says."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.request_stop)
            await self.serve()

        asyncio.run(main())

    def start(self, timeout_s: float = 10.0) -> NodeDaemon:
        """In a background thread; returns once it accepts connections."""
        self._uvicorn_config()  # bad TLS files fail here, in the caller's thread
        self.bind()

        def target() -> None:
            try:
                asyncio.run(self.serve())
            except BaseException as exc:  # reported to start()/stop()
                self._failure = exc
                self._ready.set()

        self._thread = threading.Thread(target=target, name=f"ooda-node {self.address}")
        self._thread.daemon = True
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._failure is not None:
            self.stop()
            raise RuntimeError(f"node daemon at {self.address} did not start: {self._failure}")
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        else:
            self._close_socket()

    def __enter__(self) -> NodeDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

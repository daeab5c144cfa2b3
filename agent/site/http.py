"""A small authenticated JSON server (the coordinator's webhook and status, a replica's failsafe
endpoint) and the failsafe client.

Bearer tokens come from a token file, re-read when it changes (agent.node.auth's TokenStore: the
same rules as the node daemons'). Bodies are bounded; a bad request gets one JSON line naming the
problem. The server runs on its own daemon threads; handlers must be quick and never raise.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from agent.node.auth import AuthResult, TokenStore, first_token

MAX_BODY_BYTES = 64 * 1024
STATUS_BY_AUTH = {AuthResult.MISSING: 401, AuthResult.INVALID: 403, AuthResult.UNAVAILABLE: 503}


@dataclass(frozen=True)
class Reply:
    status: int
    body: Mapping[str, Any]


# method, path -> handler(body or None) -> Reply; `public` routes need no token (GET status).
Handler = Callable[[Any], Reply]


class JsonServer:
    def __init__(
        self,
        host: str,
        port: int,
        routes: Mapping[tuple[str, str], Handler],
        tokens: TokenStore | None,
        public: frozenset[tuple[str, str]] = frozenset(),
    ) -> None:
        owner = self

        class _Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet: we log ourselves
                return

            def do_GET(self) -> None:
                owner._serve(self, "GET")

            def do_POST(self) -> None:
                owner._serve(self, "POST")

        self.routes = dict(routes)
        self.tokens = tokens
        self.public = public
        self._server = ThreadingHTTPServer((host, port), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> JsonServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._server.shutdown()
        self._server.server_close()

    def _serve(self, request: BaseHTTPRequestHandler, method: str) -> None:
        path = request.path.split("?", 1)[0]
        handler = self.routes.get((method, path))
        if handler is None:
            _send(request, Reply(404, {"error": f"no such endpoint: {method} {path}"}))
            return
        if (method, path) not in self.public:
            result = (
                AuthResult.UNAVAILABLE
                if self.tokens is None
                else self.tokens.check(request.headers.get("Authorization"))
            )
            if result is not AuthResult.OK:
                _send(request, Reply(STATUS_BY_AUTH[result], {"error": f"token {result.value}"}))
                return
        body: Any = None
        if method == "POST":
            body, problem = _read_json(request)
            if problem is not None:
                _send(request, Reply(400, {"error": problem}))
                return
        try:
            reply = handler(body)
        except Exception as exc:  # a handler's bug answers 500, never kills the server
            reply = Reply(500, {"error": f"{type(exc).__name__}: {exc}"})
        _send(request, reply)


def _read_json(request: BaseHTTPRequestHandler) -> tuple[Any, str | None]:
    try:
        length = int(request.headers.get("Content-Length", "0"))
    except ValueError:
        return None, "Content-Length: not a number"
    if length > MAX_BODY_BYTES or length < 0:
        return None, f"body: at most {MAX_BODY_BYTES} bytes"
    raw = request.rfile.read(length)
    try:
        return json.loads(raw or b"null"), None
    except ValueError as exc:
        return None, f"body: not JSON ({exc})"


def _send(request: BaseHTTPRequestHandler, reply: Reply) -> None:
    data = json.dumps(reply.body, default=str).encode() + b"\n"
    with contextlib.suppress(OSError):
        request.send_response(reply.status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)


class HttpPinger:
    """Asks a replica's failsafe endpoint for its word (agent.site.election.PeerPinger)."""

    def __init__(self, token_file: Path, timeout_s: float = 1.0) -> None:
        self.token_file = token_file
        self.timeout_s = timeout_s

    def ping(self, url: str, leader: str, ttl_s: float) -> str | None:
        try:
            token = first_token(self.token_file)
            answer = httpx.post(
                f"{url.rstrip('/')}/v1/failsafe",
                json={"leader": leader, "ttl_s": ttl_s},
                headers={"Authorization": f"Bearer {token}"},
                timeout=self.timeout_s,
            )
        except Exception as exc:
            return f"unreachable ({type(exc).__name__})"
        if answer.status_code == 200:
            return None
        try:
            why = str(answer.json().get("error", answer.status_code))
        except ValueError:
            why = str(answer.status_code)
        return f"refused ({why})"

"""A loopback HTTP server for tests that stand in for a remote party (a node daemon, a webhook,
an exporter): each request is handed to an `answer` function; and `ooda node serve` as a process
with a client of its socket."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

# (method, path, headers, body) -> (status, content type, body)
Answer = Callable[[str, str, dict[str, str], bytes], tuple[int, str, bytes]]


class LoopbackServer:
    """Serves `answer` on 127.0.0.1 (`port`, or a free one) from a thread until `close`."""

    def __init__(self, answer: Answer, port: int = 0) -> None:
        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, content_type, payload = answer(
                    self.command, self.path, dict(self.headers), body
                )
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_PUT = do_POST = _serve  # noqa: N815 (http.server's names)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def target(self) -> str:
        """host:port, as a scrape config names it."""
        return self.url.removeprefix("http://")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def node_serve(
    args: Sequence[str], sock: Path, token: str
) -> Iterator[tuple[subprocess.Popen[bytes], httpx.Client]]:
    """`ooda node serve ARGS --socket SOCK` as a process, ready, and a client of its socket with
    the bearer `token`; the process is killed if it still runs at the end."""
    command = [sys.executable, "-m", "agent", "node", "serve", *args, "--socket", str(sock)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30.0
        while not sock.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert sock.exists(), proc.stderr.read() if proc.stderr else ""
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(sock)),
            base_url="http://node",
            headers={"Authorization": f"Bearer {token}"},
        ) as client:
            yield proc, client
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

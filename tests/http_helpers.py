"""A loopback HTTP server for tests that stand in for a remote party (a node daemon, a webhook,
an exporter): each request is handed to an `answer` function."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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

"""A real Alertmanager (Debian's prometheus-alertmanager) on 127.0.0.1 for tests: a free port,
clustering off (it would otherwise listen on 0.0.0.0:9094), its own storage dir, a config that
routes every alert to a receiver with no integrations (nothing is sent anywhere)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

CONFIG = """\
route:
  receiver: "null"
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: "null"
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Alertmanager:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> None:
        assert self.binary is not None
        config = self.base / "alertmanager.yml"
        config.write_text(CONFIG)
        (self.base / "data").mkdir(exist_ok=True)
        with open(self.base / "alertmanager.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.path={self.base / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--cluster.listen-address=",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"alertmanager exited ({self.proc.returncode}):\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"alertmanager not ready after {timeout_s} s:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        path = self.base / "alertmanager.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def alerts(self, **filters: str) -> list[dict[str, Any]]:
        """Active alerts, optionally filtered by label equality."""
        params = [("filter", f'{k}="{v}"') for k, v in filters.items()]
        response = httpx.get(f"{self.url}/api/v2/alerts", params=params, timeout=5.0)
        response.raise_for_status()
        alerts: list[dict[str, Any]] = response.json()
        return alerts

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)
        self.proc = None

"""Real etcd and VictoriaMetrics for the site's integration tests (Debian's etcd-server and
victoria-metrics; `make test` installs them when missing), on 127.0.0.1, on free ports, started
with Popen so a fixture can wait on them, stopped (or killed, or restarted on the same data) by
the test."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port


def _ready(url: str, timeout_s: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready in {timeout_s} s: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen[bytes] | None, kill: bool = False) -> None:
    if proc is None or proc.poll() is not None:
        return
    if kill:
        proc.kill()
    else:
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@dataclass
class Etcd:
    """One etcd member; `stop()` then `start()` brings it back on the same data and ports."""

    base: Path
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @staticmethod
    def binary() -> str | None:
        return shutil.which("etcd")

    def start(self, timeout_s: float = 20.0) -> Etcd:
        binary = self.binary()
        assert binary is not None
        log_path = self.base / "etcd.log"
        with log_path.open("ab") as log:
            peer = f"http://127.0.0.1:{self.peer_port}"
            self.proc = subprocess.Popen(
                [
                    binary,
                    "--name", "s1",
                    "--data-dir", str(self.base / "data"),
                    "--listen-client-urls", self.url,
                    "--advertise-client-urls", self.url,
                    "--listen-peer-urls", peer,
                    "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", f"s1={peer}",
                    "--log-level", "warn",
                ],
                stdout=log,
                stderr=log,
            )  # fmt: skip
        _ready(f"{self.url}/health", timeout_s, self.proc, log_path)
        return self

    def stop(self, kill: bool = False) -> None:
        _stop(self.proc, kill)
        self.proc = None


@dataclass
class VictoriaMetrics:
    """A single-node VictoriaMetrics scraping `targets` every second (a PromQL-compatible
    long-term store); fresh samples are queryable at once (-search.latencyOffset=0s)."""

    base: Path
    targets: Sequence[str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def binary() -> str | None:
        return shutil.which("victoria-metrics")

    def start(self, timeout_s: float = 20.0) -> VictoriaMetrics:
        binary = self.binary()
        assert binary is not None
        scrape = self.base / "scrape.yml"
        targets = ", ".join(f"'{t}'" for t in self.targets)
        scrape.write_text(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: dcgm\n"
            f"    static_configs:\n      - targets: [{targets}]\n"
        )
        log_path = self.base / "vm.log"
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"-storageDataPath={self.base / 'data'}",
                    f"-httpListenAddr=127.0.0.1:{self.port}",
                    f"-promscrape.config={scrape}",
                    "-search.latencyOffset=0s",
                    "-search.disableCache",
                    "-loggerLevel=ERROR",
                ],
                stdout=log,
                stderr=log,
            )
        _ready(f"{self.url}/health", timeout_s, self.proc, log_path)
        return self

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None

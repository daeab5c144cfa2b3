"""Real services for integration tests, on 127.0.0.1 only, on ports picked free at run time,
started and stopped by fixtures: Prometheus, a 4-node Slurm cluster and Alertmanager (Debian's
packages; `make test` installs them when missing)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.act.slurm import SlurmPlacement
from agent.core.errors import TelemetryError
from agent.observe.prometheus import PrometheusSettings, PrometheusSource
from tests.conftest import free_port
from tests.integration.alertmanager import Alertmanager
from tests.integration.slurm_accounting import AccountingCluster, missing_accounting_tools
from tests.integration.slurm_cluster import SlurmCluster, missing_tools, settings_for

SCRAPE_S = 1.0


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (make test installs Debian's prometheus)")
    return path


@dataclass
class Prometheus:
    url: str
    port: int
    data: Path
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    args: tuple[str, ...] = ()  # more flags for prometheus

    @classmethod
    def under(cls, base: Path, data: Path | None = None, args: Sequence[str] = ()) -> Prometheus:
        """One on a free loopback port (not started yet): its config `base/prometheus.yml`, its
        log beside it, its data `base/data` unless given."""
        port = free_port()
        return cls(
            url=f"http://127.0.0.1:{port}",
            port=port,
            data=data or base / "data",
            config=base / "prometheus.yml",
            log=base / "prometheus.log",
            args=tuple(args),
        )

    def start(self, timeout_s: float = 20.0) -> Prometheus:
        log = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                _binary("prometheus"),
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.data}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=100y",
                "--web.enable-lifecycle",
                "--log.level=warn",
                *self.args,
            ],
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r,
            ):
                if r.status == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"prometheus not ready in {timeout_s} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def source(self, **settings: Any) -> PrometheusSource:
        return PrometheusSource(
            PrometheusSettings(**{"url": self.url, "scrape_interval_s": SCRAPE_S, **settings})
        )

    def wait_for_gpus(self, n: int, timeout_s: float = 30.0, **settings: Any) -> None:
        """Until `n` fresh GPUs are visible (the first scrape takes about 6 s after start)."""
        source = self.source(**settings)
        deadline = time.monotonic() + timeout_s
        seen = -1
        while time.monotonic() < deadline:
            with contextlib.suppress(TelemetryError):
                snap = source.observe(time.time())
                seen = int(snap.fresh.sum())
                if seen >= n:
                    return
            time.sleep(0.2)
        raise AssertionError(f"only {seen} of {n} GPUs fresh after {timeout_s} s")


def scrape_yaml(jobs: dict[str, Sequence[str]]) -> str:
    lines = [
        "global:",
        f"  scrape_interval: {SCRAPE_S:g}s",
        f"  scrape_timeout: {SCRAPE_S:g}s",
        f"  evaluation_interval: {SCRAPE_S:g}s",
        "scrape_configs:",
    ]
    for job, targets in jobs.items():
        lines += [
            f"  - job_name: {job}",
            "    static_configs:",
            f"      - targets: {json.dumps(list(targets))}",
        ]
    return "\n".join(lines) + "\n"


PrometheusFactory = Callable[..., Prometheus]


@pytest.fixture
def prometheus_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusFactory]:
    """`start(jobs={"job": [targets]}, data=None, args=())`: a running Prometheus; all stop at
    teardown."""
    started: list[Prometheus] = []

    def start(
        jobs: dict[str, Sequence[str]] | None = None,
        data: Path | None = None,
        args: Sequence[str] = (),
    ) -> Prometheus:
        base = tmp_path_factory.mktemp("prometheus")
        config = base / "prometheus.yml"
        config.write_text(scrape_yaml(jobs or {}))
        prom = Prometheus.under(base, data=data, args=args)
        started.append(prom)
        return prom.start()

    yield start
    for prom in started:
        prom.stop()


def tsdb_blocks(openmetrics: Path, data: Path) -> Path:
    """`data`, a Prometheus data folder holding the OpenMetrics file's samples as TSDB blocks
    (promtool's backfill), for a Prometheus that serves history without scraping it."""
    subprocess.run(
        ["promtool", "tsdb", "create-blocks-from", "openmetrics", str(openmetrics), str(data)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return data


def ooda(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run the `ooda` command as a separate process."""
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


# -- Slurm and Alertmanager ------------------------------------------------------------------


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One real cluster for the session (starting takes about 0.2 s, but stopping one with jobs
    about 4 s); each test gets it reset through `slurm`."""
    missing = missing_tools()
    if missing:
        pytest.skip(f"Slurm not installed ({', '.join(missing)}): run `make system-deps`")
    if os.geteuid() != 0:
        pytest.skip("the Slurm fixture runs its daemons as root (SlurmUser=root, mknod)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session's cluster, reset: no jobs, every node idle, weights and features as
    configured."""
    slurm_cluster.reset()
    yield slurm_cluster


@pytest.fixture
def placement(slurm: SlurmCluster) -> SlurmPlacement:
    return SlurmPlacement(settings_for(slurm))


ACCOUNT_SHARES = {"team-a": 50, "team-b": 30, "team-c": 20}


@pytest.fixture(scope="session")
def slurm_accounting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AccountingCluster]:
    """A cluster with job accounting (slurmdbd, MariaDB), started once per session and only for
    the tests that ask for it (about 3 s): accounts team-a/b/c with fairshares 50/30/20."""
    missing = missing_tools() + missing_accounting_tools()
    if missing:
        pytest.skip(
            f"Slurm accounting not installed ({', '.join(missing)}): run `make system-deps`"
        )
    if os.geteuid() != 0:
        pytest.skip("the Slurm fixture runs its daemons as root (SlurmUser=root, mknod, netns)")
    cluster = AccountingCluster(tmp_path_factory.mktemp("slurm-accounting"))
    try:
        cluster.start()
        cluster.add_accounts(ACCOUNT_SHARES)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alertmanager]:
    server = Alertmanager(tmp_path_factory.mktemp("alertmanager"))
    if server.binary is None:
        pytest.skip("prometheus-alertmanager not installed: run `make system-deps`")
    try:
        server.start()
        yield server
    finally:
        server.stop()

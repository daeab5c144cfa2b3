"""Helpers for the daemon tests: configs for a small twin, an in-process daemon on a FakeClock, and
`ooda run` as a real subprocess (free port, JSON logs read back, /metrics scraped)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from agent.core.clock import Clock, FakeClock
from agent.daemon import Daemon, DaemonOptions
from agent.daemon.notify import SystemdNotify
from agent.loop import CycleReport
from tests.fakes import HealthFromXid

__all__ = ["HealthFromXid"]  # the tests that drive daemons use it (tests.fakes)

REPO = Path(__file__).resolve().parent.parent
START_UNIX = 1_700_000_000.0


def twin_config(
    *,
    cluster: str = "lab",
    dry_run: bool = True,
    interval_s: float = 15.0,
    speed: float = 1.0,
    nodes: int = 2,
    budget_w: float | None = 9000.0,
    faults: tuple[str, ...] = (),
    audit: str | None = "audit.jsonl",
    extra: str = "",
    daemon_extra: str = "",
) -> str:
    budget = f"budget_w = {budget_w}" if budget_w is not None else ""
    fault_list = ", ".join(json.dumps(f) for f in faults)
    audit_section = f'[audit]\npath = "{audit}"\n' if audit else ""
    return f"""
dry_run = {str(dry_run).lower()}

[source]
kind = "twin"

[cluster]
name = "{cluster}"
{budget}

[twin]
nodes = {nodes}
gpus_per_node = 8
seed = 3
speed = {speed}
faults = [{fault_list}]

[daemon]
interval_s = {interval_s}
{daemon_extra}

{audit_section}
{extra}
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def in_process(
    config: Path,
    state_dir: Path,
    *,
    wall: Clock | None = None,
    listen: tuple[str, int] | None = None,
    dry_run: bool = False,
) -> Daemon:
    """A started daemon (lock, runtime, state) driven by the test, with its own registry."""
    daemon = Daemon(
        DaemonOptions(config, force_dry_run=dry_run, state_dir=state_dir, metrics_listen=listen),
        wall=wall or FakeClock(START_UNIX),
        notify=SystemdNotify(),
        metrics_registry=CollectorRegistry(),
    )
    daemon.start()
    return daemon


def drive(daemon: Daemon, wall: FakeClock, cycles: int) -> list[CycleReport]:
    """`cycles` scheduled cycles, one interval apart on `wall`; their reports."""
    reports = []
    for _ in range(cycles):
        wall.advance(daemon.interval_s)
        report = daemon.run_cycle()
        assert report is not None
        reports.append(report)
    return reports


class Killed(BaseException):
    """SIGKILL, in-process: nothing after it runs."""


def gone(daemon: Daemon) -> None:
    """An in-process daemon's process is gone (killed): its lock and audit file with it."""
    assert daemon.lock is not None
    daemon.lock.release()
    daemon.runtime.audit.close()


def capped_gpus(daemon: Daemon) -> int:
    """How many of the daemon's twin GPUs are under their default limit."""
    twin = daemon.runtime.twin
    assert twin is not None
    return int((twin.cap_w < twin.default_w).sum())


def sample(daemon: Daemon, name: str, **labels: str) -> float | None:
    return daemon.metrics.registry.get_sample_value(name, labels)


def audit_events(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "the audit log ends in the middle of a record"
    return [json.loads(line) for line in text.splitlines()]


# -- `ooda run` as a process ----------------------------------------------------------------------


class DaemonProcess:
    """`ooda run` in a subprocess; stderr (JSON logs) goes to a file the test reads."""

    def __init__(
        self,
        config: Path,
        state_dir: Path,
        log_path: Path,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        full_env = {**os.environ, "OODA_LOG_LEVEL": "info"}
        full_env.pop("NOTIFY_SOCKET", None)  # only where a test sets it
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "run",
                "--config",
                str(config),
                "--state-dir",
                str(state_dir),
                "--metrics-listen",
                "127.0.0.1:0",
                *args,
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=full_env,
        )
        self.url = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def wait_event(
        self,
        name: str,
        timeout_s: float = 20.0,
        after: int = 0,
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """The newest event `name` after the first `after` events (and, given `where`, one
        it holds for), waiting up to `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [
                e
                for e in self.events()[after:]
                if e.get("event") == name and (where is None or where(e))
            ]
            if found:
                return found[-1]
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"ooda run exited ({self.proc.returncode}) before {name!r}:\n"
                    + self.log_path.read_text()[-3000:]
                )
            time.sleep(0.05)
        raise AssertionError(
            f"no {name!r} within {timeout_s} s:\n{self.log_path.read_text()[-3000:]}"
        )

    def started(self, timeout_s: float = 30.0) -> DaemonProcess:
        event = self.wait_event("started", timeout_s)
        self.url = f"http://{event['metrics']}"
        return self

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    def value(self, name: str, labels: str = "") -> float | None:
        pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" (\S+)"
        match = re.search(r"^" + pattern + r"$", self.metrics(), re.MULTILINE)
        return float(match.group(1)) if match else None

    def wait_cycles(self, n: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = sum(
                self.value("ooda_cycles_total", f'result="{r}"') or 0.0
                for r in ("ok", "degraded", "failed")
            )
            if done >= n:
                return
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            time.sleep(0.1)
        raise AssertionError(f"fewer than {n} cycles in {timeout_s} s")

    def stop(
        self, timeout_s: float = 5.0, signum: signal.Signals = signal.SIGTERM
    ) -> tuple[int, float]:
        """SIGTERM (or `signum`); (exit code, seconds it took)."""
        t0 = time.monotonic()
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout=timeout_s)
        finally:
            self.kill()
        return code, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._log.close()

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert match is not None
        return int(match.group(1)) * 1024


class _Remembering:
    """The loop's source, remembering its last snapshot's jobs (for TokensForEveryJob)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.jobs: list[str] = []

    def observe(self, now_s: float) -> Any:
        snapshot = self.inner.observe(now_s)
        self.jobs = sorted({str(j) for j in snapshot.job.tolist() if j})
        return snapshot


class TokensForEveryJob:
    """A hand-written fake Prometheus: every job of the twin serves `tokens_per_s` (vLLM's
    generated-tokens rate); the latency quantiles answer nothing."""

    def __init__(self, source: _Remembering, tokens_per_s: float) -> None:
        self.source = source
        self.tokens_per_s = tokens_per_s

    def query(self, expr: str, now_s: float) -> list[dict[str, Any]]:
        if "histogram_quantile" in expr:
            return []
        return [
            {"metric": {"hpc_job": job}, "value": [now_s, str(self.tokens_per_s)]}
            for job in self.source.jobs
        ]


def serve_tokens(daemon: Daemon, tokens_per_s: float = 1000.0) -> None:
    """The daemon's twin source through the real application-throughput join, every job serving
    vLLM tokens (the twin's own services are not scraped by a twin-sourced daemon)."""
    from agent.observe.app_throughput import AppSourceConfig, AppThroughputSource

    loop = daemon.runtime.loop
    remembering = _Remembering(loop.source)
    spec = AppSourceConfig(server="vllm").spec()  # type: ignore[arg-type]
    query = TokensForEveryJob(remembering, tokens_per_s)
    loop.source = AppThroughputSource(remembering, query, [spec])

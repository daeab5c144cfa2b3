"""Chaos with real processes (issue 28): the node daemon SIGKILLed and restarted 20 times under a
running agent (`ooda run`, caps through the node daemon), then the agent killed too.

The node daemon is the real one (`NodeDaemon`, its lease table, uvicorn on a Unix socket) over
GPUs whose limits live in a file (tests/file_gpu_node.py), so they outlive the process as a real
GPU's limit does. A monitor reads the GPUs' limits and the daemon's view every 0.1 s: a GPU
capped above the fallback without a lease (the daemon down, or up and not holding a lease on it)
is exposed, and no exposure may last a lease. At the end every GPU is at the fallback (or lower,
or released to its default) within one lease of the agent's death, although the daemon that
granted its lease was killed too.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.adapters.twin import twin_spec
from agent.config import parse_config
from agent.sim.twin import Twin
from tests.file_gpu_node import DEFAULT_W, FALLBACK_W, FileGpus
from tests.node_helpers import unix_client, write_token

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LEASE_S = 8.0
GPUS = 4
RESTARTS = 20
ROOT = Path(__file__).resolve().parent.parent.parent


class Node:
    """`python -m tests.file_gpu_node` as a process, killed and started again at will."""

    def __init__(self, root: Path, uuids: list[str]) -> None:
        self.root = root
        self.sock = root / "node.sock"
        self.args = [str(root / "gpus.json"), str(self.sock), str(root / "token"),
                     str(root / "leases.json"), *uuids]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.file_gpu_node", *self.args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            try:
                with unix_client(self.sock) as c:
                    if c.get("/healthz", timeout=0.5).status_code == 200:
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError("the node daemon did not come up")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None


class Monitor(threading.Thread):
    """Every 0.1 s: each GPU's limit (the file) and the daemon's state for it (None: down)."""

    def __init__(self, gpus: FileGpus, sock: Path, token: str) -> None:
        super().__init__(daemon=True)
        self.gpus, self.sock, self.token = gpus, sock, token
        self.stop = threading.Event()
        self.exposed_since: list[float | None] = [None] * GPUS
        self.longest_s = [0.0] * GPUS
        self.worst: list[dict[str, Any]] = []

    def view(self) -> list[dict[str, Any]] | None:
        try:
            with unix_client(self.sock, self.token) as c:
                r = c.get("/v1/gpus", timeout=0.5)
            return list(r.json()) if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def run(self) -> None:
        while not self.stop.wait(0.1):
            limits = self.gpus.read()
            view = self.view()
            now = time.monotonic()
            for k, limit_w in enumerate(limits):
                held = view is not None and view[k]["state"] in ("leased", "default")
                exposed = FALLBACK_W + 0.5 < limit_w < DEFAULT_W and not held
                since = self.exposed_since[k]
                if exposed and since is None:
                    self.exposed_since[k] = now
                elif exposed and since is not None:
                    if now - since > self.longest_s[k]:
                        self.longest_s[k] = now - since
                        self.worst.append({"gpu": k, "limit_w": limit_w, "view": view})
                elif not exposed:
                    self.exposed_since[k] = None


def agent_config(root: Path) -> dict[str, Any]:
    return {
        "dry_run": False,
        "source": {"kind": "twin"},
        "cluster": {"name": f"chaos-{uuid.uuid4().hex[:6]}"},
        # Four busy H100s under 2,200 W: caps of about 550 W, above the 400 W fallback.
        "twin": {
            "nodes": 1,
            "gpus_per_node": GPUS,
            "seed": 3,
            "occupancy": 1.0,
            "budget_w": 2200.0,
        },
        "policies": {"power_budget": {}},
        "actuators": {
            "caps": "node",
            "placement": "none",
            "lease_s": LEASE_S,
            "node": {
                "endpoints": {"node1": f"unix://{root / 'node.sock'}"},
                "token_file": str(root / "token"),
                "timeout_s": 1.0,
                "renew_min_age_s": 0.0,
            },
        },
        "daemon": {"interval_s": 1.0, "state_dir": str(root / "state")},
        "audit": {"path": "audit.jsonl"},
    }


def toml(data: dict[str, Any], prefix: str = "") -> str:
    """The small TOML this test needs (tables of scalars and one inline table of strings)."""
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict) and key != "endpoints":
            tables.append((f"{prefix}{key}", value))
        elif isinstance(value, dict):
            inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items())
            lines.append(f"{key} = {{ {inner} }}")
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    out = "\n".join(lines) + "\n"
    for name, table in tables:
        out += f"\n[{name}]\n" + toml(table, f"{name}.")
    return out


def test_node_daemon_killed_and_restarted_20_times_under_a_running_agent(
    short_dir: Path,
) -> None:
    token = write_token(short_dir / "token")
    data = agent_config(short_dir)
    (short_dir / "agent.toml").write_text(toml(data))
    uuids = [str(u) for u in Twin(twin_spec(parse_config(data).twin)).uuid]
    node = Node(short_dir, uuids)
    node.start()
    gpus = FileGpus(short_dir / "gpus.json", GPUS)
    log = (short_dir / "agent.log").open("wb")
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "run",
            "--config",
            str(short_dir / "agent.toml"),
            "--metrics-listen",
            "off",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    log.close()

    def agent_log() -> str:
        return (short_dir / "agent.log").read_text()[-3000:]

    monitor = Monitor(gpus, node.sock, token)
    try:
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and not all(w < DEFAULT_W for w in gpus.read()):
            assert agent.poll() is None, agent_log()
            time.sleep(0.2)
        capped = gpus.read()
        assert all(FALLBACK_W < w < DEFAULT_W for w in capped), (capped, agent_log())
        monitor.start()
        rng = random.Random(28)
        for _ in range(RESTARTS):
            time.sleep(rng.uniform(0.5, 3.0))
            node.kill()
            time.sleep(rng.uniform(0.1, 1.0))
            node.start()
        assert agent.poll() is None, agent_log()
        # The last round: the daemon dies, the agent dies while it is down, the daemon comes
        # back with nobody left to renew anything.
        node.kill()
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        node.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < LEASE_S + 2.0:
            if all(w <= FALLBACK_W + 0.5 or w == DEFAULT_W for w in gpus.read()):
                break
            time.sleep(0.1)
        fallen_after_s = time.monotonic() - t0
        final = gpus.read()
    finally:
        monitor.stop.set()
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        node.kill()
    assert all(w <= FALLBACK_W + 0.5 or w == DEFAULT_W for w in final), final
    assert fallen_after_s <= LEASE_S + 1.0, fallen_after_s
    longest = max(monitor.longest_s)
    assert longest < LEASE_S, (monitor.longest_s, monitor.worst[-3:])

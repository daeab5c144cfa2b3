"""The node daemon under half-open connections: how fast the agent's requests are answered.

Starts `ooda node serve --backend sim` as a process under RLIMIT_NOFILE 2048 (the unit's
LimitNOFILE), a client holding N half-open connections (bench/_slowloris.py: the start of a
request line, then a byte a second, reopened a second after the daemon closes one), and then
sends the agent's requests, each on a new connection, alternately GET /v1/gpus/0 and a cap PUT.

Prints one JSON line per N: connections, requests, failures (and with what), p50_ms, p99_ms,
max_ms, the connections the daemon shed by reason (its /metrics), and the attacker's counts
(opened, closed_by_server, most_open).

    python bench/node_half_open.py --json [--connections 0 --connections 1000] [--requests 200]
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def serve_process(
    root: Path, fd_limit: int, *args: str, stderr: int = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    """`ooda node serve --backend sim` (token and socket in `root`) under RLIMIT_NOFILE
    `fd_limit`."""
    limited = ["sh", "-c", f'ulimit -n {fd_limit} && exec "$@"', "sh"]
    command = [*limited, sys.executable, "-m", "agent", "node", "serve", "--backend", "sim",
               "--sim-gpus", "2", "--token-file", str(root / "token"),
               "--socket", str(root / "node.sock"), "--fallback-cap-w", "400", *args]  # fmt: skip
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)


def agent_client(sock: Path, token: str) -> httpx.Client:
    """One client that keeps no connection: each request opens a new one (the worst case: it
    must get in among the half-open ones), without building a client (and its TLS context)
    each time, which would be timed too."""
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(sock)),
        base_url="http://node",
        headers={"Authorization": f"Bearer {token}"},
        timeout=5.0,
        limits=httpx.Limits(max_keepalive_connections=0),
    )


def _attack(sock: Path, connections: int, duration_s: float) -> subprocess.Popen[str]:
    """The half-open client, once it holds its connections (and their first deadlines passed)."""
    attacker = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "_slowloris.py"), str(sock), str(connections),
         str(duration_s)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert attacker.stdout is not None
    attacker.stdout.readline()  # ready
    time.sleep(2.0)
    return attacker


def timed_requests(clients: list[httpx.Client], count: int) -> tuple[list[list[float]], list[str]]:
    """`count` rounds of the agent's requests, one to each client in turn, alternately GET and
    a cap PUT: each client's latencies (s), and every failure."""
    latencies: list[list[float]] = [[] for _ in clients]
    failures: list[str] = []
    for k in range(count):
        for client, times in zip(clients, latencies, strict=True):
            t0 = time.monotonic()
            try:
                if k % 2:
                    r = client.put("/v1/gpus/1/cap", json={"watts": 450, "lease_s": 30})
                else:
                    r = client.get("/v1/gpus/0")
                if r.status_code != 200:
                    failures.append(f"HTTP {r.status_code}: {r.text[:80]}")
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
            times.append(time.monotonic() - t0)
        time.sleep(0.02)
    return latencies, failures


def _shed(client: httpx.Client) -> dict[str, float]:
    """The daemon's shed connections by reason (its /metrics)."""
    page = client.get("/metrics").text
    return {
        line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in page.splitlines()
        if line.startswith("ooda_node_connections_shed_total{")
    }


def _attacker_stats(attacker: subprocess.Popen[str]) -> dict[str, Any]:
    attacker.terminate()
    out, _ = attacker.communicate(timeout=10)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    stats: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    return stats


def run(connections: int, requests: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="ooda-bh-"))
    token = secrets.token_urlsafe(24)
    (root / "token").write_text(token + "\n")
    (root / "token").chmod(0o600)
    sock = root / "node.sock"
    daemon = serve_process(root, 2048)
    attacker: subprocess.Popen[str] | None = None
    stats: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 30.0
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if connections:
            attacker = _attack(sock, connections, requests * 0.05 + 15.0)
        with agent_client(sock, token) as client:
            (latencies,), why = timed_requests([client], requests)
            shed = _shed(client)
        if attacker is not None:
            stats = _attacker_stats(attacker)
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
        daemon.kill()
        daemon.wait()
        shutil.rmtree(root, ignore_errors=True)
    ms = np.asarray(latencies) * 1000
    return {
        "connections": connections,
        "requests": requests,
        "failures": len(why),
        "failed_with": sorted(set(why))[:5],
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "max_ms": round(float(ms.max()), 1),
        "shed": shed,
        "attacker": stats,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, action="append")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="JSON lines (the default output)")
    args = parser.parse_args()
    for n in args.connections or [0, 1000]:
        print(json.dumps(run(n, args.requests)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

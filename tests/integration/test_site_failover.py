"""Two replicas of one cluster's agent, for real, against a long-term store: `ooda sim serve`
(dcgm-style exporters and a node daemon per node), VictoriaMetrics scraping it (Debian's
victoria-metrics: the agent reads it as it reads Prometheus), etcd for the election, and two
`ooda run` sharing one audit log.

1. The first replica leads: it caps the GPUs through the node daemons, under leases. The second
   observes and orients every cycle (its models stay warm), acts on nothing and says so.
2. The leader reloads with a lower cluster budget (SIGHUP): its link to the site carries over,
   it keeps leading (the standby never acts) and caps the GPUs again, after the standby started.
3. SIGKILL the leader: the standby takes over within two intervals, reads what the leader did
   since it started from the shared audit log (as after a restart) into its ledger, adopts its
   caps and leases, and repeats no action: no cap it sets is the one already in force.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import last_json
from tests.daemon_helpers import DaemonProcess, write
from tests.integration.site_services import Etcd, VictoriaMetrics
from tests.node_helpers import node_gpus, sim_serve_line

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INTERVAL_S = 3.0


def replica_toml(
    name: str,
    vm: str,
    etcd: str,
    sockets: dict[str, str],
    tmp: Path,
    budget: str = "",
) -> str:
    endpoints = ", ".join(f'{node} = "{url}"' for node, url in sorted(sockets.items()))
    return f"""
dry_run = false

[cluster]
name = "fo"
{budget}

[source]
kind = "prometheus"

[source.prometheus]
url = "{vm}"
scrape_interval_s = 1

[actuators]
caps = "node"
placement = "none"
lease_s = 30

[actuators.node]
endpoints = {{ {endpoints} }}
token_file = "{tmp / "node.token"}"
renew_min_age_s = 0

[policies.power_budget]

[daemon]
interval_s = {INTERVAL_S}

[audit]
path = "{tmp / "audit.jsonl"}"

[site]
name = "hall"
safe_share_w = 2400
replica = "{name}"
peer_listen = "127.0.0.1:0"
peer_token_file = "{tmp / "peer.token"}"

[site.etcd]
endpoints = ["{etcd}"]
timeout_s = 0.5
"""


def unix(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def test_standby_takes_over_within_two_intervals_and_repeats_nothing(tmp_path: Path) -> None:
    if Etcd.binary() is None or VictoriaMetrics.binary() is None:
        pytest.skip("etcd or victoria-metrics not installed (make test installs them)")
    token = write_tokens(tmp_path)
    sockets_dir = tmp_path / "sock"
    sockets_dir.mkdir()
    serve = subprocess.Popen(
        [sys.executable, "-m", "agent", "sim", "serve", "--nodes", "2", "--gpus-per-node", "4",
         "--port-base", "0", "--json", "--node-token-file", str(tmp_path / "node.token"),
         "--node-socket-dir", str(sockets_dir), "--fallback-cap-w", "300", "--seed", "2"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    (tmp_path / "etcd").mkdir()
    (tmp_path / "vm").mkdir()
    etcd = Etcd(tmp_path / "etcd").start()
    vm: VictoriaMetrics | None = None
    replicas: list[DaemonProcess] = []
    try:
        info = last_json(sim_serve_line(serve, 30))
        sockets: dict[str, str] = info["node_api"]
        vm = VictoriaMetrics(tmp_path / "vm", info["targets"]).start()
        configs = {
            name: write(tmp_path / f"{name}.toml",
                        replica_toml(name, vm.url, etcd.url, sockets, tmp_path))
            for name in ("a", "b")
        }  # fmt: skip
        a = start_replica("a", configs["a"], tmp_path, "leader", replicas)
        b = start_replica("b", configs["b"], tmp_path, "standby", replicas)

        # 1. a caps the GPUs (8 H100 under 2400 W); b only observes and says so.
        wait_leased(sockets, token, 8, a)
        standby = [e for e in b.events() if e.get("event") == "cycle_summary"]
        assert standby and all(
            any("standby: a leads cluster fo" in x for x in e["errors"] or []) for e in standby
        )
        assert all(e["gpus"] == 8 for e in standby[-2:])  # it sees the fleet (from VM)
        assert all(not e["actions"] for e in standby)

        # 2. a reloads under a lower local budget: the same [site], so the same link (its etcd
        # session): a leads on and caps again; b stays a standby.
        reload_leader(a, configs["a"], replica_toml("a", vm.url, etcd.url, sockets, tmp_path,
                                                    budget="budget_w = 1800"))  # fmt: skip
        b_started = unix(b.wait_event("started"))
        recapped = [
            r for r in audit(tmp_path) if r["event"] == "action" and unix_time(r) > b_started
        ]
        assert recapped, "a set no cap after b started"
        assert not [e for e in b.events() if e.get("event") == "site_leadership"
                    and e.get("role") == "leader"]  # fmt: skip

        # 3. Kill the leader: b acts within two intervals, on the record of a's actions.
        time.sleep(INTERVAL_S)
        records_before = audit(tmp_path)
        killed = time.time()
        a.kill()
        took = b.wait_event("took_over", timeout_s=20)
        assert unix(took) - killed <= 2 * INTERVAL_S, unix(took) - killed
        # What a did since b started (before it, b read at its own start) is read back now,
        # into b's ledger, before b decides anything: a's caps, seen in force, become b's.
        assert took["records"] >= 2, took  # the reload's decision and action at least
        adopted = b.wait_event(
            "guard_caps_recovered", timeout_s=10, where=lambda e: unix(e) >= unix(took)
        )
        assert adopted["adopted"] == 8, adopted
        time.sleep(3 * INTERVAL_S)
        # Its leases: adopted and renewed (a's would be down to about 20 s by now).
        fresh = [g["lease_remaining_s"] for u in sockets.values() for g in node_gpus(u, token)]
        assert all(r is not None and r >= 30 - 2 * INTERVAL_S for r in fresh), fresh
        # No action repeated: nothing b did sets a GPU to the cap a had already set on it.
        assert not repeated(records_before, audit(tmp_path)[len(records_before) :])
        cycles = [
            e for e in b.events() if e.get("event") == "cycle_summary" and unix(e) > unix(took)
        ]
        assert cycles and not any("standby" in x for e in cycles for x in (e["errors"] or []))
    finally:
        for replica in replicas:
            replica.kill()
        if vm is not None:
            vm.stop()
        etcd.stop()
        serve.terminate()
        serve.wait(timeout=10)


def unix_time(record: dict[str, Any]) -> float:
    return float(record["time_s"])  # the agent's clock reads Unix time here (a real source)


def reload_leader(leader: DaemonProcess, config: Path, text: str) -> None:
    """Rewrite the leader's config and SIGHUP it; wait until it capped under the new budget."""
    before = len(leader.events())
    config.write_text(text)
    leader.proc.send_signal(signal.SIGHUP)
    leader.wait_event("config_reloaded", timeout_s=20, after=before)
    leader.wait_event(
        "cycle_summary", timeout_s=20, after=before, where=lambda e: e.get("budget_w") == 1800.0
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        summaries = [e for e in leader.events()[before:] if e.get("event") == "cycle_summary"]
        if any(e["actions"] for e in summaries):
            return
        time.sleep(0.2)
    raise AssertionError(leader.log_path.read_text()[-3000:])


def write_tokens(tmp: Path) -> str:
    """The node daemons' token and the replicas' peer token; the first is returned."""
    tokens = {}
    for name in ("node.token", "peer.token"):
        tokens[name] = secrets.token_urlsafe(24)
        (tmp / name).write_text(tokens[name] + "\n")
        (tmp / name).chmod(0o600)
    return tokens["node.token"]


def start_replica(
    name: str, config: Path, tmp: Path, role: str, started: list[DaemonProcess]
) -> DaemonProcess:
    replica = DaemonProcess(config, tmp / f"state-{name}", tmp / f"{name}.log",
                            env={"OODA_LOG_LEVEL": "debug"})  # fmt: skip
    started.append(replica)
    replica.started().wait_event("site_leadership", where=lambda e: e.get("role") == role)
    return replica


def wait_leased(sockets: dict[str, str], token: str, n: int, leader: DaemonProcess) -> None:
    deadline = time.monotonic() + 60
    leased: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(leased) < n:
        leased = [g for u in sockets.values() for g in node_gpus(u, token)
                  if g["lease_remaining_s"] is not None]  # fmt: skip
        time.sleep(0.5)
    assert len(leased) == n, leader.log_path.read_text()[-3000:]


def repeated(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """(GPU, watts) of every cap set after `before` that was already in force by it."""
    in_force = last_caps(before)
    return [
        (target, watts)
        for r in after
        if r["event"] == "action" and r["kind"] == "set_power_cap"
        for target, watts in zip(r["target"], r["after"], strict=True)
        if in_force.get(target) == watts
    ]


def audit(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def last_caps(records: list[dict[str, Any]]) -> dict[str, float]:
    """GPU -> the last cap applied to it by an action on record."""
    caps: dict[str, float] = {}
    for r in records:
        if r.get("event") == "action" and r.get("outcome") == "applied":
            if r["kind"] == "set_power_cap":
                caps.update(zip(r["target"], r["after"], strict=True))
            elif r["kind"] == "release_power_cap":
                for target in r["target"]:
                    caps.pop(target, None)
    return caps

"""Issue 6's acceptance scenarios, driven by the agent's own loop against a real Slurm.

The twin stands in for the GPUs (its jobs are Slurm's: the job mirror), and everything else is
real: the orienter reads the twin's XIDs, `health_drain` decides, the guard reviews, the Slurm
actuator drains, requeues and resumes through scontrol against a real slurmctld with 4 slurmd
(tests/integration/slurm_cluster.py). The twin runs on its virtual clock, one control interval per
cycle, so minutes of cluster time take seconds; where Slurm itself must move (a requeued job
restarting), the loop keeps cycling at the same twin time until it has.

1. An XID 79 on node2/gpu1: node2 drained (`ooda:` reason), its job requeued and running
   elsewhere, new work lands elsewhere; once the fault clears and the hold passes, node2 resumed.
2. A node an admin drained is never resumed, however long it stays healthy.
3. XIDs on 3 of 4 nodes with a breaker at 2: the third drain trips the breaker, which stays open
   across cycles and a daemon restart (state persisted), until `ooda guard reset`.
4. Dry-run: the same scenarios record the same actions in the same order and change nothing in
   Slurm or on any GPU.
5. Caps through real node daemons (no Slurm): the loop renews their leases every cycle; when it
   stops, each lease expires to the fallback cap, and the next cycle sets the caps again.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.act.audit import read_records
from agent.adapters.twin import twin_spec
from agent.assembly import Agent, assemble
from agent.config import Config, parse_config
from agent.daemon.service import Daemon, DaemonOptions
from agent.loop import CycleReport
from agent.node.server import NodeDaemon, NodeSettings
from agent.sim.devices import TwinNodeBackend
from agent.sim.twin import Twin
from tests.conftest import last_json
from tests.integration.alertmanager import Alertmanager
from tests.integration.conftest import ooda
from tests.integration.slurm_cluster import SlurmCluster, wait_until
from tests.node_helpers import unix_client, write_token

pytestmark = pytest.mark.integration

INTERVAL_S = 15.0
HOLD_S = 60.0  # health_drain's resume_hold_s
COOLDOWN_S = 30.0  # the guard's node_cooldown_s
FAULT_AT_S, FAULT_FOR_S = 30.0, 90.0
BUDGET_W = 3500.0
NODE_KINDS = ("drain_node", "resume_node", "requeue_job")
NODES = ("node1", "node2", "node3", "node4")


def base_config(
    slurm: SlurmCluster, tmp_path: Path, dry_run: bool, faults: list[str]
) -> dict[str, Any]:
    return {
        "dry_run": dry_run,
        "source": {"kind": "twin"},  # a file names its source (the twin only when asked)
        "cluster": {"name": f"e2e-{uuid.uuid4().hex[:6]}"},
        "twin": {"nodes": 4, "gpus_per_node": 4, "seed": 5, "faults": faults},
        "policies": {"health_drain": {"resume_hold_s": HOLD_S}},
        "actuators": {
            "caps": "twin",
            "placement": "slurm",
            "slurm": {"slurm_conf": str(slurm.slurm_conf), "timeout_s": 10},
        },
        "guard": {"node_cooldown_s": COOLDOWN_S},
        "daemon": {"interval_s": INTERVAL_S, "state_dir": str(tmp_path / "state")},
        "audit": {"path": str(tmp_path / "audit.jsonl")},
    }


def slurm_view(slurm: SlurmCluster) -> dict[str, tuple[Any, ...]]:
    """What the agent could change in Slurm, per node: drained or not, the reason, the weight,
    the features (Slurm's own flags, such as a busy slurmd's NOT_RESPONDING, are not ours)."""
    keys = ("reason", "weight", "features", "active_features")
    return {
        name: ("DRAIN" in n["state_flags"], *(str(n[k]) for k in keys))
        for name, n in slurm.nodes().items()
    }


def acted(records: list[dict[str, Any]], jobs: dict[str, str]) -> list[tuple[str, str, float]]:
    """(kind, target, twin time) of every node or job action, job ids named by their role."""
    return [
        (r["kind"], jobs.get(str(r["target"]), str(r["target"])), float(r["time_s"]))
        for r in records
        if r["event"] == "action" and r["kind"] in NODE_KINDS
    ]


# -- 1 and 4: an XID 79 on node2, live and in dry-run ---------------------------------------------


@dataclass
class XidRun:
    jobs: dict[str, str] = field(default_factory=dict)  # Slurm job id -> role
    records: list[dict[str, Any]] = field(default_factory=list)
    reports: list[CycleReport] = field(default_factory=list)
    seen: dict[str, Any] = field(default_factory=dict)  # what Slurm said along the way
    caps_before_w: tuple[Any, ...] = ()  # the twin's (power limits, enforced limits), W
    caps_after_w: tuple[Any, ...] = ()


def run_xid_on_node2(slurm: SlurmCluster, tmp_path: Path, dry_run: bool) -> XidRun:
    """The same twin schedule live and in dry-run: a cycle every 15 s of twin time to t=240 s;
    live, after the requeue, extra cycles at the same twin time until Slurm has restarted the
    job (they decide nothing new)."""
    run = XidRun()
    for node in ("node1", "node3", "node4"):  # steer the first job onto node2 without pinning it
        slurm.scontrol("update", f"nodename={node}", "weight=10")
    victim = slurm.sbatch(gpus=2)
    slurm.wait_job(victim, ["RUNNING"])
    bystander = slurm.sbatch(gpus=4)
    slurm.wait_job(bystander, ["RUNNING"])
    run.jobs = {victim: "victim", bystander: "bystander"}
    run.seen["victim_before"] = slurm.job(victim)["nodes"]
    run.seen["bystander_before"] = slurm.job(bystander)["nodes"]
    run.seen["slurm_before"] = slurm_view(slurm)

    fault = f"xid=79:node2/gpu1@{FAULT_AT_S:g}+{FAULT_FOR_S:g}"
    data = base_config(slurm, tmp_path, dry_run, [fault])
    # power_budget too, under a budget the jobs exceed: caps are decided (and, in dry-run, must
    # reach no GPU).
    data["policies"]["power_budget"] = {}
    data["twin"]["budget_w"] = BUDGET_W
    config = parse_config(data)
    runtime = assemble(config)
    twin = runtime.twin
    assert twin is not None
    run.caps_before_w = (twin.cap_w.copy(), twin.enforced_w.copy())
    try:
        while twin.t_s < 240.0:
            twin.run_until(twin.t_s + INTERVAL_S)
            report = runtime.loop.cycle()
            run.reports.append(report)
            assert not report.errors, report.errors
            kinds = {a.intent.kind for a in report.actions}
            if "drain_node" in kinds:
                run.seen["drained_at_s"] = twin.t_s
                run.seen["node2_after_drain"] = slurm.node("node2")
            if "requeue_job" in kinds and not dry_run:
                wait_for_restart(runtime, slurm, victim, run)
            if "resume_node" in kinds:
                run.seen["resumed_at_s"] = twin.t_s
        run.seen["slurm_after"] = slurm_view(slurm)
        run.seen["victim_after"] = slurm.job(victim)
        run.caps_after_w = (twin.cap_w.copy(), twin.enforced_w.copy())
    finally:
        runtime.close()
    run.records = list(read_records(tmp_path / "audit.jsonl"))
    return run


def wait_for_restart(runtime: Agent, slurm: SlurmCluster, job: str, run: XidRun) -> None:
    """Cycle at the same twin time until the requeued job runs again (the Slurm actuator lifts
    the requeue's begin-time delay as it reads node states each cycle), then submit new work."""

    def restarted() -> bool:
        report = runtime.loop.cycle()
        run.reports.append(report)
        assert not report.errors, report.errors
        assert not [a for a in report.actions if a.intent.kind in NODE_KINDS], report.actions
        info = slurm.job(job)
        return bool(info["job_state"] == "RUNNING" and info["restart_cnt"] >= 1)

    wait_until(restarted, 30, f"the requeued job {job} to run again")
    run.seen["victim_requeued"] = slurm.job(job)
    newcomer = slurm.sbatch(gpus=1)
    slurm.wait_job(newcomer, ["RUNNING"])
    run.jobs[newcomer] = "newcomer"
    run.seen["newcomer"] = slurm.job(newcomer)


def test_xid_on_node2_drains_requeues_and_resumes_through_the_loop(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    run = run_xid_on_node2(slurm, tmp_path, dry_run=False)
    assert run.seen["victim_before"] == "node2" and run.seen["bystander_before"] != "node2"

    # Drained by the loop's own cycle once the XID showed, with our reason.
    node2 = run.seen["node2_after_drain"]
    assert "DRAIN" in node2["state_flags"]
    assert node2["reason"].startswith("ooda: health: gpu1 xid:79"), node2["reason"]
    assert FAULT_AT_S <= run.seen["drained_at_s"] <= FAULT_AT_S + INTERVAL_S

    # The job that hit the fault was requeued and runs again, off node2; new work lands elsewhere.
    victim = run.seen["victim_requeued"]
    assert victim["restart_cnt"] == 1 and "node2" not in victim["nodes"]
    assert "node2" not in run.seen["newcomer"]["nodes"]

    # After the fault cleared and the hold passed, the agent resumed node2 (its first cycle
    # seeing the fault gone starts the hold; the guard's cooldown is long past).
    cleared_s = FAULT_AT_S + FAULT_FOR_S
    assert cleared_s + HOLD_S <= run.seen["resumed_at_s"] <= cleared_s + HOLD_S + 2 * INTERVAL_S
    # In service again: no flags, no reason, weight and features as they were.
    assert run.seen["slurm_after"] == run.seen["slurm_before"]
    assert run.seen["victim_after"]["restart_cnt"] == 1  # requeued once, never again
    # The loop's own view agrees: the twin's GPUs carry the victim off node2 now.
    last = run.reports[-1].snapshot
    victim = next(j for j, role in run.jobs.items() if role == "victim")
    rows = np.flatnonzero(last.job == victim)
    assert rows.size == 2 and not (last.node_names[last.node[rows]] == "node2").any()

    # The audit trail: the drain, the requeue and the resume, applied, each with its evidence.
    assert [(k, t) for k, t, _ in acted(run.records, run.jobs)] == [
        ("drain_node", "node2"),
        ("requeue_job", "victim"),
        ("resume_node", "node2"),
    ]
    actions = [r for r in run.records if r["event"] == "action" and r["kind"] in NODE_KINDS]
    assert all(a["outcome"] == "applied" and not a["dry_run"] for a in actions)
    drain, requeue, resume = actions
    assert drain["evidence"]["gpus"] == ["gpu1"] and drain["evidence"]["codes"] == ["xid:79"]
    assert requeue["evidence"]["code"] == "xid:79"
    assert "requeue" in requeue["evidence"]["remediation"]
    assert requeue["after"]["node"] == "node2"
    assert cleared_s <= resume["evidence"]["healthy_since_s"] <= cleared_s + INTERVAL_S
    decisions = {r["decision_id"]: r for r in run.records if r["event"] == "decision"}
    for action in actions:
        decision = decisions[action["decision_id"]]
        assert decision["policy"] == "health_drain" and decision["evidence"] == action["evidence"]


def test_dry_run_of_the_xid_records_the_same_actions_and_changes_nothing(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    slurm_cluster.reset()
    live = run_xid_on_node2(slurm_cluster, tmp_path / "live", dry_run=False)
    slurm_cluster.reset()
    dry = run_xid_on_node2(slurm_cluster, tmp_path / "dry", dry_run=True)

    # The same actions, on the same targets, at the same twin times, in the same order.
    assert acted(dry.records, dry.jobs) == acted(live.records, live.jobs)
    assert [k for k, _, _ in acted(dry.records, dry.jobs)] == [
        "drain_node",
        "requeue_job",
        "resume_node",
    ]
    actions = [r for r in dry.records if r["event"] == "action"]
    assert all(a["outcome"] == "recorded" and a["dry_run"] for a in actions)
    caps = [a for a in actions if a["kind"] == "set_power_cap"]
    assert caps and len(caps[0]["target"]) == 16  # caps were decided for every GPU ...
    # Nothing changed in Slurm: node states, reasons, weights, features; the job never moved.
    assert dry.seen["slurm_after"] == dry.seen["slurm_before"]
    assert "DRAIN" not in dry.seen["node2_after_drain"]["state_flags"]
    assert dry.seen["victim_after"]["restart_cnt"] == 0
    assert dry.seen["victim_after"]["nodes"] == "node2"
    # ... and nothing reached any GPU: every limit as it was (live, the caps took effect).
    for before, after in zip(dry.caps_before_w, dry.caps_after_w, strict=True):
        assert np.array_equal(before, after)
    assert not np.array_equal(live.caps_before_w[0], live.caps_after_w[0])


# -- 2: a node an admin drained ---------------------------------------------------------------


def test_a_node_an_admin_drained_is_never_resumed(slurm: SlurmCluster, tmp_path: Path) -> None:
    """node4: drained by an admin from the start. node3: drained by us for an XID, then taken
    over by an admin (the reason rewritten). Both stay healthy for far longer than the hold; the
    agent resumes neither and does nothing else to them."""
    slurm.scontrol("update", "nodename=node4", "state=drain", "reason=admin: reseat the riser")
    fault = f"xid=79:node3/gpu0@{FAULT_AT_S:g}+{FAULT_FOR_S:g}"
    config = parse_config(base_config(slurm, tmp_path, False, [fault]))
    runtime = assemble(config)
    twin = runtime.twin
    assert twin is not None
    try:
        taken_over = False
        while twin.t_s < 480.0:  # the fault clears at 120 s; the hold is 60 s
            twin.run_until(twin.t_s + INTERVAL_S)
            report = runtime.loop.cycle()
            assert not report.errors, report.errors
            nodes = report.situation.nodes
            assert nodes is not None and nodes.drained[3] and not nodes.drained_by_us[3]
            if not taken_over and any(a.intent.kind == "drain_node" for a in report.actions):
                assert slurm.node("node3")["reason"].startswith("ooda: health: gpu0 xid:79")
                slurm.scontrol(
                    "update", "nodename=node3", "state=drain", "reason=admin: RMA, keep out"
                )
                taken_over = True
        assert taken_over
    finally:
        runtime.close()
    final = slurm.nodes()
    assert "DRAIN" in final["node3"]["state_flags"]
    assert final["node3"]["reason"] == "admin: RMA, keep out"
    assert "DRAIN" in final["node4"]["state_flags"]
    assert final["node4"]["reason"] == "admin: reseat the riser"
    records = list(read_records(tmp_path / "audit.jsonl"))
    assert [(k, t) for k, t, _ in acted(records, {})] == [("drain_node", "node3")]
    assert not [r for r in records if r.get("target") == "node4"]  # never even considered
    assert not [r for r in records if r.get("kind") == "resume_node"]


# -- 3 and 4: the circuit breaker, across a restart, until `ooda guard reset` -------------------


def breaker_config(
    slurm: SlurmCluster, tmp_path: Path, dry_run: bool, alertmanager: Alertmanager
) -> tuple[Path, str]:
    """XID 79 on node1, node2 and node3 from t=10 s; at most 2 nodes (or 50 %) drained by us."""
    data = base_config(slurm, tmp_path, dry_run, [f"xid=79:node{k}/gpu1@10" for k in (1, 2, 3)])
    data["guard"] |= {"breaker_max_nodes": 2, "breaker_max_pct": 50.0, "drain_rate_max": 10}
    data["actuators"]["notify"] = {"kind": "alertmanager", "url": alertmanager.url}
    data["twin"]["speed"] = 0.0  # the daemon's pacer moves the twin one interval per cycle
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "agent.toml"
    path.write_text(toml(data))
    return path, str(data["cluster"]["name"])


def toml(data: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for the config above (tables, strings, numbers, booleans, lists)."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((f"{prefix}{key}", value))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    out = "\n".join(lines) + "\n"
    for name, table in tables:
        out += f"\n[{name}]\n" + toml(table, f"{name}.")
    return out


@dataclass
class BreakerRun:
    records: list[dict[str, Any]] = field(default_factory=list)
    reports: list[CycleReport] = field(default_factory=list)
    seen: dict[str, Any] = field(default_factory=dict)


def start_daemon(config: Path) -> Daemon:
    daemon = Daemon(DaemonOptions(config_path=config, metrics_listen=None))
    daemon.start()
    return daemon


def cycles(daemon: Daemon, n: int, run: BreakerRun) -> list[CycleReport]:
    out = []
    for _ in range(n):
        report = daemon.run_cycle()
        assert report is not None
        out.append(report)
    run.reports.extend(out)
    return out


def run_breaker(
    slurm: SlurmCluster, tmp_path: Path, dry_run: bool, alertmanager: Alertmanager
) -> BreakerRun:
    """Cycles until the breaker trips and a few more; the daemon stops (state saved) and starts
    again; a few cycles; `ooda guard reset` as a separate process; a few cycles."""
    run = BreakerRun()
    config, cluster = breaker_config(slurm, tmp_path, dry_run, alertmanager)
    run.seen["cluster"] = cluster
    run.seen["slurm_before"] = slurm_view(slurm)
    daemon = start_daemon(config)
    try:
        run.seen["first"] = cycles(daemon, 4, run)
        run.seen["slurm_tripped"] = slurm_view(slurm)
    finally:
        daemon.shutdown()
    run.seen["saved_breaker"] = json.loads(daemon.store.path.read_text())["parts"]["guard"][
        "breaker"
    ]
    daemon = start_daemon(config)
    try:
        run.seen["restored"] = daemon.restored
        run.seen["after_restart"] = cycles(daemon, 3, run)
        reset = ooda("guard", "reset", "--config", str(config), "--note", "e2e: checked", "--json")
        assert reset.returncode == 0, reset.stderr
        run.seen["reset"] = last_json(reset.stdout)
        run.seen["after_reset"] = cycles(daemon, 3, run)
        run.seen["slurm_after"] = slurm_view(slurm)
    finally:
        daemon.shutdown()
    run.records = list(read_records(tmp_path / "audit.jsonl"))
    return run


def refusals(records: list[dict[str, Any]]) -> list[tuple[str, str, float, str]]:
    return [
        (r["kind"], r["target"], float(r["time_s"]), r["reason"].split(":")[0])
        for r in records
        if r["event"] == "refusal"
    ]


def test_circuit_breaker_trips_holds_across_a_restart_until_guard_reset(
    slurm: SlurmCluster, tmp_path: Path, alertmanager: Alertmanager
) -> None:
    run = run_breaker(slurm, tmp_path, dry_run=False, alertmanager=alertmanager)

    # The first cycle that sees the XIDs drains two nodes; the third drain trips the breaker.
    first = run.seen["first"]
    assert [(a.intent.kind, a.intent.target_name(), a.outcome) for a in first[0].actions][:2] == [
        ("drain_node", "node1", "applied"),
        ("drain_node", "node2", "applied"),
    ]
    (tripped,) = [r for r in first[0].refused if r.intent.target_name() == "node3"]
    assert tripped.reason.startswith("circuit breaker tripped: draining node3 would make 3")
    view = run.seen["slurm_tripped"]
    assert view["node1"][0] and view["node1"][1].startswith("ooda: health: gpu1 xid:79")
    assert view["node2"][0] and not view["node3"][0] and not view["node4"][0]

    # Open on every cycle after, before and after the restart (its state was saved and loaded):
    # node3's drain refused with the reason, the alarm raised, a critical alert sent.
    saved = run.seen["saved_breaker"]
    assert saved["open"] and saved["trips"] == 1 and "node3" in saved["reason"]
    assert run.seen["restored"]
    for report in [*first, *run.seen["after_restart"]]:
        assert any("circuit breaker OPEN" in e for e in report.errors), report.errors
        why = [r.reason for r in report.refused if r.intent.target_name() == "node3"]
        assert len(why) == 1 and why[0].startswith("circuit breaker"), why
    later = [*first[1:], *run.seen["after_restart"]]
    assert not any(a.intent.kind == "drain_node" for r in later for a in r.actions)
    alerts = [
        a["labels"]
        for a in alertmanager.alerts(cluster=run.seen["cluster"])
        if a["labels"].get("policy") == "guard"
    ]
    assert alerts and alerts[0]["severity"] == "critical"

    # `ooda guard reset` closes it: the next cycle applies the request and drains node3.
    assert run.seen["reset"]["requested"] and not run.seen["reset"]["applied"]
    after = run.seen["after_reset"]
    assert [(a.intent.kind, a.intent.target_name(), a.outcome) for a in after[0].actions] == [
        ("drain_node", "node3", "applied")
    ]
    assert not any("OPEN" in e for r in after for e in r.errors)
    assert not any(r.refused for r in after)
    view = run.seen["slurm_after"]
    assert [view[n][0] for n in NODES] == [True, True, True, False]
    assert view["node3"][1].startswith("ooda: health: gpu1 xid:79")

    # The audit trail tells it: one trip, node3 refused with the reason every cycle, the reset
    # asked for and applied, then the drain.
    events = [r["event"] for r in run.records]
    assert events.count("guard_breaker_tripped") == 1
    assert events.index("guard_reset_requested") < events.index("guard_reset")
    node3 = [r for r in run.records if r["event"] == "refusal" and r["target"] == "node3"]
    assert len(node3) == 7 and all(r["reason"].startswith("circuit breaker") for r in node3)
    reset = next(r for r in run.records if r["event"] == "guard_reset")
    assert reset["was_open"] and reset["note"] == "e2e: checked"
    assert [(k, t) for k, t, _ in acted(run.records, {})] == [
        ("drain_node", "node1"),
        ("drain_node", "node2"),
        ("drain_node", "node3"),
    ]
    assert events.index("guard_reset") < len(events) - 1 - events[::-1].index("action")


def test_dry_run_of_the_breaker_records_the_same_and_changes_nothing(
    slurm_cluster: SlurmCluster, tmp_path: Path, alertmanager: Alertmanager
) -> None:
    slurm_cluster.reset()
    live = run_breaker(slurm_cluster, tmp_path / "live", False, alertmanager)
    slurm_cluster.reset()
    dry = run_breaker(slurm_cluster, tmp_path / "dry", True, alertmanager)
    assert acted(dry.records, {}) == acted(live.records, {})
    assert refusals(dry.records) == refusals(live.records)
    assert all(
        r["outcome"] == "recorded"
        for r in dry.records
        if r["event"] == "action" and r["kind"] == "drain_node"
    )
    assert [r["event"] for r in dry.records].count("guard_breaker_tripped") == 1
    assert dry.seen["slurm_tripped"] == dry.seen["slurm_before"]
    assert dry.seen["slurm_after"] == dry.seen["slurm_before"]


# -- 5: caps through real node daemons: an expired lease falls back, the loop re-asserts ----------

# Between the agent's caps here (291 W on three GPUs, 200 W on one): a lapsed lease lowers the
# three to it and leaves the fourth (a fallback never raises a cap, issue 28).
FALLBACK_W = 250.0
LEASE_S = 1.0


def node_gpus(socket: Path, token: str) -> list[dict[str, Any]]:
    """`GET /v1/gpus` from a node daemon, as an operator would ask it."""
    with unix_client(socket, token) as client:
        answer = client.get("/v1/gpus")
    answer.raise_for_status()
    gpus: list[dict[str, Any]] = answer.json()
    return gpus


def _node_caps_config(tmp_path: Path, short: Path, token: Path) -> Config:
    """Live caps through two node daemons on Unix sockets under `short`, 1 s leases."""
    data: dict[str, Any] = {
        "dry_run": False,
        "twin": {"nodes": 2, "gpus_per_node": 2, "seed": 4, "occupancy": 1.0, "budget_w": 1200.0},
        "policies": {"power_budget": {}},
        "actuators": {
            "caps": "node",
            "placement": "none",
            "lease_s": LEASE_S,
            "node": {
                "endpoints": {f"node{k}": f"unix://{short}/node{k}.sock" for k in (1, 2)},
                "token_file": str(token),
                "timeout_s": 2.0,
                "renew_min_age_s": 0.0,
            },
        },
        "guard": {"cap_cooldown_s": 0.0},
        "audit": {"path": str(tmp_path / "audit.jsonl")},
    }
    return parse_config(data)


def _node_daemons(twin: Twin, short: Path, token: Path, lock: threading.RLock) -> list[NodeDaemon]:
    """A node daemon per twin node, on its Unix socket, falling back to FALLBACK_W."""
    return [
        NodeDaemon(
            TwinNodeBackend(twin, k),
            NodeSettings(
                token_file=token,
                socket_path=short / f"node{k}.sock",
                fallback_cap_w=FALLBACK_W,
                check_interval_s=0.05,
            ),
            lock=lock,
        ).start()
        for k in (1, 2)
    ]


def _cycle_for(cycle: Callable[[], object], seconds: float) -> None:
    """Cycle the loop (without stepping the twin) every 0.1 s for `seconds`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        cycle()
        time.sleep(0.1)


def test_caps_through_node_daemons_fall_back_when_the_loop_stops_renewing(
    tmp_path: Path,
) -> None:
    """The loop sets caps through real node daemons (Unix sockets, bearer token) on the twin's
    GPUs and renews their leases every cycle; when it stops cycling, every lease runs out and
    each node daemon puts its GPUs under the fallback cap (never at max); the next cycle sees that
    and sets its caps again."""
    short = Path(tempfile.mkdtemp(prefix="ooda-e2e-"))  # Unix socket paths stay under 108 bytes
    token = short / "token"
    secret = write_token(token)
    config = _node_caps_config(tmp_path, short, token)
    twin = Twin(twin_spec(config.twin))
    lock = threading.RLock()  # the node daemons' threads and the twin's steps take turns
    daemons = _node_daemons(twin, short, token, lock)
    runtime = assemble(config, twin=twin)

    def cycle() -> CycleReport:
        with lock:
            twin.run_until(twin.t_s + INTERVAL_S)
        report = runtime.loop.cycle()
        assert not report.errors, report.errors
        return report

    try:
        first = cycle()
        caps = [a for a in first.actions if a.intent.kind == "set_power_cap"]
        assert caps and all(a.outcome == "applied" for a in caps)
        ours = runtime.loop.ledger.caps["our_cap_w"][runtime.loop.ledger.caps.slots(twin.uuid)]
        assert np.isfinite(ours).all() and (ours < 700).all()
        assert (ours != FALLBACK_W).all()  # so the fallback is told apart from our caps
        with lock:
            assert np.array_equal(twin.cap_w, ours)

        _cycle_for(runtime.loop.cycle, 3 * LEASE_S)  # renewed every cycle: caps outlive leases
        with lock:
            assert np.array_equal(twin.cap_w, ours)

        # The agent stops: every lease runs out, every GPU goes under the fallback cap.
        fallen = np.minimum(ours, FALLBACK_W)
        assert (fallen != ours).any()  # some lowered by it

        def fallen_back() -> bool:
            with lock:
                return bool(np.array_equal(twin.cap_w, fallen))

        wait_until(fallen_back, 5 * LEASE_S, "the node daemons' fallback caps")
        listed = [g for k in (1, 2) for g in node_gpus(short / f"node{k}.sock", secret)]
        assert {g["state"] for g in listed} == {"fallback"}
        assert sorted(g["power_limit_w"] for g in listed) == sorted(fallen.tolist())
        assert all(g["lease_remaining_s"] is None for g in listed)

        # The next cycle sees the GPUs at the fallback and sets the agent's caps again.
        report = cycle()
        seen = report.situation.cap_w
        assert np.array_equal(seen, fallen)
        again = [a for a in report.actions if a.intent.kind == "set_power_cap"]
        assert again and all(a.outcome == "applied" for a in again)
        with lock:
            assert (twin.cap_w != FALLBACK_W).all()
        listed = [g for k in (1, 2) for g in node_gpus(short / f"node{k}.sock", secret)]
        assert all(g["lease_remaining_s"] is not None for g in listed)
    finally:
        runtime.close()
        for daemon in daemons:
            daemon.stop()
        shutil.rmtree(short, ignore_errors=True)

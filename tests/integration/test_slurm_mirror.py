"""The agent wired to a real Slurm (`actuators.placement = "slurm"`) with the twin standing in for
the GPUs: the twin's jobs follow Slurm's (which GPUs each job holds), node states come from Slurm,
node intents go to Slurm live and only to the recorder in dry-run."""

from __future__ import annotations

from typing import Any

import pytest

from agent.assembly import Agent, assemble
from agent.config import parse_config
from agent.core.intents import DrainNode, Intent, Outcome, RequeueJob, ResumeNode
from agent.core.snapshot import Metric
from tests.integration.slurm_cluster import SlurmCluster, wait_until

pytestmark = pytest.mark.integration


def runtime_for(
    slurm: SlurmCluster, dry_run: bool, faults: tuple[str, ...] = (), **slurm_settings: Any
) -> Agent:
    config = parse_config(
        {
            "dry_run": dry_run,
            "twin": {"nodes": 4, "gpus_per_node": 4, "seed": 5, "faults": list(faults)},
            "policies": {},
            "actuators": {
                "placement": "slurm",
                "slurm": {"slurm_conf": str(slurm.slurm_conf), "timeout_s": 10, **slurm_settings},
            },
        }
    )
    return assemble(config)


def gpus_of(labels: list[str], job: str) -> list[str]:
    return [f"node{i // 4 + 1}/gpu{i % 4}" for i, label in enumerate(labels) if label == job]


def execute(runtime: Agent, intent: Intent) -> tuple[Outcome, str]:
    (action,) = runtime.loop.executor.execute([("d-test", intent)], lambda: "a-test", 0.0)
    return action.outcome, action.detail


def test_twin_jobs_follow_slurm_through_a_requeue(slurm: SlurmCluster) -> None:
    runtime = runtime_for(
        slurm, dry_run=False, faults=("xid=79:node2/gpu1@0",), priority_by_partition={"gpu": 2}
    )
    twin = runtime.twin
    assert twin is not None and not (twin.job_row >= 0).any()  # no jobs of its own
    for node in ("node1", "node3", "node4"):
        slurm.scontrol("update", f"nodename={node}", "weight=10")
    small = slurm.sbatch(gpus=2)
    big = slurm.sbatch(gpus=4, nodes=2)
    slurm.wait_job(small, ["RUNNING"])
    slurm.wait_job(big, ["RUNNING"])
    assert slurm.job(small)["nodes"] == "node2"

    report = runtime.loop.cycle()
    labels = report.snapshot.job.tolist()
    assert gpus_of(labels, small) == ["node2/gpu0", "node2/gpu1"]
    big_nodes = slurm.job(big)["job_resources"]["allocated_nodes"]
    assert gpus_of(labels, big) == [
        f"{n['nodename']}/gpu{g}"
        for n in sorted(big_nodes, key=lambda n: n["nodename"])
        for g in range(4)
    ]
    assert twin.job_labels().tolist() == labels  # what the twin's exporter labels hpc_job with
    # The GPU with the XID carries the real Slurm job: what health_drain will requeue.
    xid, _ = report.snapshot.column(Metric.XID)
    assert xid[5] == 79 and labels[5] == small  # node2/gpu1
    prio = report.snapshot.labels["priority"][report.snapshot.job == small]
    assert prio.tolist() == ["2", "2"]  # the partition's priority class
    nodes = report.situation.nodes
    assert nodes is not None and nodes.known.all() and nodes.weight.tolist() == [10, 1, 10, 10]

    # What health_drain will do on an XID 79 on node2: drain it, requeue its job.
    assert execute(runtime, DrainNode(policy="t", reason="xid 79 on gpu1", node="node2"))[0] is (
        Outcome.APPLIED
    )
    assert execute(runtime, RequeueJob(policy="t", reason="xid 79", job=small, node="node2"))[
        0
    ] is (Outcome.APPLIED)
    twin.run_until(twin.t_s + 15)
    runtime.loop.cycle()

    def moved() -> bool:
        twin.run_until(twin.t_s + 15)
        labels = runtime.loop.cycle().snapshot.job.tolist()
        where = gpus_of(labels, small)
        return bool(where) and not any(w.startswith("node2/") for w in where)

    wait_until(moved, 30, f"job {small} to run again, off node2, in the twin too")
    assert slurm.job(small)["restart_cnt"] == 1
    assert "node2" not in slurm.job(small)["nodes"]
    report = runtime.loop.cycle()
    assert report.situation.nodes is not None
    assert report.situation.nodes.drained_by_us.tolist() == [False, True, False, False]
    assert not report.errors

    outcome, _ = execute(runtime, ResumeNode(policy="t", reason="recovered", node="node2"))
    assert outcome is Outcome.APPLIED
    assert "DRAIN" not in slurm.node("node2")["state_flags"]
    runtime.close()


def placement_view(slurm: SlurmCluster) -> dict[str, tuple[Any, ...]]:
    keys = ("state", "state_flags", "reason", "weight", "features", "active_features")
    return {name: tuple(str(n[k]) for k in keys) for name, n in slurm.nodes().items()}


def test_dry_run_changes_nothing_in_slurm(slurm: SlurmCluster) -> None:
    runtime = runtime_for(slurm, dry_run=True)
    before = placement_view(slurm)
    outcome, _ = execute(runtime, DrainNode(policy="t", reason="xid 79", node="node2"))
    assert outcome is Outcome.RECORDED
    assert runtime.actuators.recorded_placement.calls == [("drain", "node2", "xid 79")]
    runtime.loop.cycle()
    assert placement_view(slurm) == before


def test_admin_drain_is_a_failed_action_with_the_reason(slurm: SlurmCluster) -> None:
    runtime = runtime_for(slurm, dry_run=False)
    slurm.scontrol("update", "nodename=node3", "state=drain", "reason=admin: bad fan")
    outcome, detail = execute(runtime, ResumeNode(policy="t", reason="recovered", node="node3"))
    assert outcome is Outcome.FAILED
    assert "drained by someone else (reason: 'admin: bad fan')" in detail
    assert slurm.node("node3")["reason"] == "admin: bad fan"

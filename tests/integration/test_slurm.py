"""SlurmPlacement against a real slurmctld with 4 slurmd (tests/integration/slurm_cluster.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from agent.act.slurm import SlurmPlacement
from agent.core.errors import ActuatorError
from agent.core.jobs import JobState
from tests.integration.slurm_cluster import SlurmCluster, settings_for, wait_until

pytestmark = pytest.mark.integration

NODES = ["node1", "node2", "node3", "node4"]


def test_node_states_mirror_slurm(slurm: SlurmCluster, placement: SlurmPlacement) -> None:
    states = placement.node_states([*NODES, "node9"])
    assert states.known.tolist() == [True, True, True, True, False]
    assert not states.drained.any() and not states.opted_out.any()
    assert states.weight[:4].tolist() == [1, 1, 1, 1]
    assert states.features[0] == frozenset({"h100", "ib"})
    assert states.features[4] == frozenset()
    assert states.partitions is not None and states.partitions[0] == frozenset({"gpu"})
    assert placement.all_nodes() == list(NODES)


def test_drain_carries_our_reason_and_resume_undoes_it(
    slurm: SlurmCluster, placement: SlurmPlacement
) -> None:
    job = slurm.sbatch("--nodelist=node2", gpus=2)
    slurm.wait_job(job, ["RUNNING"])
    placement.drain("node2", "xid 79 on gpu1\n(fell off the bus)")
    node = slurm.node("node2")
    assert node["reason"] == "ooda: xid 79 on gpu1 (fell off the bus)"
    assert node["state"] == "mixed" and "DRAIN" in node["state_flags"]  # draining: job still runs
    assert slurm.job(job)["job_state"] == "RUNNING"
    states = placement.node_states(NODES)
    assert states.drained.tolist() == [False, True, False, False]
    assert states.drained_by_us.tolist() == [False, True, False, False]
    assert states.reason[1].startswith("ooda:")

    placement.drain("node2", "ooda: another reason")  # already ours: nothing changes
    assert slurm.node("node2")["reason"] == "ooda: xid 79 on gpu1 (fell off the bus)"
    placement.drain("node3", "ooda: hot")  # a reason with the prefix keeps it once
    assert slurm.node("node3")["reason"] == "ooda: hot"

    placement.resume("node2")
    node = slurm.node("node2")
    assert "DRAIN" not in node["state_flags"] and node["reason"] == ""
    placement.resume("node2")  # in service already: a no-op
    assert not placement.node_states(NODES).drained[1]


def test_admin_drains_and_downs_are_never_touched(
    slurm: SlurmCluster, placement: SlurmPlacement
) -> None:
    slurm.scontrol("update", "nodename=node3", "state=drain", "reason=admin: bad fan")
    slurm.scontrol("update", "nodename=node4", "state=down", "reason=admin: reseat cable")
    states = placement.node_states(NODES)
    assert states.drained.tolist() == [False, False, True, True]
    assert not states.drained_by_us.any()

    for node in ("node3", "node4"):
        with pytest.raises(ActuatorError, match=f"{node} was drained by someone else.*only our"):
            placement.resume(node)
        with pytest.raises(ActuatorError, match=r"by someone else.*not draining"):
            placement.drain(node, "xid 79")
        with pytest.raises(ActuatorError, match=r"by someone else.*not re-weighting"):
            placement.set_weight(node, 50)
        with pytest.raises(ActuatorError, match=r"by someone else.*not adding features"):
            placement.set_features(node, frozenset({"hot"}), frozenset())
    after = slurm.nodes()
    assert after["node3"]["reason"] == "admin: bad fan" and "DRAIN" in after["node3"]["state_flags"]
    assert after["node4"]["reason"] == "admin: reseat cable" and after["node4"]["state"] == "down"
    assert after["node3"]["weight"] == 1 and after["node3"]["features"] == "h100,ib"


def test_opted_out_node_is_left_alone(slurm: SlurmCluster, placement: SlurmPlacement) -> None:
    slurm.scontrol("update", "nodename=node4", "Features=h100,ib,ooda-ignore")
    states = placement.node_states(NODES)
    assert states.opted_out.tolist() == [False, False, False, True]
    with pytest.raises(ActuatorError, match="opt-out feature 'ooda-ignore'"):
        placement.drain("node4", "xid 79")
    with pytest.raises(ActuatorError, match="opt-out"):
        placement.set_weight("node4", 100)
    assert "DRAIN" not in slurm.node("node4")["state_flags"]


def test_weights_steer_new_jobs_away(slurm: SlurmCluster, placement: SlurmPlacement) -> None:
    for node in ("node1", "node2", "node4"):
        placement.set_weight(node, 100)
    first = slurm.sbatch(gpus=4)
    slurm.wait_job(first, ["RUNNING"])
    assert slurm.job(first)["nodes"] == "node3"  # the only light node

    placement.set_weight("node3", 1000)
    placement.set_weight("node2", 1)  # now the lightest: the next jobs go there first
    second = slurm.sbatch(gpus=4)
    slurm.wait_job(second, ["RUNNING"])
    assert slurm.job(second)["nodes"] == "node2"
    assert placement.node_states(NODES).weight.tolist() == [100, 1, 1000, 100]

    placement.set_weight("node2", 1)  # back to what it had: no longer ours to keep
    slurm.scontrol("reconfigure")
    wait_until(lambda: slurm.node("node1")["weight"] == 1, 10, "reconfigure to reset weights")
    assert placement.node_states(NODES).weight.tolist() == [100, 1, 1000, 100]  # re-applied
    assert slurm.node("node1")["weight"] == 100


def test_features_are_ours_only_and_survive_reconfigure_and_restart(
    slurm: SlurmCluster, placement: SlurmPlacement
) -> None:
    placement.set_features("node1", frozenset({"powercap_500w"}), frozenset())
    placement.set_weight("node3", 7)
    node = slurm.node("node1")
    assert set(node["features"].split(",")) == {"h100", "ib", "ooda_powercap_500w"}
    assert set(node["active_features"].split(",")) == {"h100", "ib", "ooda_powercap_500w"}
    job = slurm.sbatch("--constraint=ooda_powercap_500w", gpus=1)
    slurm.wait_job(job, ["RUNNING"])
    assert slurm.job(job)["nodes"] == "node1"

    for reset in ("reconfigure", "restart"):
        if reset == "reconfigure":
            slurm.scontrol("reconfigure")
        else:
            slurm.restart_controller()
        wait_until(
            lambda: slurm.node("node1")["features"] == "h100,ib", 10, f"{reset} to reset features"
        )
        assert slurm.node("node3")["weight"] == 1
        states = placement.node_states(NODES)  # sees the drift, re-applies
        assert "ooda_powercap_500w" in states.features[0]
        assert states.weight[2] == 7
        assert "ooda_powercap_500w" in slurm.node("node1")["features"].split(",")
        assert slurm.node("node3")["weight"] == 7
        assert any("re-applied" in what for what in placement.reapplied)

    # A feature that is not ours cannot be removed: the name gets our prefix.
    placement.set_features("node1", frozenset(), frozenset({"h100", "powercap_500w"}))
    assert slurm.node("node1")["features"] == "h100,ib"
    with pytest.raises(ActuatorError, match="not a valid feature"):
        placement.set_features("node1", frozenset({"a,b"}), frozenset())

    # A second agent (e.g. a dry-run one) that set nothing re-applies nothing.
    placement.set_features("node2", frozenset({"ooda_hot"}), frozenset())
    bystander = SlurmPlacement(settings_for(slurm))
    slurm.scontrol("reconfigure")
    wait_until(lambda: slurm.node("node2")["features"] == "h100,ib", 10, "reconfigure")
    assert "ooda_hot" not in bystander.node_states(NODES).features[1]
    assert "ooda_hot" in placement.node_states(NODES).features[1]


def test_requeue_restarts_the_job_elsewhere(slurm: SlurmCluster, placement: SlurmPlacement) -> None:
    for node in ("node1", "node3", "node4"):  # steer it onto node2 without pinning it there
        slurm.scontrol("update", f"nodename={node}", "weight=10")
    job = slurm.sbatch(gpus=2)
    slurm.wait_job(job, ["RUNNING"])
    assert slurm.job(job)["nodes"] == "node2"
    placement.drain("node2", "xid 79")
    t0 = time.monotonic()
    placement.requeue(job)

    def running_again() -> bool:
        placement.node_states(NODES)  # each cycle: reconcile releases the requeue delay
        return bool(slurm.job(job)["job_state"] == "RUNNING")

    wait_until(running_again, 30, f"job {job} to run again")
    took = time.monotonic() - t0
    info = slurm.job(job)
    assert info["restart_cnt"] == 1
    assert info["nodes"] != "node2"
    assert took < 20, f"requeued job took {took:.1f} s to restart (Slurm's delay is ~120 s)"
    with pytest.raises(ActuatorError, match=r"scontrol requeue 999999.*Invalid job id"):
        placement.requeue("999999")
    with pytest.raises(ActuatorError, match="not a job id"):
        placement.requeue("all")


def test_job_table_has_gpus_and_priorities(slurm: SlurmCluster) -> None:
    placement = SlurmPlacement(
        settings_for(slurm, priority_by_partition={"gpu": 1}, default_priority=0)
    )
    one = slurm.sbatch("--nodelist=node1", gpus=2)
    two = slurm.sbatch("--nodelist=node3,node4", gpus=3, nodes=2)
    slurm.wait_job(one, ["RUNNING"])
    slurm.wait_job(two, ["RUNNING"])
    waiting = slurm.sbatch("--nodelist=node1", gpus=4)  # node1 has only 2 GPUs left
    table = placement.jobs()
    assert table.gpus_of(one) == [("node1", 0), ("node1", 1)]
    assert table.gpus_of(two) == [("node3", g) for g in range(3)] + [("node4", g) for g in range(3)]
    assert table.gpus_of(waiting) == []
    assert table.state[table.index(waiting)] == JobState.PENDING
    assert table.state[table.index(one)] == JobState.RUNNING
    assert set(table.priority.tolist()) == {1}
    jobs = table.job_at(np.array(["node1", "node1", "node4", "node2"]), np.array([1, 2, 2, 0]))
    assert jobs.tolist() == [one, "", two, ""]


def test_controller_down_is_a_clear_error_within_the_timeout(slurm: SlurmCluster) -> None:
    placement = SlurmPlacement(settings_for(slurm, timeout_s=2.0))
    slurm.stop_controller()
    try:
        for call in (
            lambda: placement.node_states(NODES),
            placement.jobs,
            lambda: placement.drain("node1", "x"),
        ):
            t0 = time.monotonic()
            with pytest.raises(
                ActuatorError, match=r"timed out after 2 s.*slurmctld.*not answering"
            ):
                call()
            assert time.monotonic() - t0 < 3.0
    finally:
        slurm.start_controller()

"""The job table, Slurm's text formats, the twin's job mirror and the job-labelled source, against
a hand-written JobInventory fake."""

from __future__ import annotations

import numpy as np
import pytest

from agent.act.slurm import expand_hostlist, gpus_from_gres_detail, parse_index_list
from agent.core.errors import ActuatorError
from agent.core.jobs import NO_GPU, JobState, JobTable, label_snapshot
from agent.observe.job_labels import JobLabelledSource
from agent.sim.adapters import TwinSource
from agent.sim.job_mirror import JobMirror, MirroredTwinSource
from agent.sim.twin import JOB_DONE, JOB_PENDING, JOB_RUNNING, Twin, TwinSpec
from tests.conftest import make_snapshot


class FakeInventory:
    """Returns whatever table the test sets; raises when told to."""

    def __init__(self, table: JobTable | None = None) -> None:
        self.table = table or JobTable.empty()
        self.error: str | None = None

    def jobs(self) -> JobTable:
        if self.error:
            raise ActuatorError(self.error)
        return self.table


def table(*jobs: tuple[str, JobState, int, list[tuple[str, int]]]) -> JobTable:
    rows = [(job_id, state, prio, 0) for job_id, state, prio, _ in jobs]
    allocs = [(k, node, gpu) for k, (*_, held) in enumerate(jobs) for node, gpu in held]
    return JobTable.build(rows, allocs)


def test_hostlists_and_gpu_indices() -> None:
    assert expand_hostlist("node[1-3,7],gpu[01-02]-b,login") == [
        "node1",
        "node2",
        "node3",
        "node7",
        "gpu01-b",
        "gpu02-b",
        "login",
    ]
    assert expand_hostlist("r[1-2]n[1-2]") == ["r1n1", "r1n2", "r2n1", "r2n2"]
    assert expand_hostlist("") == []
    assert parse_index_list("0-2,5") == [0, 1, 2, 5]
    assert parse_index_list("N/A") == []
    # Malformed items are skipped, never a crash or a list sized by the text.
    assert parse_index_list("1-x,3") == [3]
    assert parse_index_list("3-1,0-99999999,2x,-1,4") == [4]
    assert parse_index_list("\u0663,1") == [1]  # an Arabic-Indic 3 is not a GPU index
    assert gpus_from_gres_detail("gpu:2(IDX:0-1)") == [0, 1]
    assert gpus_from_gres_detail("gpu:h100:2(IDX:1,3)") == [1, 3]
    assert gpus_from_gres_detail("gpu(IDX:N/A)") == []


def test_job_table_lookups() -> None:
    t = table(
        ("7", JobState.RUNNING, 2, [("node1", 0), ("node1", 1)]),
        ("8", JobState.PENDING, 1, []),
        ("9", JobState.RUNNING, 0, [("node2", NO_GPU)]),
    )
    assert t.running().tolist() == [True, False, True]
    assert t.gpus_of("7") == [("node1", 0), ("node1", 1)]
    assert t.nodes_of("9") == ["node2"] and t.gpus_of("nope") == []
    assert t.priority_of(np.array(["8", "", "7", "x"]), default=-1).tolist() == [1, -1, 2, -1]
    at = t.job_at(np.array(["node1", "node1", "node2"]), np.array([1, 2, 0]))
    assert at.tolist() == ["7", "", ""]
    with pytest.raises(ValueError, match="outside the job arrays"):
        JobTable.build([("1", JobState.RUNNING, 0, 0)], [(3, "node1", 0)])


def test_label_snapshot_joins_jobs_and_priorities() -> None:
    snap = make_snapshot([300.0] * 8, jobs=["", "", "", "", "55", "55", "", ""])
    t = table(
        ("41", JobState.RUNNING, 2, [("node1", 0), ("node1", 1)]),
        ("55", JobState.RUNNING, 1, [("node2", 0), ("node2", 1)]),
    )
    out = label_snapshot(snap, t, default_priority=0)
    assert out.job.tolist() == ["41", "41", "", "", "55", "55", "", ""]
    assert out.labels["priority"].tolist() == ["2", "2", "0", "0", "1", "1", "0", "0"]


def twin_for_mirror() -> Twin:
    return Twin(TwinSpec(nodes=4, gpus_per_node=4, occupancy=0.0, initial_jobs=False, seed=3))


def test_mirror_follows_the_scheduler() -> None:
    twin = twin_for_mirror()
    inv = FakeInventory(
        table(
            ("101", JobState.RUNNING, 2, [("node2", 0), ("node2", 1)]),
            ("102", JobState.RUNNING, 0, [("node3", 3), ("node4", 3)]),
            ("103", JobState.PENDING, 1, []),
        )
    )
    mirror = JobMirror(twin, inv)
    report = mirror.sync()
    assert sorted(report.started) == ["101", "102"]
    labels = twin.job_labels()
    assert labels[[4, 5]].tolist() == ["101", "101"]
    assert labels[[11, 15]].tolist() == ["102", "102"]
    assert (labels != "").sum() == 4
    assert twin.job_priority()[4] == 2
    twin.run_until(30.0)
    assert twin.power_w[4] > twin.power_w[0]  # the mirrored job draws power
    assert twin.job_labels()[4] == "101"  # and the twin neither finishes nor moves it

    # Requeued by the scheduler: the GPUs are freed, the job waits in the twin too.
    inv.table = table(
        ("101", JobState.PENDING, 2, []),
        ("102", JobState.RUNNING, 0, [("node3", 3), ("node4", 3)]),
    )
    report = mirror.sync()
    assert report.stopped == ["101"] and report.started == []
    row = mirror._rows["101"]
    assert twin.jobs.state[row] == JOB_PENDING and (twin.job_labels()[[4, 5]] == "").all()
    twin.run_until(60.0)
    assert (twin.job_labels()[[4, 5]] == "").all()  # the twin does not place it itself

    # Restarted elsewhere, and 102 finished (gone from the table).
    inv.table = table(("101", JobState.RUNNING, 2, [("node1", 2), ("node1", 3)]))
    report = mirror.sync()
    assert report.started == ["101"] and report.stopped == ["102"]
    assert twin.job_labels()[[2, 3]].tolist() == ["101", "101"]
    assert twin.jobs.state[row] == JOB_RUNNING and mirror._rows["101"] == row
    assert (twin.job_labels() != "").sum() == 2
    assert mirror.held() == {"101": (2, 3)}


def test_mirror_reports_what_it_cannot_place_and_evicts_twin_jobs() -> None:
    twin = Twin(TwinSpec(nodes=2, gpus_per_node=4, occupancy=1.0, seed=1))
    assert (twin.job_row >= 0).all()
    own = int(twin.jobs.job_id[twin.job_row[0]])
    inv = FakeInventory(
        table(
            ("5", JobState.RUNNING, 0, [("node1", 0)]),
            ("6", JobState.RUNNING, 0, [("node9", 0)]),
            ("pod-a", JobState.RUNNING, 0, [("node2", 0)]),
        )
    )
    report = JobMirror(twin, inv).sync()
    assert report.started == ["5"]
    assert report.unplaced == {
        "6": "the twin has no node9/gpu0",
        "pod-a": "job id is not an integer",
    }
    assert twin.job_labels()[0] == "5"
    assert own not in twin.running_job_ids()  # the twin's own job went back to its queue


def test_mirrored_source_keeps_going_when_the_scheduler_is_unreachable() -> None:
    twin = twin_for_mirror()
    inv = FakeInventory(table(("7", JobState.RUNNING, 0, [("node1", 0)])))
    source = MirroredTwinSource(TwinSource(twin), JobMirror(twin, inv))
    assert source.observe(0.0).job[0] == "7"
    inv.error = "`squeue --json` timed out after 2 s"
    snap = source.observe(0.0)
    assert snap.job[0] == "7"  # the twin keeps the jobs it had
    assert snap.errors == ("job mirror: `squeue --json` timed out after 2 s",)


def test_job_labelled_source() -> None:
    twin = Twin(TwinSpec(nodes=2, gpus_per_node=2, occupancy=0.0, initial_jobs=False))
    inv = FakeInventory(table(("77", JobState.RUNNING, 3, [("node2", 1)])))
    source = JobLabelledSource(TwinSource(twin), inv, default_priority=1)
    snap = source.observe(0.0)
    assert snap.job.tolist() == ["", "", "", "77"]
    assert snap.labels["priority"].tolist() == ["0", "0", "0", "3"]  # the twin's own labels kept
    inv.error = "slurmctld down"
    snap = source.observe(0.0)
    assert snap.job.tolist() == ["", "", "", ""]
    assert snap.errors == ("job table unavailable: slurmctld down",)


def test_finished_jobs_release_for_good() -> None:
    twin = twin_for_mirror()
    inv = FakeInventory(table(("9", JobState.RUNNING, 0, [("node1", 0)])))
    mirror = JobMirror(twin, inv)
    mirror.sync()
    row = mirror._rows["9"]
    inv.table = table(("9", JobState.FINISHED, 0, []))
    mirror.sync()
    assert twin.jobs.state[row] == JOB_DONE and twin.job_labels()[0] == ""


def test_label_snapshot_is_columnar_at_100k_gpus() -> None:
    import time

    from agent.core.snapshot import Metric, build_snapshot

    n, g = 100_000, 8
    node_idx = np.arange(n) // g
    snap = build_snapshot(
        time_s=0.0,
        node_of_gpu=np.char.add("node", (node_idx + 1).astype(np.str_)),
        gpu=np.arange(n) % g,
        uuid=np.char.add("GPU-", np.arange(n).astype(np.str_)),
        model=np.full(n, "H100"),
        job=np.full(n, ""),
        values={Metric.POWER_W: np.full(n, 300.0)},
        age_s=np.ones(n),
        stale=np.zeros(n, dtype=bool),
    )
    n_jobs = n // g - 100  # the last 100 nodes idle
    t = JobTable(
        job_id=(np.arange(n_jobs) + 1000).astype(np.str_),
        state=np.full(n_jobs, str(JobState.RUNNING)),
        priority=np.arange(n_jobs, dtype=np.int64) % 3,
        restarts=np.zeros(n_jobs, dtype=np.int64),
        alloc_job=np.repeat(np.arange(n_jobs, dtype=np.int64), g),
        alloc_node=np.repeat(np.char.add("node", (np.arange(n_jobs) + 1).astype(np.str_)), g),
        alloc_gpu=np.tile(np.arange(g, dtype=np.int64), n_jobs),
    )
    t0 = time.perf_counter()
    out = label_snapshot(snap, t)
    took = time.perf_counter() - t0
    assert out.job[0] == "1000" and out.job[g * n_jobs - 1] == str(1000 + n_jobs - 1)
    assert (out.job[g * n_jobs :] == "").all()
    assert out.labels["priority"][g * 5] == "2"
    assert took < 1.0, f"label_snapshot took {took:.2f} s at 100k GPUs"

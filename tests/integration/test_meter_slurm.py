"""The meter and power shares against a real Slurm with accounting (slurmdbd on MariaDB): who ran
a job comes from squeue while it runs and from sacct once it ended; the accounts' shares from the
fairshare tree (sshare); a daemon metering a twin that mirrors Slurm's jobs books them to their
accounts."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.act.slurm import SlurmPlacement, SlurmSettings, gpus_from_gres_detail
from agent.core.jobs import ACCOUNT_LABEL
from agent.core.snapshot import Metric, Snapshot, build_snapshot
from agent.meter.ledger import Ledger
from agent.observe.job_labels import JobLabelledSource
from tests.daemon_helpers import drive, in_process, write
from tests.integration.conftest import ACCOUNT_SHARES
from tests.integration.slurm_accounting import AccountingCluster, wait_gone
from tests.integration.slurm_cluster import wait_until

pytestmark = pytest.mark.integration


def placement_for(cluster: AccountingCluster) -> SlurmPlacement:
    return SlurmPlacement(
        SlurmSettings.model_validate(
            {"slurm_conf": cluster.slurm_conf, "bin_dir": cluster.bin_dir, "timeout_s": 10.0}
        )
    )


@pytest.fixture
def accounting(slurm_accounting: AccountingCluster) -> AccountingCluster:
    slurm_accounting.run("scancel", "--user", "root")
    wait_until(lambda: not slurm_accounting.queue(), 30.0, "an empty queue")
    return slurm_accounting


def test_running_jobs_from_squeue_ended_ones_from_sacct(accounting: AccountingCluster) -> None:
    running = accounting.sbatch("--account=team-a", gpus=2, seconds=300)
    ended = accounting.sbatch("--account=team-b", gpus=1, seconds=1)
    accounting.wait_job(running, ["RUNNING"])
    accounting.wait_accounted(ended)
    wait_gone(accounting, ended)
    placement = placement_for(accounting)
    records = placement.job_records([running, ended, "99999999", "not-a-job"])
    assert set(records) == {running, ended}
    now = records[running]
    assert (now.account, now.user, now.partition, now.state, now.source) == (
        "team-a", "root", "gpu", "running", "squeue"
    )  # fmt: skip
    assert now.start_s is not None
    done = records[ended]
    assert (done.account, done.user, done.state, done.source) == (
        "team-b", "root", "finished", "sacct"
    )  # fmt: skip
    assert done.start_s is not None and done.end_s is not None and done.end_s >= done.start_s


def test_account_shares_are_the_fairshare_tree(accounting: AccountingCluster) -> None:
    shares = placement_for(accounting).account_shares()
    assert set(shares) == set(ACCOUNT_SHARES)
    total = sum(shares.values())
    for account, fairshare in ACCOUNT_SHARES.items():
        assert shares[account] / total == pytest.approx(fairshare / 100, abs=1e-3)


def test_gpus_carry_their_jobs_account_and_snapshots_the_shares(
    accounting: AccountingCluster,
) -> None:
    job = accounting.sbatch("--account=team-c", gpus=2, seconds=300)
    accounting.wait_job(job, ["RUNNING"])
    entry = accounting.job(job)
    node = entry["nodes"]
    held = gpus_from_gres_detail(entry["gres_detail"][0])
    placement = placement_for(accounting)

    class OneNode:
        """Telemetry of the job's node, with no job labels of its own."""

        def observe(self, now_s: float) -> Snapshot:
            return build_snapshot(
                time_s=now_s,
                node_of_gpu=[node] * 4,
                gpu=[0, 1, 2, 3],
                uuid=[f"GPU-{k}" for k in range(4)],
                model=["H100"] * 4,
                job=[""] * 4,
                values={Metric.POWER_W: [300.0] * 4},
                age_s=[0.0] * 4,
                stale=[False] * 4,
            )

    labelled = JobLabelledSource(OneNode(), placement, shares=placement).observe(0.0)
    accounts = labelled.labels[ACCOUNT_LABEL].tolist()
    assert [accounts[g] for g in held] == ["team-c", "team-c"]
    assert [labelled.job[g] for g in held] == [job, job]
    assert set(labelled.account_shares) == set(ACCOUNT_SHARES)


def test_a_daemon_books_slurm_jobs_to_their_accounts(
    accounting: AccountingCluster, tmp_path: Path
) -> None:
    config = write(
        tmp_path / "ooda.toml",
        f"""
dry_run = true
policies = {{}}
[source]
kind = "twin"
[cluster]
name = "acct"
[twin]
nodes = 2
gpus_per_node = 4
seed = 5
speed = 0
[daemon]
interval_s = 15.0
[actuators]
placement = "slurm"
[actuators.slurm]
slurm_conf = "{accounting.slurm_conf}"
bin_dir = "{accounting.bin_dir}"
[meter]
enabled = true
""",
    )
    long = accounting.sbatch("--account=team-a", gpus=4, seconds=300)
    short = accounting.sbatch("--account=team-b", gpus=2, seconds=2)
    accounting.wait_job(long, ["RUNNING"])
    daemon = in_process(config, tmp_path / "state")
    try:
        from agent.core.clock import FakeClock

        wall = daemon.wall
        assert isinstance(wall, FakeClock)
        drive(daemon, wall, 3)
        accounting.wait_accounted(short)
        wait_gone(accounting, short)
        drive(daemon, wall, 2)
    finally:
        daemon.shutdown()
    ledger = Ledger(tmp_path / "state" / "acct.ledger.sqlite", read_only=True)
    jobs = dict(ledger.db.execute("SELECT job, account FROM jobs").fetchall())
    assert jobs[long] == "team-a"
    assert jobs.get(short) == "team-b"  # from squeue while it ran, or sacct after
    totals = ledger.account_totals()
    assert totals["team-a"][0] > 0

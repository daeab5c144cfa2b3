"""Fixtures starting real services: a 4-node Slurm cluster and Alertmanager, on 127.0.0.1 only, on
ports picked free at run time, torn down (and checked for leftovers) at the end."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from agent.act.slurm import SlurmPlacement
from tests.integration.alertmanager import Alertmanager
from tests.integration.slurm_cluster import SlurmCluster, missing_tools, settings_for


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

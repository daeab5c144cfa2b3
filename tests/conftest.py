"""Shared fixtures: small snapshots, situations and a twin, built from real code (no mocks)."""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog

from agent.core.snapshot import Metric, Snapshot, build_snapshot

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

# One agent per cluster holds host-wide (agent/daemon/lock.py): this session's agents, and the
# `ooda run` processes its tests start, share a namespace of their own, so that test suites run
# side by side on one machine do not take each other's cluster names.
os.environ.setdefault("OODA_INSTANCE_NAMESPACE", f"pytest-{uuid.uuid4().hex[:12]}")


def free_port() -> int:
    """A loopback port nothing listens on (now): for a server to take, or a refused connection."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def last_json(text: str) -> dict[str, Any]:
    """The JSON object on the last line of a command's output (`--json`)."""
    return dict(json.loads(text.strip().splitlines()[-1]))


def make_snapshot(
    power_w: list[float],
    *,
    time_s: float = 0.0,
    gpus_per_node: int = 4,
    limit_w: float | list[float] = 700.0,
    util_pct: float | list[float] = 95.0,
    stale: list[bool] | None = None,
    jobs: list[str] | None = None,
    model: str = "NVIDIA H100 80GB HBM3",
    budget_w: float | None = None,
) -> Snapshot:
    n = len(power_w)
    nodes = [f"node{i // gpus_per_node + 1}" for i in range(n)]
    stale_arr = np.zeros(n, dtype=bool) if stale is None else np.asarray(stale)
    power = np.asarray(power_w, dtype=float)
    power[stale_arr] = np.nan
    values = {
        Metric.POWER_W: power,
        Metric.POWER_LIMIT_W: np.broadcast_to(np.asarray(limit_w, dtype=float), (n,)).copy(),
        Metric.UTIL_PCT: np.broadcast_to(np.asarray(util_pct, dtype=float), (n,)).copy(),
        Metric.TEMP_C: np.full(n, 60.0),
    }
    for column in values.values():
        column[stale_arr] = np.nan
    return build_snapshot(
        time_s=time_s,
        node_of_gpu=nodes,
        gpu=[i % gpus_per_node for i in range(n)],
        uuid=[f"GPU-{i:04d}" for i in range(n)],
        model=[model] * n,
        job=jobs if jobs is not None else [f"{100 + i // gpus_per_node}" for i in range(n)],
        values=values,
        age_s=np.where(stale_arr, 120.0, 1.0),
        stale=stale_arr,
        budget_w=budget_w,
    )


@pytest.fixture
def snapshot_factory():  # type: ignore[no-untyped-def]
    return make_snapshot


@contextmanager
def address_space_limit(headroom_bytes: int = 1 << 30) -> Iterator[None]:
    """For the block, this process may map at most what it maps now plus `headroom_bytes`
    (RLIMIT_AS, soft): an allocation bomb in the code under test raises MemoryError and fails
    the test, instead of taking the machine. The limit is restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    status = Path("/proc/self/status").read_text()
    mapped = int(status.split("VmSize:")[1].split()[0]) * 1024
    limit = mapped + headroom_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short temp dir (mode 0700): Unix socket paths must stay under 108 bytes, and pytest's
    tmp_path is longer than that allows."""
    path = Path(tempfile.mkdtemp(prefix="ooda-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def memory_bound() -> Iterator[None]:
    """The test runs under `address_space_limit()` (1 GiB more than the process maps)."""
    with address_space_limit():
        yield


# What a command run by a test may map in all (`ulimit -v`): a replay of a small trace maps
# about 1 GiB (numpy, scikit-learn, pyarrow and their threads).
COMMAND_ADDRESS_SPACE_KIB = 1_500_000

"""The NVML paths on a real NVIDIA GPU: the backend, the node-local source, and the node daemon
with the agent's node client in front of it.

Skipped where NVML cannot start (no driver or no GPU, as on the CI machine); `make test-gpu` runs
these on a GPU node. They change no power setting of the GPU: the only writes set a GPU's power
limit to the value it already has, and a lease whose fallback cap is that same value runs out. The
SM clock tests lock GPU 0's clocks and reset them before they end (NVML cannot read a lock back:
they assume the GPU was not locked); the profile test requests one and clears it. Written for
data-center GPUs (A100, H100 and later, ECC on), which answer every reading; a board without power
limits or ECC fails them by design.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.act.node_client import NodeCapActuator, NodeClientSettings
from agent.assembly import assemble
from agent.config import force_dry_run, parse_config
from agent.core.errors import (
    GpuError,
    GpuInvalidArgumentError,
    GpuNoPermissionError,
    GpuNotSupportedError,
)
from agent.core.intents import GpuTargets
from agent.core.snapshot import Metric
from agent.node.nvml import NvmlBackend, NvmlGpu
from agent.node.server import NodeDaemon, NodeSettings
from agent.observe.nvml import NvmlSource
from tests.conftest import last_json
from tests.daemon_helpers import DaemonProcess, write
from tests.node_helpers import node_serve, write_token

pytestmark = pytest.mark.gpu

_SMI_FIELDS = (
    "index,uuid,power.limit,power.min_limit,power.max_limit,power.default_limit,"
    "enforced.power.limit"
)


@pytest.fixture(scope="module")
def backend() -> Iterator[NvmlBackend]:
    pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed")
    try:
        nvml = NvmlBackend()
    except GpuError as exc:
        pytest.skip(f"NVML does not start here: {exc}")
    if not nvml.devices():
        nvml.close()
        pytest.skip("NVML sees no GPU")
    try:
        yield nvml
    finally:
        nvml.close()


def _nvidia_smi() -> dict[int, list[str]]:
    if shutil.which("nvidia-smi") is None:
        pytest.skip("nvidia-smi is not installed")
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={_SMI_FIELDS}", "--format=csv,noheader,nounits"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    rows = [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line]
    return {int(row[0]): row[1:] for row in rows}


def test_identity_and_limits_agree_with_nvidia_smi(backend: NvmlBackend) -> None:
    smi = _nvidia_smi()
    assert sorted(smi) == [gpu.index for gpu in backend.devices()]
    for gpu in backend.devices():
        uuid, limit, low, high, default, enforced = smi[gpu.index]
        assert gpu.uuid == uuid
        c = gpu.power_constraints()
        assert (c.min_w, c.max_w, c.default_w) == pytest.approx(
            (float(low), float(high), float(default)), abs=0.01
        )  # milliwatts -> watts at the edge
        assert gpu.power_limit_w() == pytest.approx(float(limit), abs=0.01)
        assert gpu.enforced_power_limit_w() == pytest.approx(float(enforced), abs=0.01)


def test_readings_are_physical(backend: NvmlBackend) -> None:
    for gpu in backend.devices():
        c = gpu.power_constraints()
        assert 0 < c.min_w <= c.default_w <= c.max_w
        assert 0 < gpu.power_usage_w() < 1.5 * c.max_w
        assert 0 < gpu.temperature_c() < 110
        util, mem_util = gpu.utilization_pct()
        assert 0 <= util <= 100 and 0 <= mem_util <= 100
        assert gpu.sm_clock_mhz() > 0
        start_j, start_s = gpu.total_energy_j(), time.monotonic()
        time.sleep(1.0)
        rate_w = (gpu.total_energy_j() - start_j) / (time.monotonic() - start_s)
        assert 0 < rate_w < 1.5 * c.max_w  # millijoules -> joules: a rate in watts
        assert gpu.ecc_dbe_volatile() >= 0
        rows, failed = gpu.remapped_rows()
        assert rows >= 0 and isinstance(failed, bool)
        assert 0 <= gpu.clocks_event_reasons() < 2**64


def test_xid_events_are_watched_and_drained_without_waiting(backend: NvmlBackend) -> None:
    for gpu in backend.devices():
        start = time.monotonic()
        xid = gpu.last_xid()  # registered at start; an empty event set answers at once
        assert time.monotonic() - start < 0.5
        assert 0 <= xid < 1000


def test_the_node_local_source(backend: NvmlBackend) -> None:
    snap = NvmlSource(backend, "gpu-node").observe(time.time())
    assert snap.n_gpus == len(backend.devices()) and not snap.stale.any()
    for error in snap.errors:  # a board may lack a field; nothing else may go wrong
        assert ": not supported: " in error or ": no permission: " in error, error
    for metric in (Metric.POWER_W, Metric.TEMP_C, Metric.UTIL_PCT, Metric.SM_CLOCK_MHZ):
        assert snap.column(metric)[1].all(), metric


def _limit_it_already_has(gpu: NvmlGpu) -> float:
    """Set the GPU's power limit to the value it has; skips where this process may not."""
    limit_w = gpu.power_limit_w()
    try:
        gpu.set_power_limit_w(limit_w)
    except GpuNoPermissionError as exc:
        pytest.skip(f"setting a power limit needs root or CAP_SYS_ADMIN: {exc}")
    return limit_w


def test_setting_a_limit_goes_through_nvml_and_out_of_range_is_refused(
    backend: NvmlBackend,
) -> None:
    for gpu in backend.devices():
        limit_w = _limit_it_already_has(gpu)
        assert gpu.power_limit_w() == limit_w
        c = gpu.power_constraints()
        with pytest.raises(GpuInvalidArgumentError, match="outside"):
            gpu.set_power_limit_w(c.max_w + 1.0)
        assert gpu.power_limit_w() == limit_w


def test_a_lease_through_the_node_daemon_falls_back(backend: NvmlBackend, tmp_path: Path) -> None:
    """The agent's node client -> the daemon's HTTP API on a Unix socket -> leases -> NVML: a cap
    leased for a second runs out and goes to the fallback cap (both the GPU's own limit)."""
    gpu = backend.devices()[0]
    limit_w = _limit_it_already_has(gpu)
    write_token(tmp_path / "token")
    settings = NodeSettings(
        token_file=tmp_path / "token",
        socket_path=tmp_path / "node.sock",
        fallback_cap_w=limit_w,
        check_interval_s=0.1,
    )
    targets = GpuTargets(
        node=np.array(["gpu-node"]), gpu=np.array([gpu.index]), uuid=np.array([gpu.uuid])
    )
    with NodeDaemon(backend, settings) as daemon:
        client = NodeCapActuator(
            NodeClientSettings.model_validate(
                {
                    "endpoints": {"gpu-node": f"unix://{tmp_path}/node.sock"},
                    "token_file": tmp_path / "token",
                    "timeout_s": 5.0,
                }
            )
        )
        try:
            result = client.set_caps(targets, np.array([limit_w]), 1.0)
            assert result.ok.all(), result.errors
            assert result.before_w[0] == limit_w
            assert daemon.manager.gpu(gpu.index)["state"] == "leased"
            deadline = time.monotonic() + 5.0
            while daemon.manager.gpu(gpu.index)["state"] != "fallback":
                assert time.monotonic() < deadline, "the lease did not run out"
                time.sleep(0.1)
            described = daemon.manager.gpu(gpu.index)
            assert described["power_limit_w"] == pytest.approx(limit_w, abs=0.01)
            assert "error" not in described
        finally:
            client.close()
    assert gpu.power_limit_w() == limit_w


def test_dry_run_cycles_of_the_agent_on_this_node(backend: NvmlBackend, tmp_path: Path) -> None:
    """`source.kind = "nvml"`, every built-in policy, advise only: the whole loop on this node."""
    config = force_dry_run(
        parse_config(
            {
                "source": {"kind": "nvml", "nvml": {"node": "gpu-node"}},
                "daemon": {"state_dir": str(tmp_path)},
            }
        )
    )
    runtime = assemble(config)
    try:
        reports = [runtime.loop.cycle() for _ in range(3)]
    finally:
        runtime.close()
    last = reports[-1]
    assert last.snapshot.n_gpus == len(backend.devices())
    assert list(last.snapshot.node_names) == ["gpu-node"] and not last.snapshot.stale.any()
    assert not last.errors, last.errors
    assert last.situation.fleet_power_w > 0
    assert set(last.stage_s) == {"observe", "orient", "decide", "guard", "act"}


def test_ooda_node_serve_over_nvml(backend: NvmlBackend, tmp_path: Path) -> None:
    """The command operators run on a GPU node: its API lists what NVML says, a lease at the
    limit already in force is granted, and SIGTERM with `--on-exit keep` leaves the GPU as is."""
    gpu = backend.devices()[0]
    limit_w = _limit_it_already_has(gpu)
    token = write_token(tmp_path / "token")
    args = ["--token-file", str(tmp_path / "token"), "--on-exit", "keep"]
    with node_serve(args, tmp_path / "node.sock", token) as (proc, client):
        listed = {g["index"]: g for g in client.get("/v1/gpus").json()}
        assert sorted(listed) == [g.index for g in backend.devices()]
        for device in backend.devices():
            c = device.power_constraints()
            got = listed[device.index]
            assert got["uuid"] == device.uuid and "error" not in got
            assert (got["min_w"], got["max_w"], got["default_w"]) == (c.min_w, c.max_w, c.default_w)
        answer = client.put(f"/v1/gpus/{gpu.index}/cap", json={"watts": limit_w, "lease_s": 60})
        assert answer.status_code == 200, answer.text
        assert answer.json()["gpu"]["state"] == "leased"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    assert gpu.power_limit_w() == limit_w


def test_ooda_run_over_nvml(backend: NvmlBackend, tmp_path: Path) -> None:
    """The daemon operators run on one GPU node, advising only: it cycles on NVML's readings,
    shows them in its metrics, and stops cleanly."""
    config = write(
        tmp_path / "nvml.toml",
        'dry_run = true\n[source]\nkind = "nvml"\n[daemon]\ninterval_s = 0.5\n'
        '[audit]\npath = "audit.jsonl"\n',
    )
    proc = DaemonProcess(config, tmp_path / "state", tmp_path / "run.log").started()
    try:
        proc.wait_cycles(3)
        assert proc.value("ooda_gpus_seen") == len(backend.devices())
        assert proc.value("ooda_gpus_stale") == 0 and proc.value("ooda_gpus_missing_power") == 0
        assert (proc.value("ooda_fleet_power_watts") or 0.0) > 0
        assert proc.value("ooda_cycles_total", 'result="ok"')
        code, _ = proc.stop()
    finally:
        proc.kill()
    assert code == 0


def test_ooda_once_over_nvml(backend: NvmlBackend, tmp_path: Path) -> None:
    config = write(
        tmp_path / "nvml.toml",
        f'[source]\nkind = "nvml"\n[source.nvml]\nnode = "gpu-node"\n'
        f'[daemon]\nstate_dir = "{tmp_path}"\n',
    )
    done = subprocess.run(
        [sys.executable, "-m", "agent", "once", "--config", str(config), "--dry-run", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = last_json(done.stdout)
    assert result["source"] == "nvml on gpu-node" and result["dry_run"] and not result["outage"]
    assert result["gpus"] == len(backend.devices()) and result["stale"] == 0
    assert result["fleet_power_w"] > 0 and not result["errors"]


# -- SM clock locks: these change the GPU's clocks, and reset them (nvmlDeviceResetGpuLockedClocks)
# before they end. They assume the GPU was not locked before (a lent GPU: NVML cannot read a lock
# back to restore it).


@pytest.fixture
def unlocked(backend: NvmlBackend) -> Iterator[NvmlGpu]:
    """GPU 0 with its SM clocks reset at the end, whatever the test did; skips where the GPU or
    this process may not lock clocks."""
    gpu = backend.devices()[0]
    try:
        gpu.reset_sm_clocks()
    except (GpuNoPermissionError, GpuNotSupportedError) as exc:
        pytest.skip(f"SM clock locks are not available here: {exc}")
    try:
        yield gpu
    finally:
        gpu.reset_sm_clocks()


def test_supported_sm_clocks_and_a_lock_through_nvml(unlocked: NvmlGpu) -> None:
    lo, hi = unlocked.supported_sm_clock_range_mhz()
    assert 0 < lo < hi < 5000
    with pytest.raises(GpuInvalidArgumentError, match="outside"):
        unlocked.lock_sm_clocks_mhz(lo, hi + 100.0)
    middle = round((lo + hi) / 2)
    unlocked.lock_sm_clocks_mhz(lo, middle)
    time.sleep(0.5)
    # Locked at most `middle`: an idle GPU clocks no higher (NVML rounds to a supported step).
    assert unlocked.sm_clock_mhz() <= middle + 30
    unlocked.reset_sm_clocks()


def test_a_clock_lock_through_the_node_daemon_is_reset_when_its_lease_lapses(
    unlocked: NvmlGpu, backend: NvmlBackend, tmp_path: Path
) -> None:
    lo, hi = unlocked.supported_sm_clock_range_mhz()
    write_token(tmp_path / "token")
    settings = NodeSettings(
        token_file=tmp_path / "token", socket_path=tmp_path / "node.sock", check_interval_s=0.1
    )
    with NodeDaemon(backend, settings) as daemon:
        described = daemon.manager.lock_clocks(unlocked.index, lo, hi, 1.0)
        assert described["clock_lock"]["max_mhz"] == hi
        assert described["sm_clock_range_mhz"] == [lo, hi]
        deadline = time.monotonic() + 5.0
        while daemon.manager.gpu(unlocked.index)["clock_lock"] is not None:
            assert time.monotonic() < deadline, "the clock lease did not run out"
            time.sleep(0.1)
        assert "error" not in daemon.manager.gpu(unlocked.index)


def test_a_workload_power_profile_through_nvml_is_requested_and_cleared(
    backend: NvmlBackend,
) -> None:
    """Skipped on GPUs without profiles (before Blackwell); clears the one profile it requests."""
    gpu = backend.devices()[0]
    try:
        supported = gpu.supported_power_profiles()
    except GpuNotSupportedError as exc:
        pytest.skip(f"no workload power profiles here: {exc}")
    if not supported:
        pytest.skip("the GPU lists no workload power profile")
    profile = min(supported)
    try:
        gpu.request_power_profile(profile)
    except GpuNoPermissionError as exc:
        pytest.skip(f"requesting a profile needs root or CAP_SYS_ADMIN: {exc}")
    gpu.clear_power_profile(profile)

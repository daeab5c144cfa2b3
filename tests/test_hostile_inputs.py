"""Hostile inputs to the agent (issue 28, findings 8-14): each refused with one line naming the
input, exit 2, no traceback, no allocation beyond a stated bound; the state and the audit log
that the agent relies on when things went wrong.

Commands that could allocate without bound run as processes under `ulimit -v` (a bomb then
fails the test with a MemoryError instead of taking the machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agent.act.audit import AuditLog, read_records
from agent.act.rollback import our_caps, plan_rollback
from agent.config import parse_config
from agent.core.errors import ConfigError
from agent.core.intents import GpuTargets, ReleasePowerCap, SetPowerCap
from agent.core.snapshot import Metric, build_snapshot
from agent.daemon.lock import AlreadyRunningError, InstanceLock
from agent.daemon.state import StateFile
from agent.observe.trace import TraceWriter
from tests.conftest import COMMAND_ADDRESS_SPACE_KIB
from tests.daemon_helpers import DaemonProcess, twin_config, write

REPO = Path(__file__).resolve().parent.parent


def ooda_limited(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    """`ooda ARGS` as a process that may map at most COMMAND_ADDRESS_SPACE_KIB."""
    command = ["sh", "-c", f'ulimit -v {COMMAND_ADDRESS_SPACE_KIB} && exec "$@"', "sh",
               sys.executable, "-m", "agent", *args]  # fmt: skip
    return subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False
    )


def refused(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """The one-line error of a command that refused its input (exit 2)."""
    err = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, err[-2000:])
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err[-2000:]
    for word in words:
        assert word in err, err
    return err


# -- 8 and 9: traces ------------------------------------------------------------------------------

GPUS, STEPS = 100, 150


@pytest.fixture(scope="module")
def good_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 GPUs x 150 steps: a small file whose per-sample arrays are 15,000 entries."""
    path = tmp_path_factory.mktemp("trace") / "good.parquet"
    with TraceWriter(
        path, time_base="twin", step_s=15, source={}, metrics=(Metric.POWER_W,)
    ) as writer:
        for k in range(STEPS):
            writer.append(
                build_snapshot(
                    time_s=15.0 * k,
                    node_of_gpu=[f"n{i // 8}" for i in range(GPUS)],
                    gpu=[i % 8 for i in range(GPUS)],
                    uuid=[f"GPU-{i}" for i in range(GPUS)],
                    model=["NVIDIA H100 80GB HBM3"] * GPUS,
                    job=[str(100 + i // 8) for i in range(GPUS)],
                    values={Metric.POWER_W: np.full(GPUS, 500.0)},
                    age_s=np.zeros(GPUS),
                    stale=np.zeros(GPUS, dtype=bool),
                )
            )
    return path


def rewrite(
    src: Path,
    dst: Path,
    header: Callable[[dict[str, Any]], Any] | None = None,
    steps: Callable[[dict[str, Any]], Any] | None = None,
    table: Callable[[pa.Table], pa.Table] | None = None,
    raw_header: bytes | None = None,
) -> Path:
    """`src` with its metadata or columns changed, written as one row group to `dst`."""
    data = pq.read_table(src)
    schema_meta = dict(data.schema.metadata or {})
    # The footer's own copies of the schema's metadata would win over the new ones: only the
    # per-step entry is carried over from it.
    footer = {
        k: v
        for k, v in (pq.ParquetFile(src).metadata.metadata or {}).items()
        if k == b"ooda.trace.steps"
    }
    if header is not None:
        schema_meta[b"ooda.trace"] = json.dumps(header(json.loads(schema_meta[b"ooda.trace"])))
    if raw_header is not None:
        schema_meta[b"ooda.trace"] = raw_header
    if steps is not None:
        footer[b"ooda.trace.steps"] = json.dumps(steps(json.loads(footer[b"ooda.trace.steps"])))
    if table is not None:
        data = table(data)
    writer = pq.ParquetWriter(dst, data.schema.with_metadata(schema_meta), compression="zstd")
    writer.write_table(data, row_group_size=data.num_rows)
    writer.add_key_value_metadata({k.decode(): v for k, v in footer.items()})
    writer.close()
    return dst


def long_job(data: pa.Table) -> pa.Table:
    """One job id of 200,000 characters among the others (a dictionary: stored once)."""
    i = data.column_names.index("job")
    dictionary = pa.array(["x" * 200_000, "101"])
    indices = pa.array(np.arange(data.num_rows) % 2, type=pa.int32())
    return data.set_column(i, "job", pa.DictionaryArray.from_arrays(indices, dictionary))


def test_a_long_string_in_a_small_trace_is_refused_before_it_is_padded(
    good_trace: Path, tmp_path: Path
) -> None:
    """numpy would pad all 15,000 job entries to 200,000 characters: 12 GB from a small file."""
    bad = rewrite(good_trace, tmp_path / "long-job.parquet", table=long_job)
    assert bad.stat().st_size < 300_000
    err = refused(ooda_limited("replay", str(bad)), str(bad), "column 'job'", "200000")
    assert "at most 256" in err


@pytest.mark.parametrize(
    ("name", "change", "words"),
    [
        ("huge-gpus", {"steps": lambda s: {**s, "gpus": [1e30] * len(s["gpus"])}}, ["gpus"]),
        ("nan-step", {"header": lambda h: {**h, "step_s": "nan"}}, ["step_s"]),
        ("negative-step", {"header": lambda h: {**h, "step_s": -15}}, ["step_s", "greater than 0"]),
        ("deep-header", {"raw_header": b'{"format": "ooda-trace", "version": 2, "x": '
                         + b"[" * 100_000 + b"]" * 100_000 + b"}"}, ["ooda.trace"]),
        ("deep-steps", {"steps": lambda s: {**s, "rows": [[[[[[[[1]]]]]]]]}}, ["rows"]),
        ("nan-budget", {"steps": lambda s: {**s, "budget_w": [-1.0] * len(s["gpus"])}},
         ["budget"]),
        ("bad-scenario", {"header": lambda h: {**h, "scenario": {"faults": [1]}}}, ["faults"]),
        ("huge-steps", {"steps": lambda s: {**s, "time_s": list(range(5_000_000))}}, ["time_s"]),
    ],
)  # fmt: skip
def test_hostile_trace_metadata_is_one_line_and_exit_2(
    good_trace: Path, tmp_path: Path, name: str, change: dict[str, Any], words: list[str]
) -> None:
    bad = rewrite(good_trace, tmp_path / f"{name}.parquet", **change)
    refused(ooda_limited("replay", str(bad)), str(bad), *words)


# -- 9: configs and CSV ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'dry_run = true\n[cluster]\nname = "caf\xe9"\n', ["line 3: not UTF-8"]),
        (b"x = " + b"[" * 50_000 + b"]" * 50_000 + b"\n", ["nested too deeply"]),
        (b"[policies.p]\nx = " + b"[" * 40 + b"]" * 40 + b"\n", ["nested deeper than 32"]),
        (b"[twin]\nseed = -1\n", ["twin.seed", "greater than or equal to 0"]),
        (b"[twin]\nseed = 36893488147419103232\n", ["twin.seed"]),
        (b'[daemon]\nstate_dir = "/var/lib/oo\\u0000da"\n', ["daemon.state_dir", "NUL"]),
        (b'[audit]\npath = "../../../etc/ooda-audit.jsonl"\n', ["audit.path", "'..'"]),
        (b"#" * (2 << 20), ["larger than 1048576 bytes"]),
    ],
)
def test_hostile_configs_are_one_line_and_exit_2(
    tmp_path: Path, content: bytes, words: list[str]
) -> None:
    path = tmp_path / "ooda.toml"
    path.write_bytes(content + b'\n[source]\nkind = "twin"\n')  # its one problem is the hostile one
    for command in (
        ["config", "check", str(path)],
        ["run", "--config", str(path), "--metrics-listen", "off"],
    ):
        refused(ooda_limited(*command), str(path), *words)


def test_a_huge_seed_within_the_bound_runs(tmp_path: Path) -> None:
    config = parse_config({"twin": {"seed": 2**63 - 1, "nodes": 1, "gpus_per_node": 2}})
    from agent.assembly import assemble

    runtime = assemble(config)
    try:
        assert not runtime.loop.cycle().errors
    finally:
        runtime.close()


def test_dev_zero_and_huge_lines_as_csv_are_refused_within_the_bound(tmp_path: Path) -> None:
    refused(ooda_limited("detect", "/dev/zero"), "/dev/zero", "larger than")
    refused(ooda_limited("forecast", "/dev/zero", "--horizon-steps", "2"), "/dev/zero", "larger")
    line = tmp_path / "line.csv"
    line.write_text("timestamp,value\n" + "1" * 20_000_000 + ",3\n")
    refused(ooda_limited("detect", str(line)), str(line), "line 2")


# -- 10: the state file ---------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [100, 200_000])
def test_a_deeply_nested_state_file_is_moved_aside(tmp_path: Path, depth: int) -> None:
    state = StateFile(tmp_path, "lab")
    nested = "[" * depth + "]" * depth
    state.path.write_text(
        '{"format": "ooda-daemon-state", "version": 1, "cluster": "lab", "parts": {"guard": '
        + nested
        + "}}"
    )
    loaded = state.load()
    assert loaded.problem is not None and "nested deeper" in loaded.problem
    assert loaded.moved_to is not None and loaded.moved_to.exists()
    assert not state.path.exists()


@pytest.mark.slow
def test_ooda_run_starts_fresh_from_a_deeply_nested_state_file(tmp_path: Path) -> None:
    cluster = f"deep-{uuid.uuid4().hex[:6]}"
    config = write(tmp_path / "ooda.toml", _one_node(cluster))
    (tmp_path / "state").mkdir(mode=0o700)
    state = tmp_path / "state" / f"{cluster}.state.json"
    state.write_text('{"parts": ' + "[" * 200_000 + "]" * 200_000 + "}")
    agent = DaemonProcess(config, state.parent, tmp_path / "agent.log")
    try:
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and agent.proc.poll() is None:
            if list(state.parent.glob(f"{state.name}.unreadable-*")) and state.exists():
                break  # moved aside, and a fresh state saved
            time.sleep(0.2)
        assert agent.proc.poll() is None, agent.log_path.read_text()[-3000:]
        assert agent.stop(timeout_s=30)[0] == 0
    finally:
        agent.kill()
    assert list(state.parent.glob(f"{state.name}.unreadable-*"))
    assert json.loads(state.read_text())["format"] == "ooda-daemon-state"


def _one_node(cluster: str) -> str:
    """`ooda run` over a one-node twin, a cycle a second (no audit log)."""
    return twin_config(cluster=cluster, interval_s=1, nodes=1, audit=None)


# -- 12: the node endpoint ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("node", "ok"),
    [
        ({"endpoints": {"node1": "http://node1:9440"}}, False),
        ({"endpoints": {"node1": "http://10.0.0.7:9440"}}, False),
        ({"endpoint_template": "http://{node}:9440"}, False),
        ({"endpoints": {"node1": "http://127.0.0.1:9440"}}, True),
        ({"endpoints": {"node1": "http://[::1]:9440"}}, True),
        ({"endpoints": {"node1": "http://localhost:9440"}}, True),
        ({"endpoint_template": "https://{node}:9440"}, True),
        ({"endpoints": {"node1": "unix:///run/ooda/node.sock"}}, True),
    ],
)
def test_plain_http_node_endpoints_only_on_loopback(node: dict[str, Any], ok: bool) -> None:
    data = {"actuators": {"caps": "node", "node": {"token_file": "/t", **node}}}
    if ok:
        parse_config(data)
        return
    with pytest.raises(ConfigError, match="in clear"):
        parse_config(data)


# -- 13: one agent per cluster, whatever its state directory --------------------------------------


def test_one_agent_per_cluster_across_state_directories(tmp_path: Path) -> None:
    cluster = f"one-{uuid.uuid4().hex[:6]}"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = InstanceLock(tmp_path / "a", cluster)
    first.acquire()
    try:
        second = InstanceLock(tmp_path / "b", cluster)
        with pytest.raises(AlreadyRunningError, match="another state directory") as exc:
            second.acquire()
        assert f"pid {os.getpid()}" in str(exc.value)
        assert not second.held
        other = InstanceLock(tmp_path / "b", cluster + "-other")  # another cluster: fine
        other.acquire()
        other.release()
    finally:
        first.release()
    again = InstanceLock(tmp_path / "b", cluster)  # released with the first
    again.acquire()
    again.release()


def test_named_replicas_of_a_cluster_in_a_site_may_share_a_host(tmp_path: Path) -> None:
    """Replicas in a site elect one leader in etcd: two with their own names and state
    directories may run on one host (the failover test does), one name twice may not."""
    cluster = f"site-{uuid.uuid4().hex[:6]}"
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    a = InstanceLock(tmp_path / "a", cluster, replica="a")
    b = InstanceLock(tmp_path / "b", cluster, replica="b")
    a.acquire()
    try:
        b.acquire()
        b.release()
        with pytest.raises(AlreadyRunningError, match="another state directory"):
            InstanceLock(tmp_path / "c", cluster, replica="a").acquire()
    finally:
        a.release()


@pytest.mark.slow
def test_a_second_ooda_run_with_another_state_dir_refuses_to_start(tmp_path: Path) -> None:
    cluster = f"twice-{uuid.uuid4().hex[:6]}"
    config = write(tmp_path / "ooda.toml", _one_node(cluster))
    first = DaemonProcess(config, tmp_path / "one", tmp_path / "one.log")
    try:
        deadline = time.monotonic() + 60.0
        while not (tmp_path / "one" / f"{cluster}.lock").exists():
            assert time.monotonic() < deadline and first.proc.poll() is None
            time.sleep(0.1)
        time.sleep(0.5)
        second = subprocess.run(
            [sys.executable, "-m", "agent", "run", "--config", str(config), "--metrics-listen",
             "off", "--state-dir", str(tmp_path / "two")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )  # fmt: skip
        assert second.returncode != 0
        assert "already running on this host with another state directory" in second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert first.proc.poll() is None
    finally:
        first.stop(timeout_s=30)


# -- 14: rollback from the decision records -------------------------------------------------------


def _targets(*gpus: int) -> GpuTargets:
    return GpuTargets(
        node=np.asarray(["node1"] * len(gpus)),
        gpu=np.asarray(gpus, dtype=np.int64),
        uuid=np.asarray([f"GPU-{g}" for g in gpus]),
    )


def test_rollback_finds_a_cap_whose_action_record_was_never_written(tmp_path: Path) -> None:
    """The decision is fsynced before the action; the action record may never be (a full
    disk): the decision alone says the cap may be in force."""
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path=path)
    cap = SetPowerCap(
        policy="power_budget", reason="over budget", targets=_targets(0, 1, 2),
        watts=np.asarray([450.0, 460.0, 470.0]),
    )  # fmt: skip
    audit.decision("d-1", cap, False, 10.0)
    # The guard refused GPU 2 of it: never sent.
    audit.refusal("d-1", cap.subset(np.asarray([False, False, True])), "cooldown", False, 10.0)
    dry = SetPowerCap(
        policy="power_budget", reason="dry", targets=_targets(5), watts=np.asarray([300.0])
    )
    audit.decision("d-2", dry, True, 11.0)  # dry-run: nothing in force
    audit.close()
    records = list(read_records(path))
    caps, watts = our_caps(records)
    assert caps.names() == ["node1/gpu0", "node1/gpu1"]
    assert watts.tolist() == [450.0, 460.0]
    assert caps.uuid.tolist() == ["GPU-0", "GPU-1"]
    plan = plan_rollback(records, None)
    assert plan.summary()["gpus"] == ["node1/gpu0", "node1/gpu1"]

    # An applied release of GPU 0 since: only GPU 1 may still be capped.
    from agent.core.intents import Action, Outcome

    audit = AuditLog(path=path)
    release = ReleasePowerCap(policy="rollback", reason="undo", targets=_targets(0))
    audit.decision("d-3", release, False, 20.0)
    audit.action(Action("a-3", "d-3", release, Outcome.APPLIED, False, time_s=20.0))
    audit.close()
    caps, _ = our_caps(list(read_records(path)))
    assert caps.names() == ["node1/gpu1"]

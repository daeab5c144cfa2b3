"""Faults with real services (issue 9, part 2): node daemons down or slow, NVML errors behind a
real node daemon, slurmctld down, and broken samples and hostile label values through a real
Prometheus. Each case: the loop keeps running, takes no unsafe action, audits everything it does,
and says what is wrong."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.act.audit import AuditLog
from agent.act.node_client import NodeCapActuator, NodeClientSettings
from agent.assembly import assemble
from agent.config import parse_config
from agent.core.clock import Clock, FakeClock
from agent.core.intents import DrainNode, Outcome, SetPowerCap
from agent.core.protocols import CapActuator, TelemetrySource
from agent.core.snapshot import Metric
from agent.loop import Loop
from agent.node.nvml import NvmlBackend
from agent.node.server import NodeDaemon, NodeSettings
from agent.observe.nvml import NvmlSource
from agent.observe.prometheus import PrometheusSettings, PrometheusSource
from agent.sim.adapters import TwinSource
from policies.power_budget import PowerBudget, PowerBudgetSettings
from tests.fakes import make_loop
from tests.http_helpers import LoopbackServer
from tests.integration.conftest import PrometheusFactory
from tests.integration.slurm_cluster import SlurmCluster
from tests.node_helpers import write_token
from tests.test_faults import assert_every_action_has_its_decision, audit_lines
from tests.test_node_client import FALLBACK_W, Cluster
from tests.test_node_nvml import FakeNvml, FakeNvmlError

pytestmark = pytest.mark.integration


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ooda-fr-"))  # Unix socket paths stay short
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- node daemons down or slow --------------------------------------------------------------------


def budget_loop(
    source: TelemetrySource,
    caps: CapActuator,
    audit: AuditLog,
    clock: Clock,
    budget_w: float,
    lease_s: float = 120.0,
) -> Loop:
    """A live loop (nothing dry) with power_budget alone, capping through `caps`."""
    loop = make_loop(
        source,
        [PowerBudget(PowerBudgetSettings())],
        caps=caps,
        audit=audit,
        clock=clock,
        budget_w=budget_w,
    )
    loop.executor.lease_s = lease_s
    return loop


def test_node_daemons_down_or_slow_cost_their_timeout_and_fail_audited(short_dir: Path) -> None:
    """node1, node2 healthy; node3 answers in 1 s (timeout 0.3 s); node4 has no daemon; node5
    has no endpoint. The loop caps what it can, fails the rest with the node named, and goes on;
    a backward clock jump does not stop lease renewal."""
    cluster = Cluster(short_dir)
    clock = FakeClock(1_000.0)
    caps = NodeCapActuator(cluster.settings(renew_min_age_s=30.0), clock=clock)
    audit_path = short_dir / "audit.jsonl"
    audit = AuditLog(path=audit_path)
    # 10 GPUs at about 500 W each: caps needed
    loop = budget_loop(TwinSource(cluster.twin), caps, audit, clock, 2_500.0, lease_s=5.0)
    try:
        reports = []
        for _ in range(3):
            with cluster.lock:
                cluster.twin.step(15.0)
            clock.advance(15.0)
            t0 = time.monotonic()
            reports.append(loop.cycle())
            assert time.monotonic() - t0 < 5.0  # bounded by the client's deadline
        first = reports[0]
        failed = [a for a in first.actions if a.outcome is Outcome.FAILED]
        applied = [a for a in first.actions if a.outcome is Outcome.APPLIED]
        assert applied and failed
        failed_nodes = {str(n) for a in failed for n in a.intent.targets.node}  # type: ignore[attr-defined]
        assert failed_nodes <= {"node3", "node4", "node5"}
        detail = " ".join(a.detail for a in failed)
        assert "node4: unreachable" in detail and "node5: no endpoint" in detail
        for node, gpu in ((1, 0), (1, 1), (2, 0), (2, 1)):
            assert 200.0 <= cluster.cap(node, gpu) <= 700.0
        # The clock jumps back an hour: leases set "in the future" are renewed all the same,
        # not left to lapse to the fallback cap.
        clock.set(clock.now() - 3_600.0)
        renewed, result = caps.renew_leases(5.0)
        assert len(renewed) >= 1 and result.ok[np.isin(renewed.node, ["node1", "node2"])].all()
        assert cluster.cap(1, 0) != FALLBACK_W
    finally:
        audit.close()
        caps.close()
        cluster.close()
    records = audit_lines(audit_path)
    assert_every_action_has_its_decision(records)
    outcomes = {r["outcome"] for r in records if r["event"] == "action"}
    assert {"applied", "failed"} <= outcomes


def test_a_node_that_acted_but_answered_too_late_has_its_caps_owned(short_dir: Path) -> None:
    """node3's daemon sets its caps a second after the call gave up (0.3 s, no retry): the
    cap call failed, but the caps are in force. At the next cycle telemetry shows them, so they
    are ours (audited), not caps in force that nobody renews or releases. node4 and node5 never
    acted: their failed caps are not in force, which is no news."""
    cluster = Cluster(short_dir)
    clock = FakeClock(1_000.0)
    # node3 is not asked again at the next cycle (its backoff): only telemetry can tell.
    caps = NodeCapActuator(cluster.settings(retries=0, unreachable_backoff_s=600.0), clock=clock)
    audit_path = short_dir / "audit.jsonl"
    audit = AuditLog(path=audit_path)
    loop = budget_loop(TwinSource(cluster.twin), caps, audit, clock, 2_500.0)
    try:
        with cluster.lock:
            cluster.twin.step(15.0)
        failed = [a for a in loop.cycle().actions if a.outcome is Outcome.FAILED]
        asked = {
            name: float(w)
            for a in failed
            for name, w in zip(a.intent.targets.names(), a.intent.watts, strict=True)  # type: ignore[attr-defined]
        }
        assert {"node3/gpu0", "node3/gpu1"} <= asked.keys()
        deadline = time.monotonic() + 10.0
        while not all(abs(cluster.cap(3, g) - asked[f"node3/gpu{g}"]) < 1.0 for g in (0, 1)):
            assert time.monotonic() < deadline, "node3 never set its caps"
            time.sleep(0.05)
        clock.advance(15.0)
        loop.cycle()
        node3 = cluster.twin.uuid[4:6]
        assert loop.ledger.capped_by_us(node3, recorded=False).all()
    finally:
        audit.close()
        caps.close()
        cluster.close()
    (settled,) = [r for r in audit_lines(audit_path) if r["event"] == "guard_caps_recovered"]
    assert settled["adopted"] == ["node3/gpu0", "node3/gpu1"]
    assert settled["not_in_force"] == []  # node4's and node5's: failed, as their actions say


# -- NVML errors behind a real node daemon ----------------------------------------------------


class PerGpuNvml(FakeNvml):
    """The fake pynvml, failing per GPU: `fail_gpu[(call, index)] = NVML error code`."""

    def __init__(self, gpus: int) -> None:
        super().__init__(gpus=gpus)
        self.fail_gpu: dict[tuple[str, int], int] = {}
        self.power_mw = [650_000] * gpus

    def _maybe_fail(self, name: str, *args: Any) -> None:
        super()._maybe_fail(name, *args)
        code = self.fail_gpu.get((name, int(args[0]))) if args else None
        if code is not None:
            raise FakeNvmlError(code)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        self._maybe_fail("power", h)
        return min(self.power_mw[h], self.limits_mw[h])


def test_nvml_errors_fail_actions_audited_and_lost_gpus_are_never_acted_on(
    short_dir: Path,
) -> None:
    nvml = PerGpuNvml(gpus=4)
    token = write_token(short_dir / "token")
    assert token
    daemon = NodeDaemon(
        NvmlBackend(nvml),
        NodeSettings(
            token_file=short_dir / "token",
            socket_path=short_dir / "node1.sock",
            fallback_cap_w=FALLBACK_W,
            check_interval_s=0.05,
        ),
    )
    clock = FakeClock(100.0)
    settings = NodeClientSettings.model_validate(
        {
            "endpoints": {"node1": f"unix://{short_dir}/node1.sock"},
            "token_file": short_dir / "token",
            "timeout_s": 1.0,
            "retries": 0,
            "renew_min_age_s": 0.0,
        }
    )
    audit_path = short_dir / "audit.jsonl"
    with daemon:
        caps = NodeCapActuator(settings, clock=clock)
        audit = AuditLog(path=audit_path)
        source = NvmlSource(NvmlBackend(nvml), "node1")
        # 4 GPUs at 650 W: caps needed
        loop = budget_loop(source, caps, audit, clock, 1_600.0, lease_s=60.0)
        try:
            nvml.fail_gpu[("set", 1)] = 4  # NVML_ERROR_NO_PERMISSION on GPU 1
            nvml.fail_gpu[("limit", 3)] = 15  # GPU 3 fell off the bus
            reports = []
            for _ in range(3):
                clock.advance(15.0)
                reports.append(loop.cycle())
        finally:
            audit.close()
            caps.close()
    first = reports[0]
    assert any("GPU lost" in e for e in first.errors), first.errors  # said
    assert first.snapshot.stale[3]
    for report in reports:
        for action in report.actions:
            assert isinstance(action.intent, SetPowerCap)
            assert "GPU-nvml-3" not in action.intent.targets.uuid.tolist()  # never the lost one
            assert ((action.intent.watts >= 200.0) & (action.intent.watts <= 700.0)).all()
    failed = [a for r in reports for a in r.actions if a.outcome is Outcome.FAILED]
    assert failed and all(a.intent.targets.uuid.tolist() == ["GPU-nvml-1"] for a in failed)  # type: ignore[attr-defined]
    assert any("ermission" in a.detail for a in failed), [a.detail for a in failed]
    assert min(nvml.limits_mw) >= 200_000 and max(nvml.limits_mw) <= 700_000
    assert nvml.limits_mw[1] == 700_000  # the refused one is unchanged
    records = audit_lines(audit_path)
    assert_every_action_has_its_decision(records)
    assert any(r["event"] == "action" and r["outcome"] == "failed" for r in records)


# -- slurmctld down -------------------------------------------------------------------------------


def test_slurmctld_down_no_drain_without_node_states_and_the_loop_goes_on(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    config = parse_config(
        {
            "dry_run": False,
            "cluster": {"budget_w": 20_000.0},
            "twin": {"nodes": 4, "gpus_per_node": 4, "seed": 5, "faults": ["xid=79:node2/gpu1@0"]},
            "daemon": {"state_dir": str(tmp_path / "state")},
            "actuators": {
                "placement": "slurm",
                "slurm": {"slurm_conf": str(slurm.slurm_conf), "timeout_s": 1.5},
            },
        }
    )
    audit_path = tmp_path / "audit.jsonl"
    runtime = assemble(config, audit=AuditLog(path=audit_path))
    slurm.stop_controller()
    try:
        for _ in range(2):
            t0 = time.monotonic()
            report = runtime.loop.cycle()
            assert time.monotonic() - t0 < 10.0
            assert any("slurmctld" in e or "timed out" in e for e in report.errors), report.errors
            drains = [a for a in report.actions if isinstance(a.intent, DrainNode)]
            # The XID calls for a drain; with the controller down it fails, audited, naming why.
            assert drains and all(a.outcome is Outcome.FAILED for a in drains), drains
            assert all("not answering" in a.detail for a in drains)
    finally:
        slurm.start_controller()
    assert "DRAIN" not in slurm.node("node2")["state_flags"]
    # slurmctld back: the drain the XID calls for goes through, audited, once.
    report = runtime.loop.cycle()
    drains = [a for a in report.actions if isinstance(a.intent, DrainNode)]
    assert [a.outcome for a in drains] == [Outcome.APPLIED]
    assert "DRAIN" in slurm.node("node2")["state_flags"]
    runtime.close()
    records = audit_lines(audit_path)
    assert_every_action_has_its_decision(records)


# -- broken samples and hostile labels through a real Prometheus ---------------------------------


def static_exporter(text: str) -> LoopbackServer:
    """A loopback exporter serving fixed text (what a broken dcgm-exporter might send)."""
    body = text.encode()
    return LoopbackServer(lambda *_: (200, "text/plain; version=0.0.4", body))


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _exposition(rows: list[tuple[str, int, float, str]]) -> str:
    """(host, gpu, power, cluster label) -> dcgm-exporter-shaped text."""
    lines = ["# TYPE DCGM_FI_DEV_POWER_USAGE gauge"]
    for host, gpu, power, cluster in rows:
        labels = (
            f'gpu="{gpu}",UUID="GPU-{host}-{gpu}",Hostname="{host}",'
            f'modelName="NVIDIA H100 80GB HBM3",cluster="{_label_value(cluster)}"'
        )
        lines.append(f"DCGM_FI_DEV_POWER_USAGE{{{labels}}} {power!r}".replace("inf", "Inf"))
    return "\n".join(lines) + "\n"


def test_nan_negative_absurd_and_duplicated_samples_through_a_real_prometheus(
    prometheus_factory: PrometheusFactory, tmp_path: Path
) -> None:
    rows = [
        ("n1", 0, 450.0, "a"),
        ("n1", 1, float("nan"), "a"),
        ("n1", 2, -50.0, "a"),
        ("n1", 3, 1e9, "a"),
    ]
    one = static_exporter(_exposition(rows))
    # A second exporter serves n1/gpu0 again (two scrape jobs for one GPU): a duplicate.
    two = static_exporter(_exposition([("n1", 0, 460.0, "a")]))
    try:
        prom = prometheus_factory({"dcgm": [one.target], "dcgm-again": [two.target]})
        prom.wait_for_gpus(4, timeout_s=30.0)
        source = prom.source()
        recorded: list[Any] = []

        class Recording:
            def set_caps(self, targets: Any, watts: Any, lease_s: float) -> Any:
                from agent.core.protocols import CapResult

                recorded.append((targets, watts))
                return CapResult.all_ok(len(targets))

            def release_caps(self, targets: Any) -> Any:
                from agent.core.protocols import CapResult

                return CapResult.all_ok(len(targets))

        audit_path = tmp_path / "audit.jsonl"
        audit = AuditLog(path=audit_path)
        loop = budget_loop(source, Recording(), audit, FakeClock(time.time()), 600.0)
        report = loop.cycle()
        audit.close()
        source.close()
    finally:
        one.close()
        two.close()
    snap = report.snapshot
    assert snap.n_gpus == 4  # the duplicate is one GPU, not two
    power, ok = snap.column(Metric.POWER_W)
    assert ok.tolist() == [True, False, False, False]
    assert power[0] in (450.0, 460.0)
    assert any("implausible" in e for e in report.errors), report.errors
    for _, watts in recorded:
        assert ((watts >= 200.0) & (watts <= 700.0)).all()
    assert report.situation.fleet_power_w < 10_000.0
    assert_every_action_has_its_decision(audit_lines(audit_path))


def test_hostile_configured_label_values_match_exactly_in_a_real_prometheus(
    prometheus_factory: PrometheusFactory,
) -> None:
    hostile = ['a"}) or vector(1) #', "b\\", "c\nd", 'e",cluster!="', ".*", "f|a"]
    rows = [(f"h{i}", 0, 100.0 + i, value) for i, value in enumerate(hostile)]
    rows.append(("plain", 0, 999.0, "a"))
    exporter = static_exporter(_exposition(rows))
    try:
        prom = prometheus_factory({"dcgm": [exporter.target]})
        prom.wait_for_gpus(len(rows), timeout_s=30.0)
        now = time.time()
        for i, value in enumerate(hostile):
            source = PrometheusSource(
                PrometheusSettings(url=prom.url, scrape_interval_s=1.0, match={"cluster": value})
            )
            snap = source.observe(now)
            source.close()
            assert not snap.errors, (value, snap.errors)
            assert snap.node_of().tolist() == [f"h{i}"], value  # exactly that value, nothing else
            assert snap.column(Metric.POWER_W)[0].tolist() == [100.0 + i]
    finally:
        exporter.close()


def test_exposition_helper_escapes() -> None:
    assert json.loads('"' + _label_value('a"\\\n') + '"') == 'a"\\\n'

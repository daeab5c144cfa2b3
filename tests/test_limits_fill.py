from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.core.protocols import GpuLimits
from agent.core.snapshot import Metric, Snapshot
from agent.observe.limits import LimitsFilledSource
from tests.conftest import make_snapshot


class FakeLimits:
    """Hand-written GpuLimitsSource: node1's daemon answers, node2's is down."""

    def __init__(self) -> None:
        self.calls = 0

    def gpu_limits(self, node_names: Sequence[str]) -> GpuLimits:
        self.calls += 1
        n = 4
        return GpuLimits(
            node=np.array(["node1"] * n),
            gpu=np.arange(n),
            uuid=np.array([f"GPU-{i:04d}" for i in range(n)]),
            min_w=np.full(n, 200.0),
            max_w=np.full(n, 700.0),
            default_w=np.full(n, 700.0),
            power_limit_w=np.array([450.0, 700.0, 700.0, np.nan]),
            enforced_limit_w=np.array([450.0, 700.0, 700.0, 700.0]),
            lease_remaining_s=np.full(n, np.nan),
            errors={"node2": "connection refused"},
        )


class Fixed:
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def observe(self, now_s: float) -> Snapshot:
        return self.snap


def test_missing_limits_come_from_the_node_daemons() -> None:
    snap = make_snapshot([300.0] * 8, stale=[False] * 7 + [True])
    values = {k: v for k, v in snap.values.items() if k is not Metric.POWER_LIMIT_W}
    valid = {k: v for k, v in snap.valid.items() if k is not Metric.POWER_LIMIT_W}
    from dataclasses import replace

    snap = replace(snap, values=values, valid=valid)  # as dcgm-exporter's default counters
    source = LimitsFilledSource(Fixed(snap), FakeLimits())
    out = source.observe(0.0)
    limit, ok = out.column(Metric.POWER_LIMIT_W)
    assert limit[:3].tolist() == [450.0, 700.0, 700.0]
    assert not ok[3] and np.isnan(limit[3])  # the daemon did not know: still missing
    assert not ok[4:].any()  # node2's daemon is down: missing, never zero
    mx, mx_ok = out.column(Metric.MAX_LIMIT_W)
    assert mx_ok[:4].all() and not mx_ok[4:].any() and mx[:4].tolist() == [700.0] * 4
    assert any("node2" in e and "connection refused" in e for e in out.errors)


def test_nothing_asked_when_the_exporter_sends_every_limit() -> None:
    snap = make_snapshot([300.0] * 4)
    values = dict(snap.values)
    valid = dict(snap.valid)
    for metric in (
        Metric.MIN_LIMIT_W,
        Metric.MAX_LIMIT_W,
        Metric.DEFAULT_LIMIT_W,
        Metric.ENFORCED_LIMIT_W,
    ):
        values[metric] = np.full(4, 700.0)
        valid[metric] = np.ones(4, dtype=bool)
    from dataclasses import replace

    limits = FakeLimits()
    LimitsFilledSource(Fixed(replace(snap, values=values, valid=valid)), limits).observe(0.0)
    assert limits.calls == 0

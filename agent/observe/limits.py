"""GPU limits from the node daemons, for telemetry that lacks them.

dcgm-exporter does not export the power-limit fields by default, so a Prometheus source often
reports limits as missing. When the agent reaches the nodes' daemons anyway (to set caps), this
wrapper fills what the exporter left out: each GPU's constraints (min/max/default, re-read every
`refresh_s`, they do not change) and its current and enforced limits (every cycle), matched by
UUID. What a node daemon cannot tell stays missing, and the node's error is reported; values the
exporter did send are never overwritten.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import numpy.typing as npt

from agent.core.protocols import GpuLimits, GpuLimitsSource, TelemetrySource
from agent.core.snapshot import Metric, Snapshot

FloatArray = npt.NDArray[np.float64]

_FIELDS = (
    (Metric.MIN_LIMIT_W, "min_w"),
    (Metric.MAX_LIMIT_W, "max_w"),
    (Metric.DEFAULT_LIMIT_W, "default_w"),
    (Metric.POWER_LIMIT_W, "power_limit_w"),
    (Metric.ENFORCED_LIMIT_W, "enforced_limit_w"),
)


class LimitsFilledSource:
    def __init__(self, inner: TelemetrySource, limits: GpuLimitsSource) -> None:
        self.inner = inner
        self.limits = limits

    def observe(self, now_s: float) -> Snapshot:
        snapshot = self.inner.observe(now_s)
        if snapshot.n_gpus == 0:
            return snapshot
        wanted = [m for m, _ in _FIELDS if not bool(snapshot.usable(m)[snapshot.fresh].all())]
        if not wanted:
            return snapshot  # the exporter sends them all: nothing to ask the nodes
        try:
            limits = self.limits.gpu_limits([str(n) for n in snapshot.node_names])
        except Exception as exc:  # the nodes' trouble is reported, never fatal to observing
            return replace(snapshot, errors=(*snapshot.errors, f"node limits unavailable: {exc}"))
        return fill_limits(snapshot, limits, wanted)


def fill_limits(
    snapshot: Snapshot, limits: GpuLimits, wanted: list[Metric] | None = None
) -> Snapshot:
    """The snapshot with missing limit columns filled from the node daemons (by UUID)."""
    order = np.argsort(limits.uuid, kind="stable")
    sorted_uuid = limits.uuid[order]
    if sorted_uuid.size:
        pos = np.clip(np.searchsorted(sorted_uuid, snapshot.uuid), 0, sorted_uuid.size - 1)
        found = (sorted_uuid[pos] == snapshot.uuid) & snapshot.fresh
        src = order[pos]
    else:
        found = np.zeros(snapshot.n_gpus, dtype=bool)
        src = np.zeros(snapshot.n_gpus, dtype=np.int64)
    values = dict(snapshot.values)
    valid = dict(snapshot.valid)
    for metric, attr in _FIELDS:
        if wanted is not None and metric not in wanted:
            continue
        have, ok = snapshot.column(metric)
        column: FloatArray = getattr(limits, attr)
        from_node = np.where(found, column[src] if column.size else np.nan, np.nan)
        fill = ~ok & np.isfinite(from_node)
        if not fill.any():
            continue
        values[metric] = np.where(fill, from_node, have)
        valid[metric] = ok | fill
    errors = snapshot.errors + tuple(
        f"node {n}: limits unreadable: {e}" for n, e in limits.errors.items()
    )
    return replace(snapshot, values=values, valid=valid, errors=errors)

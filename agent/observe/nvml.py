"""The GPUs of this node, read through the GpuDevice protocol (NVML on a real node, the twin in
tests), as a Snapshot.

The NVML implementation of the protocol (agent/node/nvml.py) maps pynvml's errors to the domain's
GpuError classes; the backend is passed in, so this module never imports pynvml. Each reading is
taken on its own: a field the GPU does not support, or that needs privileges this process lacks, is
missing (NaN) and said so in `errors`; a GPU that is lost (fell off the bus) is stale, with no
values and the age of its last good reading. Nothing failed is ever reported as 0.

Reading a node's GPUs is inherently per device (NVML has no bulk call); a node has at most a few
dozen, so the loop here is over a node's GPUs, never over a fleet.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from agent.core.errors import (
    GpuError,
    GpuLostError,
    GpuNoPermissionError,
    GpuNotSupportedError,
    TelemetryError,
)
from agent.core.protocols import GpuBackend, GpuDevice, HealthReporter, XidReporter
from agent.core.snapshot import Metric, Snapshot, build_snapshot

_PROBLEM: dict[type[GpuError], str] = {
    GpuNotSupportedError: "not supported",
    GpuNoPermissionError: "no permission",
}


class NvmlSource:
    """A TelemetrySource over one node's GPUs. `now_s` comes from the loop's clock."""

    def __init__(self, backend: GpuBackend, node_name: str) -> None:
        self.backend = backend
        self.node_name = node_name
        self._last_ok_s: dict[str, float] = {}  # UUID -> time of its last complete reading

    def observe(self, now_s: float) -> Snapshot:
        try:
            devices = list(self.backend.devices())
        except GpuError as exc:
            raise TelemetryError(f"nvml on {self.node_name}: cannot list GPUs: {exc}") from exc
        n = len(devices)
        cols = {m: np.full(n, np.nan) for m in METRICS}
        uuid: list[str] = []
        model: list[str] = []
        index = np.zeros(n, dtype=np.int64)
        stale = np.zeros(n, dtype=bool)
        age = np.zeros(n)
        errors: list[str] = []
        for row, dev in enumerate(devices):
            index[row] = dev.index
            uuid.append(dev.uuid)
            model.append(dev.model_name)
            target = f"{self.node_name}/gpu{dev.index}"
            problems: dict[str, list[str]] = {}
            lost: GpuLostError | None = None
            for metrics, read in _READINGS:
                try:
                    for metric, value in zip(metrics, read(dev), strict=True):
                        cols[metric][row] = value
                except GpuLostError as exc:
                    lost = exc
                    break
                except GpuError as exc:
                    problem = _PROBLEM.get(type(exc), f"error ({exc})")
                    problems.setdefault(problem, []).extend(str(m) for m in metrics)
            if lost is not None:
                for column in cols.values():
                    column[row] = np.nan
                stale[row] = True
                last = self._last_ok_s.get(dev.uuid)
                age[row] = math.nan if last is None else now_s - last
                errors.append(f"{target} ({dev.uuid}): GPU lost: {lost}")
                continue
            self._last_ok_s[dev.uuid] = now_s
            for problem, names in problems.items():
                errors.append(f"{target}: {problem}: {', '.join(names)}")
        return build_snapshot(
            time_s=now_s,
            node_of_gpu=np.full(n, self.node_name),
            gpu=index,
            uuid=np.asarray(uuid, dtype=np.str_),
            model=np.asarray(model, dtype=np.str_),
            job=np.full(n, "", dtype=np.str_),  # NVML does not know the scheduler's jobs
            values=cols,
            age_s=age,
            stale=stale,
            errors=tuple(errors),
        )


def _xid(dev: GpuDevice) -> tuple[float, ...]:
    if isinstance(dev, XidReporter):
        return (float(dev.last_xid()),)
    raise GpuNotSupportedError("this backend reports no XIDs")


def _health(dev: GpuDevice) -> HealthReporter:
    if isinstance(dev, HealthReporter):
        return dev
    raise GpuNotSupportedError("this backend reports no health counters")


def _remapped_rows(dev: GpuDevice) -> tuple[float, ...]:
    uncorrectable, failed = _health(dev).remapped_rows()
    return (float(uncorrectable), float(failed))


def _limits(dev: GpuDevice) -> tuple[float, ...]:
    c = dev.power_constraints()
    return (c.min_w, c.max_w, c.default_w)


# One device call each, and the fields it fills.
_READINGS: tuple[tuple[tuple[Metric, ...], Callable[[GpuDevice], tuple[float, ...]]], ...] = (
    ((Metric.POWER_W,), lambda d: (d.power_usage_w(),)),
    ((Metric.POWER_LIMIT_W,), lambda d: (d.power_limit_w(),)),
    ((Metric.ENFORCED_LIMIT_W,), lambda d: (d.enforced_power_limit_w(),)),
    ((Metric.MIN_LIMIT_W, Metric.MAX_LIMIT_W, Metric.DEFAULT_LIMIT_W), _limits),
    ((Metric.TEMP_C,), lambda d: (d.temperature_c(),)),
    ((Metric.UTIL_PCT, Metric.MEM_UTIL_PCT), lambda d: d.utilization_pct()),
    ((Metric.SM_CLOCK_MHZ,), lambda d: (d.sm_clock_mhz(),)),
    ((Metric.ENERGY_J,), lambda d: (d.total_energy_j(),)),
    ((Metric.XID,), _xid),
    ((Metric.ECC_DBE_TOTAL,), lambda d: (float(_health(d).ecc_dbe_volatile()),)),
    ((Metric.REMAPPED_ROWS_UNCORRECTABLE, Metric.ROW_REMAP_FAILURE), _remapped_rows),
    ((Metric.CLOCKS_EVENT_REASONS,), lambda d: (float(_health(d).clocks_event_reasons()),)),
)
METRICS: tuple[Metric, ...] = tuple(m for metrics, _ in _READINGS for m in metrics)

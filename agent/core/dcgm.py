"""Facts about NVIDIA dcgm-exporter's output that the twin (which serves it), the Prometheus source
(which reads it) and traces (which export it) must agree on: field names, Prometheus types, units
and labels. Names and help texts follow dcgm-exporter's etc/default-counters.csv; field IDs are in
DCGM's dcgm_fields.h.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from agent.core.snapshot import Metric


@dataclass(frozen=True, slots=True)
class DcgmField:
    """One dcgm-exporter metric family and the Snapshot metric it maps to."""

    name: str
    kind: Literal["gauge", "counter"]  # dcgm-exporter's counters carry no `_total` suffix
    help: str
    metric: Metric
    to_metric: float = 1.0  # multiply the exported value by this to get the metric's unit
    integer: bool = False  # DCGM reports an integer (NVML: whole degrees, MHz, percent)
    default: bool = False  # in dcgm-exporter's default-counters.csv (exported out of the box)


DCGM_FIELDS: tuple[DcgmField, ...] = (
    DcgmField(
        "DCGM_FI_DEV_SM_CLOCK",
        "gauge",
        "SM clock frequency (in MHz).",
        Metric.SM_CLOCK_MHZ,
        integer=True,
        default=True,
    ),
    DcgmField(
        "DCGM_FI_DEV_GPU_TEMP",
        "gauge",
        "GPU temperature (in C).",
        Metric.TEMP_C,
        integer=True,
        default=True,
    ),
    DcgmField(
        "DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", Metric.POWER_W, default=True
    ),
    DcgmField(
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "counter",
        "Total energy consumption since boot (in mJ).",
        Metric.ENERGY_J,
        to_metric=1e-3,
        integer=True,
        default=True,
    ),
    DcgmField(
        "DCGM_FI_DEV_GPU_UTIL",
        "gauge",
        "GPU utilization (in %).",
        Metric.UTIL_PCT,
        integer=True,
        default=True,
    ),
    DcgmField(
        "DCGM_FI_DEV_MEM_COPY_UTIL",
        "gauge",
        "Memory utilization (in %).",
        Metric.MEM_UTIL_PCT,
        integer=True,
        default=True,
    ),
    DcgmField(
        "DCGM_FI_DEV_XID_ERRORS",
        "gauge",
        "Value of the last XID error encountered.",
        Metric.XID,
        integer=True,
        default=True,
    ),
    DcgmField(
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        "counter",
        "Number of remapped rows for uncorrectable errors",
        Metric.REMAPPED_ROWS_UNCORRECTABLE,
        integer=True,
        default=True,
    ),
    DcgmField(
        "DCGM_FI_DEV_ROW_REMAP_FAILURE",
        "gauge",
        "Whether remapping of rows has failed",
        Metric.ROW_REMAP_FAILURE,
        integer=True,
        default=True,
    ),
    # Not exported by default: operators enable them in dcgm-exporter's counters file.
    DcgmField(
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "counter",
        "Total number of double-bit volatile ECC errors.",
        Metric.ECC_DBE_TOTAL,
        integer=True,
    ),
    DcgmField(
        "DCGM_FI_DEV_POWER_MGMT_LIMIT",
        "gauge",
        "Power management limit (in W).",
        Metric.POWER_LIMIT_W,
    ),
    DcgmField(
        "DCGM_FI_DEV_ENFORCED_POWER_LIMIT",
        "gauge",
        "Effective power limit that the driver enforces after taking into account all limiters "
        "(in W).",
        Metric.ENFORCED_LIMIT_W,
    ),
    DcgmField(
        "DCGM_FI_DEV_CLOCKS_EVENT_REASONS",
        "gauge",
        "Current clock event reasons (bitmask of why clocks are held down; 0x4: the power cap). "
        "Older dcgm-exporters call it DCGM_FI_DEV_CLOCK_THROTTLE_REASONS.",
        Metric.CLOCKS_EVENT_REASONS,
        integer=True,
    ),
    DcgmField(
        "DCGM_FI_DEV_POWER_MGMT_LIMIT_MIN",
        "gauge",
        "Minimum power management limit (in W).",
        Metric.MIN_LIMIT_W,
    ),
    DcgmField(
        "DCGM_FI_DEV_POWER_MGMT_LIMIT_MAX",
        "gauge",
        "Maximum power management limit (in W).",
        Metric.MAX_LIMIT_W,
    ),
    DcgmField(
        "DCGM_FI_DEV_POWER_MGMT_LIMIT_DEF",
        "gauge",
        "Default power management limit (in W).",
        Metric.DEFAULT_LIMIT_W,
    ),
)

FIELD_BY_METRIC: dict[Metric, DcgmField] = {f.metric: f for f in DCGM_FIELDS}
FIELD_BY_NAME: dict[str, DcgmField] = {f.name: f for f in DCGM_FIELDS}

# Labels on every dcgm-exporter series. The host label is `Hostname` in releases and `hostname`
# in newer code; `hpc_job` appears when dcgm-exporter maps Slurm jobs to GPUs.
LABEL_GPU = "gpu"
LABEL_UUID = "UUID"
LABEL_PCI_BUS_ID = "pci_bus_id"
LABEL_DEVICE = "device"
LABEL_MODEL = "modelName"
LABEL_HOST = "Hostname"
LABEL_HOST_NEW = "hostname"
LABEL_DRIVER = "DCGM_FI_DRIVER_VERSION"
LABEL_JOB = "hpc_job"


def escape_label_value(value: str) -> str:
    """A label value as the Prometheus text and OpenMetrics formats want it (inside quotes)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_values(values: npt.NDArray[np.float64], integer: bool) -> list[str]:
    """Sample values as dcgm-exporter prints them: integers for integer fields, else up to three
    decimals (NVML reports milliwatts)."""
    if integer:
        return [str(v) for v in np.round(values).astype(np.int64).tolist()]
    return [f"{v:.3f}".rstrip("0").rstrip(".") for v in values.tolist()]

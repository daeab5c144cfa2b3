"""Facts about GPU products that every layer may use (datasheet values, all power in watts)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GpuModel:
    """A GPU product. Caps are settable within [min_cap_w, max_cap_w] (NVML constraints)."""

    name: str  # short name used in config: "H100", "A100"
    model_name: str  # what NVML / dcgm-exporter report as modelName
    tdp_w: float
    min_cap_w: float
    max_cap_w: float
    default_cap_w: float
    idle_w: float  # draw with no work
    max_sm_clock_mhz: float
    slowdown_temp_c: float  # hardware thermal slowdown (nvidia-smi -q "GPU Slowdown Temp")
    shutdown_temp_c: float

    def __post_init__(self) -> None:
        if not 0 < self.min_cap_w <= self.default_cap_w <= self.max_cap_w:
            raise ValueError(
                f"GPU model {self.name}: need 0 < min_cap_w <= default_cap_w <= max_cap_w, "
                f"got {self.min_cap_w}, {self.default_cap_w}, {self.max_cap_w}"
            )
        if not 0 < self.idle_w < self.min_cap_w:
            raise ValueError(f"GPU model {self.name}: idle_w must lie in (0, min_cap_w)")


H100_SXM = GpuModel(
    name="H100",
    model_name="NVIDIA H100 80GB HBM3",
    tdp_w=700.0,
    min_cap_w=200.0,
    max_cap_w=700.0,
    default_cap_w=700.0,
    idle_w=75.0,
    max_sm_clock_mhz=1980.0,
    slowdown_temp_c=87.0,
    shutdown_temp_c=92.0,
)

A100_SXM = GpuModel(
    name="A100",
    model_name="NVIDIA A100-SXM4-80GB",
    tdp_w=400.0,
    min_cap_w=100.0,
    max_cap_w=400.0,
    default_cap_w=400.0,
    idle_w=55.0,
    max_sm_clock_mhz=1410.0,
    slowdown_temp_c=87.0,
    shutdown_temp_c=92.0,
)

BUILTIN_MODELS: dict[str, GpuModel] = {m.name: m for m in (H100_SXM, A100_SXM)}


def model_by_name(name: str) -> GpuModel:
    """Look a model up by its short name or its NVML model name."""
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]
    for model in BUILTIN_MODELS.values():
        if model.model_name == name:
            return model
    known = ", ".join(sorted(BUILTIN_MODELS))
    raise KeyError(f"unknown GPU model {name!r} (known: {known})")

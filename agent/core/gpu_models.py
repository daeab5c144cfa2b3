"""Facts about GPU products that every layer may use (datasheet values, all power in watts).

Where each figure comes from (NVIDIA's own documents; "nvidia-smi" means what `nvidia-smi -q -d
POWER` reports as the board's Min/Max/Default Power Limit, the NVML constraints the node daemon
enforces; "estimate" marks a figure no vendor document states):

- H100 SXM5 80GB: max 700 W (H100 Tensor Core GPU datasheet, "Max thermal design power (TDP)
  up to 700W (configurable)"); min 200 W (nvidia-smi); idle 75 W (estimate).
- H200 SXM 141GB: max 700 W (H200 Tensor Core GPU datasheet, "Max TDP up to 700W
  (configurable)"); min 200 W (nvidia-smi, the H100 SXM5 board's power controller); idle 75 W
  (estimate, as H100).
- B200 (HGX B200): max 1,000 W (HGX B200 datasheet, "Max TDP configurable up to 1,000W"); min
  200 W (estimate); idle 140 W (estimate).
- GB200 (per GPU of a GB200 NVL72): max 1,200 W (GB200 NVL72 datasheet: each Blackwell GPU of
  the superchip configurable up to 1,200W); min 200 W (estimate); idle 150 W (estimate).
- A100 SXM4 80GB: max 400 W (A100 Tensor Core GPU datasheet, "Max TDP Power 400W"); min 100 W
  (nvidia-smi); idle 55 W (estimate).
- A100 PCIe 80GB: max 300 W (A100 datasheet, PCIe: "Max TDP Power 300W"); min 150 W
  (nvidia-smi); idle 45 W (estimate).
- L40S: max 350 W (L40S datasheet, "Max Power Consumption 350W"); min 100 W (nvidia-smi); idle
  35 W (estimate).

Workload power profiles (NVML's `nvmlPowerProfileType_t`, NVML API Reference, "Power Profile
Information": pretuned power and clock settings a board may enforce) are recorded per model where
NVIDIA documents them for it (the Blackwell data-center parts; the board reports which it really
supports in its `perfProfilesMask`). They are data only: acting on them is a clock/profile lever
(issue #24), not a power cap.
"""

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
    # NVML workload power profiles documented for this model (names of NVML_POWER_PROFILE_*).
    power_profiles: tuple[str, ...] = ()

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

# NVML's workload power profiles (nvmlPowerProfileType_t, in its order: the id is the index).
NVML_POWER_PROFILES = (
    "MAX_P",
    "MAX_Q",
    "COMPUTE",
    "MEMORY_BOUND",
    "NETWORK",
    "BALANCED",
    "LLM_INFERENCE",
    "LLM_TRAINING",
    "RBM",
    "DCPCIE",
    "HMMA_SPARSE",
    "HMMA_DENSE",
    "SYNC_BALANCED",
    "HPC",
    "MIG",
)
# What NVIDIA's Blackwell documentation lists for its data-center parts (the board's own mask
# says which it enforces).
BLACKWELL_PROFILES = NVML_POWER_PROFILES

H200_SXM = GpuModel(
    name="H200",
    model_name="NVIDIA H200",
    tdp_w=700.0,
    min_cap_w=200.0,
    max_cap_w=700.0,
    default_cap_w=700.0,
    idle_w=75.0,
    max_sm_clock_mhz=1980.0,
    slowdown_temp_c=87.0,
    shutdown_temp_c=92.0,
)

B200 = GpuModel(
    name="B200",
    model_name="NVIDIA B200",
    tdp_w=1000.0,
    min_cap_w=200.0,
    max_cap_w=1000.0,
    default_cap_w=1000.0,
    idle_w=140.0,
    max_sm_clock_mhz=1965.0,
    slowdown_temp_c=87.0,
    shutdown_temp_c=92.0,
    power_profiles=BLACKWELL_PROFILES,
)

GB200 = GpuModel(
    name="GB200",
    model_name="NVIDIA GB200",
    tdp_w=1200.0,
    min_cap_w=200.0,
    max_cap_w=1200.0,
    default_cap_w=1200.0,
    idle_w=150.0,
    max_sm_clock_mhz=2062.0,
    slowdown_temp_c=87.0,
    shutdown_temp_c=92.0,
    power_profiles=BLACKWELL_PROFILES,
)

A100_PCIE = GpuModel(
    name="A100-PCIe",
    model_name="NVIDIA A100 80GB PCIe",
    tdp_w=300.0,
    min_cap_w=150.0,
    max_cap_w=300.0,
    default_cap_w=300.0,
    idle_w=45.0,
    max_sm_clock_mhz=1410.0,
    slowdown_temp_c=88.0,
    shutdown_temp_c=93.0,
)

L40S = GpuModel(
    name="L40S",
    model_name="NVIDIA L40S",
    tdp_w=350.0,
    min_cap_w=100.0,
    max_cap_w=350.0,
    default_cap_w=350.0,
    idle_w=35.0,
    max_sm_clock_mhz=2520.0,
    slowdown_temp_c=88.0,
    shutdown_temp_c=93.0,
)

BUILTIN_MODELS: dict[str, GpuModel] = {
    m.name: m for m in (H100_SXM, A100_SXM, H200_SXM, B200, GB200, A100_PCIE, L40S)
}


def model_by_name(name: str) -> GpuModel:
    """Look a model up by its short name or its NVML model name."""
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]
    for model in BUILTIN_MODELS.values():
        if model.model_name == name:
            return model
    known = ", ".join(sorted(BUILTIN_MODELS))
    raise KeyError(f"unknown GPU model {name!r} (known: {known})")

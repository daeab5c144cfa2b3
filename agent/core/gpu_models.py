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


def _datasheet(
    name: str,
    model_name: str,
    min_cap_w: float,
    max_cap_w: float,
    idle_w: float,
    max_sm_clock_mhz: float,
    slowdown_temp_c: float,
    shutdown_temp_c: float,
    power_profiles: tuple[str, ...] = (),
) -> GpuModel:
    """A built-in model: each one's TDP and default limit are its maximum limit."""
    return GpuModel(
        name=name,
        model_name=model_name,
        tdp_w=float(max_cap_w),
        min_cap_w=float(min_cap_w),
        max_cap_w=float(max_cap_w),
        default_cap_w=float(max_cap_w),
        idle_w=float(idle_w),
        max_sm_clock_mhz=float(max_sm_clock_mhz),
        slowdown_temp_c=float(slowdown_temp_c),
        shutdown_temp_c=float(shutdown_temp_c),
        power_profiles=power_profiles,
    )


# fmt: off
BUILTIN_MODELS: dict[str, GpuModel] = {
    m.name: m
    for m in (
        #          name         NVML modelName           min W  max W  idle W  SM MHz  slow C  off C
        _datasheet("H100",      "NVIDIA H100 80GB HBM3", 200,   700,   75,     1980,   87,     92),
        _datasheet("A100",      "NVIDIA A100-SXM4-80GB", 100,   400,   55,     1410,   87,     92),
        _datasheet("H200",      "NVIDIA H200",           200,   700,   75,     1980,   87,     92),
        _datasheet("B200",      "NVIDIA B200",           200,   1000,  140,    1965,   87,     92,
                   BLACKWELL_PROFILES),
        _datasheet("GB200",     "NVIDIA GB200",          200,   1200,  150,    2062,   87,     92,
                   BLACKWELL_PROFILES),
        _datasheet("A100-PCIe", "NVIDIA A100 80GB PCIe", 150,   300,   45,     1410,   88,     93),
        _datasheet("L40S",      "NVIDIA L40S",           100,   350,   35,     2520,   88,     93),
    )
}
# fmt: on
H100_SXM = BUILTIN_MODELS["H100"]
A100_SXM = BUILTIN_MODELS["A100"]


def find_model(name: str) -> GpuModel | None:
    """A built-in model by its short or its NVML model name, in any case (None: none)."""
    key = name.strip().lower()
    return next(
        (m for m in BUILTIN_MODELS.values() if key in (m.name.lower(), m.model_name.lower())),
        None,
    )

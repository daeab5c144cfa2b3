"""Job mixes of real GPU clusters: how many GPUs a job takes, how long it runs, when jobs arrive.

Derived from the published figures of four public scheduler traces; the traces themselves are
not part of ooda. Where each number comes from:

- **Sizes and durations** (all four): AcmeTrace (github.com/InternLM/AcmeTrace, commit
  6d6ac9cd15f3b01151ac6ba00ecddd9156f0dc73), `figure/cdf_job_gpunum.pdf` panel (a) and
  `figure/cdf_job_duration_util.pdf` panel (a), drawn by its `analysis.ipynb` from the Philly,
  Helios and PAI traces (`trace_previous_work/`) and its own Seren cluster, GPU jobs only
  (gpu_num > 0). The figures are vector paths: matplotlib drew the share of jobs with at most k
  GPUs at every integer k (x on a log2 axis) and the share of jobs lasting at most 2^i seconds
  at i = 0..21 (x on a log10 axis); each path vertex was read back exactly and mapped through the
  axes' tick positions (y: 0% and 100% ticks; x: the 1 and 1,024 ticks, or the 10^0 and 10^6
  ticks). SIZE_CDF below is that share at k = 1, 2, 4, ..., 1,024 (a job of 3 GPUs counts with
  the 4s); DURATION_CDF at 2^i s. Cross-checked against the medians of AcmeTrace's
  `data/cluster_summary.csv` (GPU-job duration: Philly 874 s, Helios 206 s, PAI 481 s, Seren
  122 s; these tables give 852, 200, 484 and 136 s by log interpolation).
- **Arrivals by hour of day**: Helios: HeliosArtifact (github.com/S-Lab-System-Group/
  HeliosArtifact, commit bdaae10), `analysis/2_cluster characterization/cluster_diurnal.pdf`
  panel (b), each cluster's (Venus, Earth, Saturn, Uranus) hourly average GPU-job submission
  rate read from its vector path, each divided by its daily mean, then averaged. PAI:
  alibaba/clusterdata (commit 7a6c496), `cluster-trace-gpu-v2020/analysis/analysis.ipynb`,
  the box plot of tasks submitted per hour of day (its Figure 3b, embedded as a PNG): each box's
  median line located in the image's pixels and mapped through the y axis (0 to 2,100), then
  divided by the daily mean. Philly and Seren publish no hourly submission counts we could
  derive from: their arrivals are flat over the day (Philly's busy share of nodes by hour, from
  HeliosArtifact's `framework/CES Service/data/philly_node_sequence.csv`, varies by under 2%).
- **Occupancy**: Philly 0.74 (mean active/total nodes of that same file); Helios 0.77 (the mean
  of panel (a) of the Helios figure above, GPU utilization by hour); PAI and Seren: the twin's
  default (0.85), their releases giving no comparable figure.

PAI requests fractions of a GPU (97% of its GPU jobs ask for at most one): the twin gives each
such job a whole GPU. Multi-node jobs take whole nodes (a size above the twin's GPUs per node is
rounded up to whole nodes); sizes the twin has no room for are left out and the rest re-weighted
(`sizes_for`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

MIN_WORK_S = 30.0  # a job shorter than this runs this long (the twin's step is a second)
HOURS = 24

# Share of GPU jobs with at most k GPUs, k = 1, 2, 4, ..., 1024 (AcmeTrace cdf_job_gpunum (a)).
# fmt: off
SIZE_CDF: dict[str, tuple[float, ...]] = {
    "philly": (0.8242, 0.8448, 0.9205, 0.9891, 0.998, 0.9998, 0.9998, 0.9999, 0.9999, 1.0, 1.0),
    "pai": (0.9707, 0.9865, 0.9911, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
    "helios": (0.7219, 0.7475, 0.8047, 0.9469, 0.9772, 0.9935, 0.9973, 0.9989, 0.9996, 0.9998, 1.0),
    "acme": (0.5404, 0.6543, 0.6795, 0.9675, 0.9786, 0.9882, 0.9932, 0.9955, 0.9973, 0.9983, 1.0),
}
# fmt: on

# Share of GPU jobs lasting at most 2^i s, i = 0..21 (AcmeTrace cdf_job_duration_util (a)).
# fmt: off
DURATION_CDF: dict[str, tuple[float, ...]] = {
    "philly": (
        0.0003, 0.0008, 0.0017, 0.0082, 0.0362, 0.0842, 0.1888, 0.2699, 0.315, 0.3628, 0.5491,
        0.6747, 0.7928, 0.846, 0.9029, 0.9271, 0.9486, 0.9695, 0.9839, 0.9932, 0.998, 0.9995,
    ),
    "pai": (
        0.0008, 0.0008, 0.0012, 0.0043, 0.0299, 0.1187, 0.2106, 0.2895, 0.3962, 0.509, 0.6079,
        0.6984, 0.7851, 0.8712, 0.9319, 0.9705, 0.9903, 0.9969, 0.9995, 1.0, 1.0, 1.0,
    ),
    "helios": (
        0.04, 0.0494, 0.0635, 0.077, 0.1072, 0.1615, 0.2488, 0.3781, 0.5657, 0.6758, 0.7525,
        0.841, 0.8753, 0.9075, 0.9436, 0.9626, 0.9777, 0.989, 0.9955, 0.9986, 0.9996, 1.0,
    ),
    "acme": (
        0.0218, 0.0278, 0.0562, 0.1176, 0.2338, 0.3171, 0.3712, 0.4891, 0.6563, 0.7921, 0.8803,
        0.9294, 0.9599, 0.9753, 0.9844, 0.9919, 0.9964, 0.9983, 0.9993, 0.9998, 1.0, 1.0,
    ),
}
# fmt: on

# Arrivals by hour of day, relative to the day's mean (hour 0 first; the clusters' local time).
# fmt: off
ARRIVAL_SHAPE: dict[str, tuple[float, ...]] = {
    "helios": (
        0.899, 0.792, 0.645, 0.529, 0.486, 0.48, 0.479, 0.443, 0.508, 0.799, 1.151, 1.282,
        1.232, 1.261, 1.394, 1.472, 1.554, 1.405, 1.13, 1.236, 1.332, 1.252, 1.159, 1.083,
    ),
    "pai": (
        1.406, 0.964, 0.702, 0.583, 0.725, 0.702, 0.785, 0.95, 0.77, 0.912, 1.406, 1.45,
        1.001, 0.987, 1.248, 1.308, 1.263, 1.398, 1.053, 1.039, 1.001, 0.882, 0.785, 0.68,
    ),
}
# fmt: on

OCCUPANCY: dict[str, float] = {"philly": 0.74, "helios": 0.77}


@dataclass(frozen=True, slots=True)
class WorkTable:
    """A distribution of job durations from its CDF at points (seconds, share at most), each bin
    between two points log-uniform; below the first point the jobs run MIN_WORK_S."""

    seconds: tuple[float, ...]
    cdf: tuple[float, ...]
    # Per bin, derived once (a twin samples a job's duration from them tens of thousands of
    # times at its start): low end, high end, probability, and the probability that a job
    # found running at a random instant is in it (length-biased: probability times mean).
    _lo: FloatArray = field(init=False, repr=False, compare=False)
    _hi: FloatArray = field(init=False, repr=False, compare=False)
    _p: FloatArray = field(init=False, repr=False, compare=False)
    _p_running: FloatArray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        s, f = np.asarray(self.seconds), np.asarray(self.cdf)
        if s.size < 2 or s.size != f.size:
            raise ValueError("a duration table needs at least two (seconds, share) points")
        if np.any(s <= 0) or np.any(np.diff(s) <= 0):
            raise ValueError("duration table: seconds must be positive and increase")
        if np.any(np.diff(f) < 0) or f[0] < 0 or abs(f[-1] - 1.0) > 1e-6:
            raise ValueError("duration table: shares must not fall and must end at 1")
        # The mass below the first point at MIN_WORK_S.
        s = np.maximum(np.asarray(self.seconds, dtype=np.float64), MIN_WORK_S)
        f = np.asarray(self.cdf, dtype=np.float64)
        lo = np.concatenate([[MIN_WORK_S], s[:-1]])
        hi = np.concatenate([[MIN_WORK_S], s[1:]])
        p = np.concatenate([[f[0]], np.diff(f)])
        p = p / p.sum()
        w = p * self._bin_means(lo, hi)
        for name, value in (("_lo", lo), ("_hi", hi), ("_p", p), ("_p_running", w / w.sum())):
            object.__setattr__(self, name, value)

    @staticmethod
    def _bin_means(lo: FloatArray, hi: FloatArray) -> FloatArray:
        """Mean of a log-uniform variable on [lo, hi] (lo where the bin is a point)."""
        ratio = np.log(hi / lo)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = (hi - lo) / ratio
        return np.asarray(np.where(ratio > 1e-12, mean, lo), dtype=np.float64)

    def mean_s(self) -> float:
        return float((self._p * self._bin_means(self._lo, self._hi)).sum())

    def quantile_s(self, q: float) -> float:
        lo, hi, p = self._lo, self._hi, self._p
        c = np.cumsum(p)
        i = int(np.searchsorted(c, q, side="left"))
        i = min(i, p.size - 1)
        below = c[i] - p[i]
        frac = (q - below) / p[i] if p[i] > 0 else 0.0
        return float(lo[i] * (hi[i] / lo[i]) ** float(np.clip(frac, 0.0, 1.0)))

    def sample(self, rng: np.random.Generator) -> float:
        """One job's duration."""
        lo, hi, p = self._lo, self._hi, self._p
        i = int(rng.choice(p.size, p=p))
        return float(lo[i] * (hi[i] / lo[i]) ** rng.uniform())

    def sample_running(self, rng: np.random.Generator) -> float:
        """The duration of a job found running at a random instant (length-biased: a bin
        weighs its probability times its mean; within a bin, uniform)."""
        i = int(rng.choice(self._p_running.size, p=self._p_running))
        return float(rng.uniform(self._lo[i], self._hi[i]))


@dataclass(frozen=True, slots=True)
class JobMix:
    """A cluster's job mix: sizes (GPUs, share of jobs), durations, arrivals by hour."""

    name: str
    sizes: tuple[tuple[int, float], ...]
    durations: WorkTable
    arrival_shape: tuple[float, ...] = ()  # 24 values, mean 1 (empty: flat)
    occupancy: float | None = None


def sizes_from_cdf(cdf: Sequence[float]) -> tuple[tuple[int, float], ...]:
    """(GPUs, share) from the share of jobs with at most 2^j GPUs, j = 0, 1, ..."""
    shares = np.diff(np.concatenate([[0.0], np.asarray(cdf, dtype=np.float64)]))
    return tuple((2**j, round(float(s), 4)) for j, s in enumerate(shares) if s > 0)


def sizes_for(
    sizes: Sequence[tuple[int, float]], gpus_per_node: int, gpus: int, multi_node: bool
) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """The sizes a twin can place and their probabilities: without multi-node jobs, sizes up to
    a node; with them, larger sizes rounded up to whole nodes, up to half the twin's GPUs (a job
    that would take the whole cluster would hold it for hours). Left-out sizes re-weight the
    rest; nothing left: one node's worth."""
    out: dict[int, float] = {}
    for asked, share in sizes:
        size = asked
        if asked > gpus_per_node:
            if not multi_node:
                continue
            size = math.ceil(asked / gpus_per_node) * gpus_per_node
            if size > gpus // 2:
                continue
        out[size] = out.get(size, 0.0) + share
    if not out or sum(out.values()) <= 0:
        return np.array([gpus_per_node], dtype=np.int64), np.array([1.0])
    keys = sorted(out)
    p = np.array([out[k] for k in keys])
    return np.array(keys, dtype=np.int64), p / p.sum()


def named_mix(name: str) -> JobMix:
    """A job mix by name (philly, pai, helios, acme)."""
    if name not in SIZE_CDF:
        raise ValueError(f"unknown job mix {name!r} (known: {', '.join(sorted(SIZE_CDF))})")
    cdf = DURATION_CDF[name]
    # A last share short of 1 (Philly's longest jobs): the rest lasts up to 2^22 s.
    seconds = [2.0**i for i in range(len(cdf))]
    shares = list(cdf)
    if shares[-1] < 1.0:
        seconds.append(2.0 ** len(cdf))
        shares.append(1.0)
    return JobMix(
        name=name,
        sizes=sizes_from_cdf(SIZE_CDF[name]),
        durations=WorkTable(tuple(seconds), tuple(shares)),
        arrival_shape=ARRIVAL_SHAPE.get(name, ()),
        occupancy=OCCUPANCY.get(name),
    )


JOB_MIXES = tuple(sorted(SIZE_CDF))

"""Workload classes of the twin, calibrated from measured GPU power-limit sweeps.

Source: Zeus (ml-energy/zeus, Apache-2.0), examples/research_reproducibility/zeus_nsdi23/trace/
summary_power_{v100,a40,rtx6000,p100}.csv at commit 75a8b9398034eb9baf74ca0a830c2c31bcce52cd:
one epoch's time and average power for six DNN workloads at every power limit, on four GPU models.

How the figures below were derived (the data files are not part of this repository):
for each (GPU, workload, batch size, optimizer) sweep, the draw at the maximum limit is the job's
natural draw; `natural_frac` is the median over sweeps of natural draw / maximum limit (with the
inter-quartile range as its spread); for every limit below that, x = average power / natural draw
and relative throughput T = epoch time at max / epoch time at the limit; `a` and `b` are the least-
squares fit of log(1 - T) = log(a) + b log(1 - x) over all points with 0.35 < x < 0.97 (the curve
family of agent.core.curves); `cap_draw_frac` is the median of average power / limit over limits
below 0.9 x the natural draw (power management keeps the draw a little under the limit).

| class        | Zeus workload              | natural_frac (IQR)  | a     | b     | cap_draw_frac |
|--------------|----------------------------|---------------------|-------|-------|---------------|
| llm_train    | squad / bert_base_uncased  | 0.896 (0.885-0.905) | 1.127 | 1.653 | 0.956 |
| vision       | imagenet / resnet50        | 0.870 (0.784-0.890) | 0.853 | 1.578 | 0.962 |
| speech       | librispeech / deepspeech2  | 0.653 (0.576-0.708) | 0.821 | 1.525 | 0.899 |
| nlp_finetune | sentiment140 / bert_base   | 0.898 (0.735-0.925) | 0.690 | 1.380 | 0.982 |
| small_cnn    | cifar100 / shufflenetv2    | 0.517 (0.305-0.715) | 0.383 | 1.061 | 0.910 |
| recommender  | movielens-1m / ncf         | 0.187 (0.144-0.269) | ~0    | -     | -     |

The recommender (NCF) is insensitive to caps on every GPU: its natural draw is below the lowest
settable limit. Figures in the table are normalized, so they transfer to H100 and A100 limits.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkloadClass:
    name: str
    natural_frac: float  # median natural draw / max cap
    natural_frac_lo: float  # inter-quartile range of natural draw / max cap
    natural_frac_hi: float
    a: float  # curve: T(x) = 1 - a (1 - x)^b
    b: float
    cap_draw_frac: float  # draw / limit under a binding cap
    mem_util_pct: float  # typical memory-copy utilization (the twin's telemetry only)
    zeus_workload: str


WORKLOADS: dict[str, WorkloadClass] = {
    w.name: w
    for w in (
        WorkloadClass("llm_train", 0.896, 0.885, 0.905, 1.127, 1.653, 0.956, 45.0, "squad/bert"),
        WorkloadClass(
            "vision", 0.870, 0.784, 0.890, 0.853, 1.578, 0.962, 35.0, "imagenet/resnet50"
        ),
        WorkloadClass("speech", 0.653, 0.576, 0.708, 0.821, 1.525, 0.899, 30.0, "librispeech/ds2"),
        WorkloadClass(
            "nlp_finetune", 0.898, 0.735, 0.925, 0.690, 1.380, 0.982, 40.0, "sentiment140"
        ),
        WorkloadClass("small_cnn", 0.517, 0.305, 0.715, 0.383, 1.061, 0.910, 25.0, "cifar100"),
        WorkloadClass("recommender", 0.187, 0.144, 0.269, 0.0, 1.05, 0.950, 60.0, "movielens/ncf"),
    )
}

# The share of each class among arriving jobs, by default (a mixed training cluster).
DEFAULT_MIX: dict[str, float] = {
    "llm_train": 0.35,
    "vision": 0.20,
    "speech": 0.15,
    "nlp_finetune": 0.10,
    "small_cnn": 0.10,
    "recommender": 0.10,
}

# Headline checks from the same data (agent/sim tests hold the twin to these):
# at 70% of the max limit a V100 keeps about 0.94x throughput for 0.85x energy (resnet50).
ZEUS_V100_RESNET50_AT_70PCT = (0.91247, 0.82784)  # (relative throughput, relative energy)

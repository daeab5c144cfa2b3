"""Small pure helpers the built-in policies share."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from agent.core.gpu_models import BUILTIN_MODELS
from agent.core.situation import Situation
from agent.core.snapshot import Metric

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]

DEFAULT_SLOWDOWN_C = 87.0


def controllable(situation: Situation) -> BoolArray:
    """GPUs the agent may act on: seen, fresh, with a known cap range."""
    return np.asarray(
        situation.snapshot.fresh
        & np.isfinite(situation.min_cap_w)
        & np.isfinite(situation.max_cap_w),
        dtype=bool,
    )


def slowdown_temp_c(situation: Situation) -> FloatArray:
    """Per GPU: the hardware slowdown temperature of its model (a datasheet default if unknown)."""
    snap = situation.snapshot
    out = np.full(snap.n_gpus, DEFAULT_SLOWDOWN_C)
    for model in BUILTIN_MODELS.values():
        out[snap.model == model.model_name] = model.slowdown_temp_c
    return out


def capped_by_us(situation: Situation) -> BoolArray:
    if situation.capped_by_us is None:
        return np.zeros(situation.snapshot.n_gpus, dtype=bool)
    return situation.capped_by_us


def power(situation: Situation) -> FloatArray:
    return situation.snapshot.column(Metric.POWER_W)[0]


def node_any(situation: Situation, per_gpu: BoolArray) -> BoolArray:
    """Per node: does any of its GPUs have the property?"""
    snap = situation.snapshot
    counts = np.bincount(snap.node[per_gpu], minlength=snap.n_nodes)
    return np.asarray(counts > 0, dtype=bool)

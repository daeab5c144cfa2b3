"""Small pure helpers the built-in policies share."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.stats import chi2

from agent.core.gpu_models import BUILTIN_MODELS
from agent.core.situation import Situation
from agent.core.snapshot import Metric

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]

DEFAULT_SLOWDOWN_C = 87.0
# Estimates of one job differ for real only where noise would spread them less this often.
POOL_SIGNIFICANCE = 0.99


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


def pool_within_jobs(
    values: FloatArray, noise_var: FloatArray, keys: npt.NDArray[Any]
) -> FloatArray:
    """Per GPU estimates of a quantity its job's GPUs share up to real differences (a natural
    draw, a cap-draw share), shrunk towards their job's mean by how much of their spread is
    estimation noise (empirical Bayes, method of moments): where the estimates of one job differ
    no more than their noise could make them, they become the job's mean; real differences are
    kept in proportion. A job runs at the pace of its slowest GPU, so noise alone must not give
    its GPUs different shares of their natural draw: the spread of a few noisy estimates often
    exceeds their noise by chance (8 GPUs' spread is above it 4 times in 10), and keeping
    part of that would cap one GPU by its own unlucky estimate. So differences count as real
    only where the spread is beyond what the noise gives with probability POOL_SIGNIFICANCE (a
    chi-square test on the job's spread).

    `noise_var`: per GPU, the variance of its estimate's error (an upper bound will do: it only
    pools more). `keys`: per GPU its job, as text or as integer group ids (cheaper to group
    when pooling several quantities). GPUs alone in their job, and non-finite values, are left
    as they are."""
    out = np.asarray(values, dtype=np.float64).copy()
    ok = np.isfinite(out) & np.isfinite(noise_var)
    if not ok.any():
        return out
    _, inverse = np.unique(keys[ok], return_inverse=True)
    v, nv = out[ok], np.maximum(noise_var[ok], 0.0)
    count = np.bincount(inverse).astype(np.float64)
    mean = np.bincount(inverse, v) / count
    dev2 = np.bincount(inverse, (v - mean[inverse]) ** 2)
    dof = np.maximum(count - 1.0, 1.0)
    spread = np.where(count > 1, dev2 / dof, np.inf)
    noise = np.bincount(inverse, nv) / count
    # What noise alone may spread the estimates to (its sample variance's upper quantile).
    beyond_noise = noise * chi2.ppf(POOL_SIGNIFICANCE, dof) / dof
    between = np.where(spread > beyond_noise, spread - noise, 0.0)[inverse]
    with np.errstate(invalid="ignore", divide="ignore"):
        keep = np.where(between + nv > 0, between / (between + nv), 1.0)
    keep = np.where(np.isinf(between), 1.0, keep)
    out[ok] = mean[inverse] + keep * (v - mean[inverse])
    return out

"""Small columnar statistics shared by the models: grouping, grouped medians, decay weights.

Everything is vectorized over rows (GPUs, nodes or jobs): no Python loop over rows.
"""

from __future__ import annotations

import base64
import contextlib
import math

import numpy as np
import numpy.typing as npt
from threadpoolctl import ThreadpoolController  # type: ignore[import-untyped]

from agent.core.keyed import frozen

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

MAD_TO_SIGMA = 1.2533  # mean absolute deviation -> standard deviation, for a normal law


def decay_alpha(steps: npt.ArrayLike, halflife: float) -> FloatArray:
    """Weight of a new observation after `steps` (samples or seconds) for a given half-life."""
    s = np.maximum(np.asarray(steps, dtype=np.float64), 0.0)
    return np.asarray(1.0 - np.exp2(-s / max(halflife, 1e-12)), dtype=np.float64)


class Grouper:
    """Integer group ids for string labels (`np.unique`'s: the sorted distinct labels and each
    row's place among them), cached while the labels do not change. When a few rows changed
    since the last call (jobs start and end on a few GPUs a cycle), only those rows are looked
    up and the groups renumbered: the same answer as `np.unique` without sorting every row's
    string again (at 100,000 GPUs that sort is a tenth of a second, per grouper)."""

    # Past this share of rows changed, a fresh sort costs no more than the update.
    INCREMENTAL_SHARE = 0.25

    def __init__(self) -> None:
        self._last: npt.NDArray[np.str_] | None = None  # the labels last seen (a copy)
        self._ids: IntArray = np.zeros(0, dtype=np.int64)
        self._names: npt.NDArray[np.str_] = np.zeros(0, dtype=np.str_)
        self._hashes: IntArray | None = None

    def ids(self, labels: npt.NDArray[np.str_]) -> tuple[IntArray, npt.NDArray[np.str_]]:
        last = self._last
        if last is not None and labels is last and frozen(labels):
            return self._ids, self._names
        if last is not None and last.ndim == labels.ndim == 1 and last.shape == labels.shape:
            changed = np.flatnonzero(last != labels)
            if changed.size == 0:
                self._remember(labels)
                return self._ids, self._names
            if changed.size <= self.INCREMENTAL_SHARE * labels.size:
                self._update(labels, changed)
                self._remember(labels)
                return self._ids, self._names
        names, inverse = np.unique(labels, return_inverse=True)
        self._ids = inverse.astype(np.int64).reshape(labels.shape)
        self._names = names
        self._hashes = None
        self._remember(labels)
        return self._ids, self._names

    def _remember(self, labels: npt.NDArray[np.str_]) -> None:
        self._last = labels if frozen(labels) else labels.copy()

    def _update(self, labels: npt.NDArray[np.str_], changed: IntArray) -> None:
        """The ids and names `np.unique` would give for `labels`, where only the rows
        `changed` differ from the last labels: the changed rows' labels merged into the sorted
        names, each row's id moved to its name's new place, names no row has any more dropped."""
        merged = np.union1d(self._names, labels[changed])
        ids = np.searchsorted(merged, self._names)[self._ids]
        ids[changed] = np.searchsorted(merged, labels[changed])
        present = np.bincount(ids, minlength=merged.size) > 0
        renumber = np.cumsum(present) - 1
        self._ids = renumber[ids].astype(np.int64)
        self._names = np.asarray(merged[present], dtype=labels.dtype)
        self._hashes = None

    def hashes(self, labels: npt.NDArray[np.str_]) -> IntArray:
        """Per row: `string_hash` of its label (hashing each distinct label once)."""
        ids, names = self.ids(labels)
        if self._hashes is None:
            self._hashes = string_hash(names)[ids]
        return self._hashes


def group_mean(values: FloatArray, ids: IntArray, mask: BoolArray, n_groups: int) -> FloatArray:
    """Mean per group over rows in `mask` (NaN for empty groups)."""
    count = np.bincount(ids[mask], minlength=n_groups).astype(np.float64)
    total = np.bincount(ids[mask], weights=values[mask], minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def group_median(
    values: FloatArray, ids: IntArray, mask: BoolArray, n_groups: int
) -> tuple[FloatArray, FloatArray]:
    """Median and count per group over rows in `mask` with finite values (NaN median if empty).

    One lexsort over (group, value): O(n log n), no loop over groups.
    """
    ok = mask & np.isfinite(values)
    v = values[ok]
    g = ids[ok]
    count = np.bincount(g, minlength=n_groups).astype(np.int64)
    median = np.full(n_groups, np.nan)
    if v.size == 0:
        return median, count.astype(np.float64)
    order = np.lexsort((v, g))
    sorted_v = v[order]
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    has = count > 0
    lo = start[has] + (count[has] - 1) // 2
    hi = start[has] + count[has] // 2
    median[has] = 0.5 * (sorted_v[lo] + sorted_v[hi])
    return median, count.astype(np.float64)


def json_safe(value: object) -> object:
    """A state tree with NaN as null and infinities as the largest floats (strict JSON)."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value in (float("inf"), float("-inf")):
            return 1.7976931348623157e308 if value > 0 else -1.7976931348623157e308
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


_CONTROLLER: list[ThreadpoolController] = []


def single_threaded() -> contextlib.AbstractContextManager[object]:
    """Run scikit-learn on one thread: our fits are small, and OpenMP and BLAS thread pools
    fighting over a few cores cost far more than they give (100x slower predictions seen)."""
    if not _CONTROLLER:
        _CONTROLLER.append(ThreadpoolController())  # inspecting the libraries is slow: once
    limited: contextlib.AbstractContextManager[object] = _CONTROLLER[0].limit(limits=1)
    return limited


_HASH_WEIGHTS = np.random.default_rng(20240917).integers(1, 2**62, size=256, dtype=np.uint64) | 1


def string_hash(labels: npt.NDArray[np.str_]) -> IntArray:
    """A stable 64-bit hash per string, vectorized over the array's code points: cheap to keep
    and compare per GPU where the strings themselves (wide, fixed-size) would not be. The same
    string hashes the same whatever the array's width and across processes."""
    arr = np.ascontiguousarray(labels, dtype=np.str_)
    n = arr.shape[0]
    width = arr.dtype.itemsize // 4
    if n == 0 or width == 0:
        return np.zeros(n, dtype=np.int64)
    codes = arr.view(np.uint32).reshape(n, width).astype(np.uint64)
    weights = np.resize(_HASH_WEIGHTS, width)
    with np.errstate(over="ignore"):
        mixed = (codes * weights[None, :]).sum(axis=1, dtype=np.uint64)
        mixed ^= mixed >> np.uint64(29)
    out: IntArray = mixed.view(np.int64)
    return out


def pack(array: npt.ArrayLike, dtype: str = "float32") -> dict[str, object]:
    """A numeric array as compact JSON: its shape and its bytes in base64 (float32 by default:
    learned state does not need more, and state files are written often)."""
    arr = np.ascontiguousarray(np.asarray(array, dtype=dtype))
    return {
        "dtype": dtype,
        "shape": list(arr.shape),
        "b64": base64.b64encode(arr.tobytes()).decode("ascii"),
    }


def unpack(data: object, dtype: npt.DTypeLike = np.float64) -> npt.NDArray[np.float64]:
    """The array `pack` wrote (a plain list is accepted too)."""
    if isinstance(data, dict):
        raw = base64.b64decode(str(data["b64"]))
        arr = np.frombuffer(raw, dtype=str(data["dtype"])).reshape([int(x) for x in data["shape"]])
        return np.asarray(arr, dtype=dtype)
    return np.asarray(data, dtype=dtype)

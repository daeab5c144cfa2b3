"""Columnar state keyed by string (a GPU's UUID, a node's name): numpy arrays, no per-key objects.

Keys are kept sorted; `slots(keys)` maps a whole array of keys to positions (a binary search, or a
hash where asked), adding unseen keys with each column's fill value.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt


def frozen(arr: npt.NDArray[Any]) -> bool:
    """Whether nothing can change `arr`'s contents: it and every array it views are read-only,
    down to one that owns its data."""
    a: object = arr
    while isinstance(a, np.ndarray):
        if a.flags.writeable:
            return False
        a = a.base
    return a is None


def freeze(arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Make an array that owns its data read-only (so `LastKeys` can trust its identity)."""
    if arr.base is None:
        arr.flags.writeable = False
    return arr


class LastKeys:
    """The last key array seen, to answer "the same keys as last time?" cheaply: by identity for
    a frozen array (the same inventory object cycle after cycle), else by one comparison."""

    def __init__(self) -> None:
        self._src: npt.NDArray[Any] | None = None
        self._copy: npt.NDArray[Any] | None = None

    def same(self, keys: npt.NDArray[Any]) -> bool:
        if self._copy is None:
            return False
        if keys is self._src and frozen(keys):
            return True
        if self._copy.shape != keys.shape or not np.array_equal(self._copy, keys):
            return False
        if frozen(keys):  # the same keys in a new frozen array (a new trace block): known by it now
            self._src = self._copy = keys
        return True

    def remember(self, keys: npt.NDArray[Any]) -> None:
        self._src = keys
        self._copy = keys if frozen(keys) else keys.copy()

    def interned(self, keys: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """`keys` as one frozen array for as long as they stay the same: the one remembered, or
        a frozen copy of these (so everything keyed by them downstream knows them by identity)."""
        if self.same(keys) and self._copy is not None and frozen(self._copy):
            return self._copy
        own = freeze(keys.copy())
        self.remember(own)
        return own

    def forget(self) -> None:
        self._src = self._copy = None


_DISTINCT_LOCK = threading.Lock()
_DISTINCT: list[tuple[npt.NDArray[Any], bool]] = []  # the last read-only array asked about


def distinct(keys: npt.NDArray[Any]) -> bool:
    """Whether no key repeats; remembered for the last read-only array asked about (a fleet's
    UUIDs, the same array cycle after cycle)."""
    if not frozen(keys):
        return bool(np.unique(keys).size == keys.size)
    with _DISTINCT_LOCK:
        if _DISTINCT and _DISTINCT[0][0] is keys:
            return _DISTINCT[0][1]
        answer = bool(np.unique(keys).size == keys.size)
        _DISTINCT[:] = [(keys, answer)]
        return answer


class RowIndex:
    """The row of each key of one key array (a GPU's `host<SEP>gpu`, its UUID; a key given
    twice: its first row), for many lookups: a dict, so a lookup costs a hash, not a binary
    search over long strings (which at 100,000 UUIDs cost ten times as much)."""

    def __init__(self, keys: npt.NDArray[np.str_]) -> None:
        self.size = int(keys.size)
        # Built from the end, so the first row of a repeated key is the one kept.
        self._row = dict(zip(reversed(keys.tolist()), range(self.size - 1, -1, -1), strict=True))
        # The keys themselves when nothing can change them and none repeats: a key taken from
        # them at a known row is found at that row (`find_picked`).
        self._source = keys if frozen(keys) and len(self._row) == self.size else None

    def find_picked(
        self,
        keys: npt.NDArray[np.str_],
        picked: tuple[npt.NDArray[np.str_], npt.NDArray[np.int64]] | None,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
        """`find(keys)`, where `picked` may say where `keys` came from: (an array, their rows
        in it). Keys taken from this index's own keys are at those rows: nothing looked up."""
        if picked is not None and picked[0] is self._source:
            return picked[1], np.ones(picked[1].shape, dtype=bool)
        return self.find(keys)

    def of(self, keys: Iterable[str]) -> Iterator[int]:
        """Each key's row, -1 where absent."""
        return map(self._row.get, keys, itertools.repeat(-1))

    def positions(self, keys: npt.NDArray[np.str_]) -> npt.NDArray[np.int64]:
        """Each key's row, -1 where absent."""
        return np.fromiter(self.of(keys.tolist()), dtype=np.int64, count=int(keys.size))

    def find(
        self, keys: npt.NDArray[np.str_]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
        """Each key's row (0 where absent) and whether it is present."""
        rows = self.positions(keys)
        found = rows >= 0
        return np.where(found, rows, 0), found


class LastRowIndex:
    """A `RowIndex` of the last key array given, built again only when the keys change (known
    by identity when frozen, else by one comparison: `LastKeys`)."""

    def __init__(self) -> None:
        self._keys = LastKeys()
        self._index: RowIndex | None = None

    def of(self, keys: npt.NDArray[np.str_]) -> RowIndex:
        if self._index is None or not self._keys.same(keys):
            self._index = RowIndex(keys)
            self._keys.remember(keys)
        return self._index


def _all_true(shape: tuple[int, ...]) -> npt.NDArray[np.bool_]:
    out = np.ones(shape, dtype=bool)
    out.flags.writeable = False
    return out


class KeyedColumns:
    def __init__(
        self, columns: Mapping[str, tuple[npt.DTypeLike, Any]], *, hashed: bool = False
    ) -> None:
        """`columns`: name -> (dtype, fill value for new keys). String columns need a sized dtype
        ("U64"): numpy truncates longer strings silently. `hashed`: find keys through a dict of
        them (kept while they stay) rather than a binary search: for tables asked about a new
        key array every time (each cycle's intent targets), at the cost of the dict (about
        12 MB for 100,000 UUIDs); tables asked about the same array every cycle answer from
        their cache either way."""
        self._spec = dict(columns)
        self._hashed = hashed
        self.keys = np.zeros(0, dtype=np.str_)
        self.cols: dict[str, npt.NDArray[Any]] = {
            name: np.zeros(0, dtype=dtype) for name, (dtype, _) in self._spec.items()
        }
        self._last_keys = LastKeys()
        self._last_slots: npt.NDArray[np.int64] | None = None
        # The last `lookup` answer, good while no key is added or removed.
        self._lookup_keys = LastKeys()
        self._last_lookup: tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]] | None = None
        self._index: RowIndex | None = None  # of `keys` when hashed, built when first needed

    def _find(
        self, arr: npt.NDArray[np.str_]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
        """Position of each key (0 where absent) and whether it is known."""
        if not self._hashed:
            if self.keys.size == 0:
                return np.zeros(arr.shape, dtype=np.int64), np.zeros(arr.shape, dtype=bool)
            pos = np.clip(np.searchsorted(self.keys, arr), 0, self.keys.size - 1)
            return pos.astype(np.int64), np.asarray(self.keys[pos] == arr, dtype=bool)
        if self._index is None:
            self._index = RowIndex(self.keys)
        return self._index.find(arr)

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def __getitem__(self, name: str) -> npt.NDArray[Any]:
        return self.cols[name]

    def slots(self, keys: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Positions of `keys` (added if new). Cached: the same key array costs one comparison."""
        arr = np.asarray(keys, dtype=np.str_)
        cached = self._last_slots
        if cached is not None and self._last_keys.same(arr):
            return cached
        # Every key known already (the common case): found, nothing sorted.
        pos, found = self._find(arr)
        missing = ~found
        if not missing.any():
            self._remember(arr, pos)
            return pos
        new = np.unique(arr[missing])
        self._forget()  # positions change: no remembered answer holds
        merged = np.concatenate([self.keys, new])
        order = np.argsort(merged, kind="stable")
        self.keys = merged[order]
        for name, (_dtype, fill) in self._spec.items():
            old = self.cols[name]
            grown = np.concatenate([old, np.full(new.shape[0], fill, dtype=old.dtype)])
            self.cols[name] = grown[order]
        slots, _ = self._find(arr)
        self._remember(arr, slots)
        return slots

    def _remember(self, arr: npt.NDArray[np.str_], slots: npt.NDArray[np.int64]) -> None:
        # Handed out again while the keys stay the same: read-only, so no caller can spoil it.
        slots.flags.writeable = False
        self._last_keys.remember(arr)
        self._last_slots = slots

    def slots_picked(
        self,
        keys: npt.NDArray[np.str_],
        picked: tuple[npt.NDArray[np.str_], npt.NDArray[np.int64]] | None,
    ) -> npt.NDArray[np.int64]:
        """`slots(keys)`, where `picked` may say where `keys` came from: (a read-only array,
        their rows in it). While every key of that array is known, the answer is its `lookup`
        (cached while no key is added) at those rows: nothing looked up again."""
        if picked is not None and frozen(picked[0]):
            pos, found = self.lookup(picked[0])
            rows = picked[1]
            if bool(found[rows].all()):
                return np.asarray(pos[rows], dtype=np.int64)
        return self.slots(keys)

    def lookup(self, keys: npt.ArrayLike) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
        """Positions of `keys` without adding any; the mask says which were found."""
        arr = np.asarray(keys, dtype=np.str_)
        if self.keys.size == 0:
            return np.zeros(arr.shape, dtype=np.int64), np.zeros(arr.shape, dtype=bool)
        if self._last_slots is not None and self._last_keys.same(arr):
            # The keys of the last `slots` call: all known, at the same positions.
            return self._last_slots, _all_true(arr.shape)
        if self._last_lookup is not None and self._lookup_keys.same(arr):
            return self._last_lookup
        pos, found = self._find(arr)
        pos.flags.writeable = found.flags.writeable = False  # handed out again, like slots
        self._lookup_keys.remember(arr)
        self._last_lookup = (pos, found)
        return pos, found

    def retain(self, mask: npt.ArrayLike) -> None:
        """Keep only the keys where `mask` is true (forget the others and their columns)."""
        keep = np.asarray(mask, dtype=bool)
        if keep.shape != self.keys.shape:
            raise ValueError(f"retain: mask has shape {keep.shape}, want {self.keys.shape}")
        if keep.all():
            return
        self.keys = self.keys[keep]
        for name in self.cols:
            self.cols[name] = self.cols[name][keep]
        self._forget()

    def _forget(self) -> None:
        self._index = None
        self._last_keys.forget()
        self._last_slots = None
        self._lookup_keys.forget()
        self._last_lookup = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (for persistence)."""
        return {"keys": self.keys.tolist(), **{k: v.tolist() for k, v in self.cols.items()}}

    def load_dict(self, data: Mapping[str, Any]) -> None:
        keys = np.asarray(data.get("keys", []), dtype=np.str_)
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        for name, (dtype, fill) in self._spec.items():
            raw = data.get(name)
            col = (
                np.full(keys.shape[0], fill, dtype=dtype)
                if raw is None
                else np.asarray(raw, dtype=dtype)
            )
            if col.shape != keys.shape:
                raise ValueError(
                    f"column {name!r} has {col.shape[0]} values for {keys.shape[0]} keys"
                )
            self.cols[name] = col[order]
        self._forget()
